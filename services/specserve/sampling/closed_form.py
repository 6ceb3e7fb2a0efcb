"""Exact one-step acceptance probabilities and emitted laws, plus speed-up arithmetic.

These are the oracles the verifiers are tested against and what benchmarks quote as
"expected". Everything is float64. Functions marked "small V" enumerate token tuples or
token subsets and are meant for toy vocabularies (V <= ~12), never for live rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch

from .rules import cactus_target, tas_threshold


def _f64(x: torch.Tensor | list[float]) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) in nats (0 log 0 = 0; inf where p > 0 = q)."""
    p, q = _f64(p), _f64(q)
    mask = p > 0
    return float((p[mask] * (p[mask].log() - q[mask].log())).sum())


# ---- single draft --------------------------------------------------------------------------
def sps_acceptance(t: torch.Tensor, d: torch.Tensor) -> float:
    """alpha = sum_x min(t(x), d(x)); SpS emits exactly t."""
    return float(torch.minimum(_f64(t), _f64(d)).sum())


def greedy_closed_form(t: torch.Tensor, d: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Exact-match with a token drawn from d: acceptance d(argmax t); emits argmax t."""
    t, d = _f64(t), _f64(d)
    top = int(t.argmax())
    return float(d[top]), torch.nn.functional.one_hot(torch.tensor(top), t.shape[0]).double()


def cactus_closed_form(t: torch.Tensor, d: torch.Tensor, delta: float) -> tuple[float, torch.Tensor]:
    """Cactus, one step (ALGORITHMS.md 1.8): acceptance sum_n min(d(n), gamma_n) and

    h_alg(y) = d(y) min(1, gamma_y/d(y)) + sum_n d(n)(1 - min(1, gamma_n/d(n))) norm((h^(n) - d)_+)(y).
    O(V^2) memory (one h^(n) row per drafted token n): small V.
    """
    t, d = _f64(t), _f64(d)
    vocab = t.shape[0]
    tokens = torch.arange(vocab)
    h = cactus_target(t.float(), tokens, delta).double()  # row n = h^(n)
    gamma = h.diagonal()
    accept = torch.where(d > 0, (gamma / d.clamp_min(1e-300)).clamp(max=1.0), torch.zeros_like(d))
    residual = (h - d.unsqueeze(0)).clamp_min(0.0)
    mass = residual.sum(-1, keepdim=True)
    recovery = torch.where(mass > 0, residual / mass.clamp_min(1e-300), h)
    emitted = d * accept + ((d * (1.0 - accept)).unsqueeze(-1) * recovery).sum(0)
    return float((d * accept).sum()), emitted


def tas_closed_form(
    t: torch.Tensor, d: torch.Tensor, epsilon: float = 0.09, alpha: float = 0.3
) -> tuple[float, torch.Tensor]:
    """TAS: accept iff t(x) > threshold (draft probabilities ignored), else emit argmax t."""
    t, d = _f64(t), _f64(d)
    passing = t > float(tas_threshold(t, epsilon, alpha))
    acceptance = float(d[passing].sum())
    emitted = torch.where(passing, d, torch.zeros_like(d))
    emitted[int(t.argmax())] += 1.0 - acceptance
    return acceptance, emitted


# ---- several drafts at one node --------------------------------------------------------------
def rrs_acceptance(t: torch.Tensor, d: torch.Tensor, k: int) -> float:
    """RRS with replacement, k i.i.d. drafts: 1 - prod_i (1 - alpha_i), alpha_i = sum min(r_i, d),
    r_{i+1} = norm((r_i - d)_+)."""
    r, d = _f64(t), _f64(d)
    reject = 1.0
    for _ in range(k):
        alpha = float(torch.minimum(r, d).sum())
        reject *= 1.0 - alpha
        res = (r - d).clamp_min(0.0)
        if float(res.sum()) <= 0.0:
            break
        r = res / res.sum()
    return 1.0 - reject


def rrs_wor_acceptance(t: torch.Tensor, d: torch.Tensor, k: int) -> float:
    """RRS without replacement, k drafts (small V: enumerates the V^k draw sequences).

    The residual after a rejection does not depend on which token was rejected (it is taken
    against the current draft law), only the reduced draft law does."""
    def accept(r: torch.Tensor, c: torch.Tensor, left: int) -> float:
        if left == 0 or float(c.sum()) <= 0.0:
            return 0.0
        res = (r - c).clamp_min(0.0)
        r_next = res / res.sum() if float(res.sum()) > 0 else r
        total = 0.0
        for x in torch.nonzero(c > 0).flatten().tolist():
            p_acc = min(1.0, float(r[x] / c[x]))
            reduced = c.clone()
            reduced[x] = 0.0
            if float(reduced.sum()) > 0:
                reduced = reduced / reduced.sum()
            total += float(c[x]) * (p_acc + (1.0 - p_acc) * accept(r_next, reduced, left - 1))
        return total

    return accept(_f64(t), _f64(d), k)


def spechub_acceptance(t: torch.Tensor, d: torch.Tensor) -> float:
    """alpha_hub = min(1, t(a) + sum_{j != a} min(t(j), d(j) / (1 - d(a)))), a = argmax d."""
    t, d = _f64(t), _f64(d)
    a = int(d.argmax())
    if float(d[a]) >= 1.0:
        return float(min(t[a], 1.0))
    others = torch.ones_like(t, dtype=torch.bool)
    others[a] = False
    total = float(t[a]) + float(torch.minimum(t[others], d[others] / (1.0 - d[a])).sum())
    return min(1.0, total)


# ---- joint laws of k drafts and the brute-force optimum -------------------------------------
def iid_joint(d: torch.Tensor, k: int) -> torch.Tensor:
    """Q(x_1..x_k) = prod d(x_i), as a [V]*k tensor."""
    d = _f64(d)
    q = d
    for _ in range(k - 1):
        q = q.unsqueeze(-1) * d
    return q


def wor_joint(d: torch.Tensor, k: int) -> torch.Tensor:
    """Sequential sampling without replacement (small V)."""
    d = _f64(d)
    vocab = d.shape[0]
    q = torch.zeros([vocab] * k, dtype=torch.float64)
    for seq in itertools.permutations(range(vocab), k):
        p, mass = 1.0, 1.0
        for x in seq:
            if mass <= 0:
                p = 0.0
                break
            p *= float(d[x]) / mass
            mass -= float(d[x])
        q[seq] = p
    return q


def hub_joint(d: torch.Tensor) -> torch.Tensor:
    """SpecHub's sparse coupling: Q(i, a) = d(i), Q(a, i) = d(a) d(i) / (1 - d(a)) (i != a)."""
    d = _f64(d)
    a = int(d.argmax())
    q = torch.zeros(d.shape[0], d.shape[0], dtype=torch.float64)
    q[:, a] = d
    q[a, :] = d[a] * d / (1.0 - d[a])
    q[a, a] = 0.0
    return q


def optimal_acceptance(t: torch.Tensor, joint: torch.Tensor) -> float:
    """alpha*(t, Q) = 1 - max_{H subset V} [Q(all drafts in H) - t(H)] (max-flow / min-cut
    oracle, ALGORITHMS.md 2.1). Brute force over 2^V subsets: small V only."""
    t = _f64(t)
    vocab, k = t.shape[0], joint.dim()
    best = 0.0  # H = {} gives 0
    for bits in range(1, 1 << vocab):
        members = torch.tensor([(bits >> i) & 1 for i in range(vocab)], dtype=torch.bool)
        q = joint
        for _ in range(k):
            q = q[members]
            q = q.movedim(0, -1)
        best = max(best, float(q.sum()) - float(t[members].sum()))
    return 1.0 - best


# ---- speed-up arithmetic ---------------------------------------------------------------------
def expected_tokens_per_call(alpha: float, num_drafts: int) -> float:
    """Leviathan et al.: (1 - alpha^(m+1)) / (1 - alpha) tokens per target call (m + 1 at alpha = 1)."""
    if alpha >= 1.0:
        return float(num_drafts + 1)
    return (1.0 - alpha ** (num_drafts + 1)) / (1.0 - alpha)


def walltime_improvement(alpha: float, num_drafts: int, cost_ratio: float) -> float:
    """Expected walltime improvement factor: tokens per call / (1 + m c), c = draft/target cost."""
    return expected_tokens_per_call(alpha, num_drafts) / (1.0 + num_drafts * cost_ratio)


def standardized_walltime_improvement(
    generated_tokens: int, runs: Mapping[str, int], cost: Mapping[str, float], target: str
) -> float:
    """CS Drafting's SWI: autoregressive cost (one target run per token) over the cascade's cost
    sum(runs[m] * cost[m]); the statistical drafter (MaG) costs 0."""
    ar_cost = generated_tokens * cost[target]
    spent = sum(n * cost.get(model, 0.0) for model, n in runs.items())
    return ar_cost / spent
