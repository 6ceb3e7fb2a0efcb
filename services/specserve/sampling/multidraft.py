"""Multi-draft (sibling) verifiers, all lossless: RRS, RRS without replacement, SpecHub.

At a branching node several children were proposed; the verifier must emit one token whose
law is exactly t while accepting a proposed child as often as the sampling scheme allows.
How the siblings were drawn (the *coupling*) decides the verifier, so drafters must sample
with `sample_siblings` and the same coupling (ALGORITHMS.md 2.7.1):

  independent          -> recursive rejection sampling with replacement (SpecInfer / MCSS)
  without_replacement  -> RRS without replacement (SpecTree / MCSS w/o)
  hub                  -> SpecHub's binary hub coupling (Sun et al., EMNLP 2024)

Like rules.py, the verifiers are pure functions of the uniforms they are handed and are
batched over a leading sample dimension B. Each returns (accepted_index [B] with -1 for
"all rejected", residual [B, V]); the caller samples the correction from the residual.

Merged proposals: a proposal may carry its own draft row (e.g. candidates from two drafters
under one parent). RRS treats proposals as a sequence of *blocks*: `continues` [k] says
whether proposal i is the next without-replacement draw of the same law as proposal i - 1.
Independent blocks are verified one after the other against the running residual, which
is exact because each block's draws are independent of the earlier ones (the residual is
the law still owed, and SpS against it emits it exactly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..tree.token_tree import Coupling
from .rules import as_batch, normalize_or, pick, sample_rows


def rrs_verify(
    t: torch.Tensor,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    u: torch.Tensor,
    continues: Sequence[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recursive rejection sampling over k proposals.

    t [B, V] | [V]: target law. rows [k, V] | [B, k, V]: the law each proposal was drawn from.
    tokens [B, k], u [B, k]. continues[i] True: proposal i was drawn without replacement after
    proposal i - 1 from the same law (RRS-wor); False (default for all): independent draw.

    For each proposal in order: accept x_i iff u_i * c(x_i) < r(x_i); otherwise
    r <- norm((r - c)_+) with the *current* draft law c, and for RRS-wor remove x_i from c
    afterwards (ALGORITHMS.md 2.3, pitfall 2.7.4). Duplicated proposals are each tested
    (de-duplicating would change the law, 2.7.5).
    """
    batch, k = tokens.shape
    continues = [False] * k if continues is None else list(continues)
    r = as_batch(t, batch)
    if rows.dim() == 2:
        rows = rows.unsqueeze(0).expand(batch, -1, -1)
    rows = rows.float()
    accepted = torch.full((batch,), -1, dtype=torch.long)
    c = rows[:, 0]
    for i in range(k):
        if not continues[i]:
            c = rows[:, i]
        x = tokens[:, i]
        ok = (accepted < 0) & (u[:, i] * pick(c, x) < pick(r, x))
        accepted = torch.where(ok, torch.full_like(accepted, i), accepted)
        # residual against the current law; rows with no mass keep r (see normalize_or)
        r = normalize_or((r - c).clamp_min(0.0), r)
        if i + 1 < k and continues[i + 1]:
            removed = c.scatter(-1, x.long().unsqueeze(-1), 0.0)
            c = normalize_or(removed, removed)
    return accepted, r


def spechub_verify(
    t: torch.Tensor,
    d: torch.Tensor,
    hub: torch.Tensor,
    x1: torch.Tensor,
    x2: torch.Tensor,
    u1: torch.Tensor,
    u2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SpecHub for a binary node whose children were drawn from the hub coupling.

    hub a = argmax d (both sides must agree; the drafter sends it). The pair (x1, x2) always
    contains a. With A_j = d(a) d(j) / (1 - d(a)) the mass of pair (a, j), the transport
    (ALGORITHMS.md 2.4 step 3) sends pair (j, a) to j first (SpS), pair (a, j) to j with the
    capacity j has left, and the unused mass of both kinds of pairs to a, up to t(a).
    Returns (accepted index 0/1/-1, residual [B, V]); u1, u2 are the uniforms of child 1 / 2.
    """
    batch = x1.shape[0]
    t, d = as_batch(t, batch), as_batch(d, batch)
    hub = hub.long().expand(batch) if hub.dim() == 0 else hub.long()
    d_a = pick(d, hub).unsqueeze(-1)
    t_a = pick(t, hub)
    not_hub = torch.ones_like(t).scatter(-1, hub.unsqueeze(-1), 0.0)
    # d(a) = 1 makes the pair (a, j) impossible (x2 cannot be drawn); A = 0 then.
    A = torch.where(d_a < 1.0, d_a * d / (1.0 - d_a).clamp_min(1e-30), torch.zeros_like(d)) * not_hub
    r1 = (t - d).clamp_min(0.0) * not_hub
    L1 = ((d - t).clamp_min(0.0) * not_hub).sum(-1)
    L2 = ((A - r1).clamp_min(0.0)).sum(-1)
    r2 = (r1 - A).clamp_min(0.0)
    ta = (t_a - L2).clamp_min(0.0)

    first_is_hub = x1.long() == hub
    # pair (i, a): i by SpS, else a from the pairs' leftover L1 against a's capacity ta
    i_tok = torch.where(first_is_hub, x2, x1).long()
    accept_i_pair1 = u1 * pick(d, i_tok) < pick(t, i_tok)
    accept_a_pair1 = u2 * L1 < ta
    # pair (a, i): i with the capacity left after pairs (i, a), else a from L2 against t(a)
    accept_i_pair2 = u2 * pick(A, i_tok) < pick(r1, i_tok)
    accept_a_pair2 = u1 * L2 < t_a

    minus = torch.full_like(hub, -1)
    idx_pair1 = torch.where(accept_i_pair1, 0, torch.where(accept_a_pair1, 1, minus))
    idx_pair2 = torch.where(accept_i_pair2, 1, torch.where(accept_a_pair2, 0, minus))
    accepted = torch.where(first_is_hub, idx_pair2, idx_pair1)

    residual = r2.scatter(-1, hub.unsqueeze(-1), (ta - L1).clamp_min(0.0).unsqueeze(-1))
    return accepted, normalize_or(residual, t)


# ---- drawing siblings exactly as the verifier assumes ------------------------------------
def hub_token(d: torch.Tensor) -> int:
    """SpecHub's hub: argmax of the processed draft law (ties: lowest id, deterministic)."""
    return int(d.argmax(-1))


def draw_independent(probs: torch.Tensor, k: int, u: torch.Tensor) -> torch.Tensor:
    """k i.i.d. draws per sample: probs [V], uniforms u [B, k] -> tokens [B, k]."""
    batch = u.shape[0]
    flat = probs.float().unsqueeze(0).expand(batch * k, -1)
    return sample_rows(flat, u.reshape(-1)).reshape(batch, k)


def draw_without_replacement(probs: torch.Tensor, k: int, u: torch.Tensor) -> torch.Tensor:
    """Gumbel top-k (= sequential sampling without replacement): u [B, V] -> tokens [B, k'],
    k' = min(k, support size); zero-probability tokens are never drawn."""
    probs = probs.double()
    k = min(k, int((probs > 0).sum()))
    gumbel = -torch.log(-torch.log(u.double().clamp_min(1e-300)))
    keys = torch.where(probs > 0, probs.log() + gumbel, torch.full_like(gumbel, -torch.inf))
    return torch.topk(keys, k, dim=-1).indices


def draw_hub_pair(probs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """SpecHub coupling: u [B, 2] -> (x1 [B], x2 [B], hub a). x1 ~ d; x2 = a if x1 != a,
    else x2 ~ d restricted to V minus {a}. Requires d(a) < 1."""
    probs = probs.float()
    a = hub_token(probs)
    batch = u.shape[0]
    x1 = sample_rows(probs.unsqueeze(0).expand(batch, -1), u[:, 0])
    rest = probs.clone()
    rest[a] = 0.0
    other = sample_rows(rest.unsqueeze(0).expand(batch, -1), u[:, 1])
    x2 = torch.where(x1 == a, other, torch.full_like(x1, a))
    return x1, x2, a


def sample_siblings(
    probs: torch.Tensor, k: int, coupling: Coupling, generator: torch.Generator | None
) -> tuple[list[int], int | None]:
    """Draw k children from the draft law `probs` [V] under `coupling`.

    Returns (tokens in sampling order, hub token or None). The order matters: it is the order
    the verifier walks the proposals in.
      independent: k i.i.d. draws (duplicates allowed and kept).
      without_replacement: k distinct tokens, sequential-renormalisation law (Gumbel top-k);
        fewer if the support has fewer than k tokens.
      hub (k must be 2): x1 ~ d; x2 = a if x1 != a, else x2 ~ d restricted to V minus {a}.
        If d puts all mass on a there is no second child: returns ([a], None), a plain chain.
    """
    if k < 1:
        return [], None
    if coupling == "independent":
        u = torch.rand(1, k, generator=generator, dtype=torch.float64)
        return draw_independent(probs, k, u)[0].tolist(), None
    if coupling == "without_replacement":
        u = torch.rand(1, probs.shape[-1], generator=generator, dtype=torch.float64)
        return draw_without_replacement(probs, k, u)[0].tolist(), None
    if coupling == "hub":
        if k != 2:
            raise ValueError(f"hub coupling is binary (k = 2), got k = {k}")
        a = hub_token(probs)
        if float(probs[a]) >= 1.0 or int((probs > 0).sum()) < 2:
            return [a], None
        u = torch.rand(1, 2, generator=generator, dtype=torch.float64)
        x1, x2, a = draw_hub_pair(probs, u)
        return [int(x1[0]), int(x2[0])], a
    raise ValueError(f"unknown coupling {coupling!r}")
