"""Single-draft node verifiers: greedy, SpS (lossless), Cactus (delta-constrained), TAS.

Every rule here is a *pure function of its inputs and the uniforms it is handed*: the caller
draws the randomness (one seeded `torch.Generator` per request) and passes it in. That keeps
the math free of RNG state, makes "which uniform is used for what" explicit (Cactus with
delta = 0 reproduces SpS bit for bit because both consume `u` then `v` identically), and lets
the statistical tests run 10^5+ verifications in one vectorised call.

Shapes: a leading batch dimension B is optional everywhere. `t` and `d` are processed laws
[B, V] or [V] (fp32, after temperature/top-k/top-p, see params.process_logits), `x` the drafted
tokens [B], `u` / `v` uniforms in [0, 1) of shape [B]. No Python loop ever runs over V.

Notation (ALGORITHMS.md 0.3): t = target/verifier law, d = draft law.
"""

from __future__ import annotations

import torch

# Residual rows whose mass is below this are treated as empty (only reachable by fp rounding).
RESIDUAL_EPS = 1e-12


# ---- small vectorised helpers ------------------------------------------------------------
def as_batch(row: torch.Tensor, batch: int) -> torch.Tensor:
    """[V] or [B, V] -> [B, V] (expand, no copy)."""
    row = row.float()
    return row.unsqueeze(0).expand(batch, -1) if row.dim() == 1 else row


def pick(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """rows[b, tokens[b]] for every b."""
    return rows.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def one_hot(tokens: torch.Tensor | int, vocab: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(tokens).long(), vocab).float()


def normalize_or(rows: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Normalise each row; a row with (numerically) no mass is replaced by `fallback`.

    Why a fallback instead of NaN: every residual below is (a - b)_+ of two laws that both sum
    to 1, so its mass equals the rejection probability of the step that built it. An empty
    residual therefore means the step accepts with probability 1 and the residual is never
    sampled in exact arithmetic; it can only be reached through fp rounding, where any law
    inside the target's support is as good as another. Callers pass a fallback with that
    support (the current target/residual row), so no zero-probability token can appear.
    """
    mass = rows.sum(-1, keepdim=True)
    empty = mass <= RESIDUAL_EPS
    return torch.where(empty, fallback, rows / mass.clamp_min(RESIDUAL_EPS))


def sample_rows(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one token per row of `probs` [B, V] from uniforms `v` [B].

    Rows need not be normalised. The CDF is accumulated in float64 so that a 150k-entry row
    does not lose its tail. A token with probability 0 can never be returned: its CDF step is
    empty, and the final clamp maps a rounding overshoot to the last token with mass.
    """
    cdf = probs.double().cumsum(-1)
    total = cdf[..., -1:]
    idx = torch.searchsorted(cdf, (v.double().unsqueeze(-1) * total).contiguous(), right=True)
    # the CDF first reaches its total at the last token with mass (trailing zeros add nothing)
    last_with_mass = torch.searchsorted(cdf, total.contiguous(), right=False)
    return torch.minimum(idx, last_with_mass).squeeze(-1)


def sample_row(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a single (unnormalised) row [V], consuming exactly one uniform."""
    v = torch.rand(1, generator=generator, dtype=torch.float64)
    return int(sample_rows(probs.unsqueeze(0), v)[0])


# ---- greedy ---------------------------------------------------------------------------------
def greedy_accept(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Exact-match acceptance: the drafted token equals argmax t (ties: lowest id, as torch)."""
    return x.long() == t.argmax(-1)


# ---- SpS and Cactus (one accept-or-recover step) ------------------------------------------
def accept_or_recover(
    h: torch.Tensor, d: torch.Tensor, x: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The generalised verifier of ALGORITHMS.md 1.2 for an emitted law `h`.

    Accept x iff u * d(x) < h(x) (i.e. with probability min(1, h(x)/d(x))); the recovery law is
    norm((h - d)_+). Together they emit exactly `h`. Returns (accepted [B], recovery [B, V]).
    """
    batch = x.shape[0]
    h, d = as_batch(h, batch), as_batch(d, batch)
    accepted = u * pick(d, x) < pick(h, x)
    recovery = normalize_or((h - d).clamp_min(0.0), h)
    return accepted, recovery


def sps_step(
    t: torch.Tensor, d: torch.Tensor, x: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless speculative sampling (Leviathan / Chen 2023): emits exactly t."""
    return accept_or_recover(t, d, x, u)


def cactus_gamma(t_x: torch.Tensor, delta: float) -> torch.Tensor:
    """Cactus' raised target probability of the drafted token (Corollary 5, KL, 2nd order):

    gamma* = min(1, t(x) + sqrt(2 delta t(x) (1 - t(x)))). delta = 0 gives t(x) exactly.
    """
    bonus = torch.sqrt((2.0 * delta * t_x * (1.0 - t_x)).clamp_min(0.0))
    return (t_x + bonus).clamp(0.0, 1.0)


def cactus_target(t: torch.Tensor, x: torch.Tensor, delta: float) -> torch.Tensor:
    """h^(x): t with h(x) raised to gamma* and every other token shrunk proportionally.

    Built for the token actually drafted (ALGORITHMS.md 1.7.2). t(x) = 1 gives h = t (0/0 case).
    Tokens with t = 0 keep h = 0, so a truncated (top-k/top-p) target stays truncated.
    """
    t = as_batch(t, x.shape[0])
    t_x = pick(t, x)
    gamma = cactus_gamma(t_x, delta)
    certain = t_x >= 1.0
    scale = torch.where(certain, torch.ones_like(t_x), (1.0 - gamma) / (1.0 - t_x).clamp_min(1e-30))
    h = t * scale.unsqueeze(-1)
    h = h.scatter(-1, x.long().unsqueeze(-1), torch.where(certain, t_x, gamma).unsqueeze(-1))
    return h


def cactus_step(
    t: torch.Tensor, d: torch.Tensor, x: torch.Tensor, u: torch.Tensor, delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cactus (Hao & Mou, ICLR 2026), LOSSY by design: per-step KL(h || t) budget delta.

    Accept w.p. min(1, gamma*/d(x)); recover from norm((h^(x) - d)_+). delta = 0 is SpS bit for
    bit: gamma* = t(x), the scale is (1 - t(x)) / (1 - t(x)) == 1.0 exactly, so h == t.
    """
    return accept_or_recover(cactus_target(t, x, delta), d, x, u)


# ---- TAS (Medusa typical acceptance, as in vLLM) -------------------------------------------
def tas_threshold(t: torch.Tensor, epsilon: float, alpha: float) -> torch.Tensor:
    """min(epsilon, alpha * exp(-H(t))), H(t) = -sum t log(t + 1e-5) (the +1e-5 as in vLLM)."""
    entropy = -(t * torch.log(t + 1e-5)).sum(-1)
    return torch.clamp(alpha * torch.exp(-entropy), max=epsilon)


def tas_accept(t: torch.Tensor, x: torch.Tensor, epsilon: float, alpha: float) -> torch.Tensor:
    """Typical acceptance (LOSSY): accept iff t(x) > threshold; draft probabilities are ignored.

    The threshold is > 0, so a token with t = 0 is never accepted. On rejection the caller
    emits argmax t (deterministic), as vLLM does.
    """
    t = as_batch(t, x.shape[0])
    return pick(t, x) > tas_threshold(t, epsilon, alpha)
