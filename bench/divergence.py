"""Exact one-step emitted laws of the lossy rules on full-vocabulary rows, in O(V log V).

The quality benchmark needs KL(emitted law || verifier law) at every decoding step of real runs,
where V is 49k (SmolLM2) to 152k (Qwen2.5). The textbook Cactus mixture (ALGORITHMS.md 1.8)

    h_alg(y) = min(d(y), g_y) + sum_n d(n) (1 - min(1, g_n / d(n))) * norm((h^(n) - d)_+)(y)

sums one recovery row per drafted token n: O(V^2). Both sums collapse because every h^(n) is the
verifier row scaled by one number, h^(n)(y) = s_n t(y) for y != n with s_n = (1 - g_n)/(1 - t(n)):

* (s t(y) - d(y))_+ = t(y) (s - rho_y)_+ with rho_y = d(y)/t(y), so the normaliser
  Z(s) = sum_y t(y)(s - rho_y)_+ is piecewise linear in s: sort rho once, prefix sums, searchsorted;
* the recovery mass at y is t(y) * sum_n c_n (s_n - rho_y)_+ with c_n = rejected mass / Z_n, again
  piecewise linear in rho_y: sort s once, prefix sums, searchsorted;
* minus the n = y self term, because h^(n)(n) = g_n < d(n) leaves no residual at n itself.

tests/test_bench.py checks this against sampling/'s O(V^2) closed form on small rows; TAS and
SpS use sampling/'s closed forms directly (they are O(V) already).
All arithmetic in float64 (the prefix sums run over 10^5 terms).
"""

from __future__ import annotations

import torch

from specserve.sampling.closed_form import kl, sps_acceptance, tas_closed_form
from specserve.sampling.rules import cactus_gamma

__all__ = ["cactus_emitted", "emitted_law", "kl"]


def _sum_relu_scaled(weights: torch.Tensor, knots: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """For each s_j: sum_i weights_i * (s_j - knots_i)_+ (piecewise linear in s; O((n+m) log n))."""
    order = torch.argsort(knots)
    k = knots[order]
    w = weights[order]
    cw = torch.cat([w.new_zeros(1), torch.cumsum(w, 0)])
    cwk = torch.cat([w.new_zeros(1), torch.cumsum(w * k, 0)])
    # knots strictly below s contribute; equal knots contribute 0 either way
    idx = torch.searchsorted(k, s, right=False)
    return s * cw[idx] - cwk[idx]


def cactus_emitted(t: torch.Tensor, d: torch.Tensor, delta: float) -> tuple[torch.Tensor, float]:
    """Exact law of the token Cactus emits at one drafted position, and its acceptance probability.

    t, d: processed verifier / draft laws [V]. Returns (h_alg [V] float64, acceptance).
    """
    t = t.double()
    d = d.double()
    g = cactus_gamma(t, delta)
    accept_mass = torch.minimum(d, g)  # d(n) min(1, g_n/d(n))
    reject_mass = d - accept_mass  # > 0 only where g_n < d(n)
    emitted = accept_mass.clone()
    rejected = reject_mass > 0
    if rejected.any():
        support = t > 0
        tt = t[support]
        rho = d[support] / tt  # y with t(y) = 0 never receive recovery mass: (s*0 - d)_+ = 0
        n_idx = rejected.nonzero().squeeze(1)
        t_n = t[n_idx]
        g_n = g[n_idx]
        # t(n) == 1 leaves no room for other tokens: h^(n) = t, and then g_n = 1 >= d(n), so never rejected
        s_n = (1.0 - g_n) / (1.0 - t_n)
        # Z_n = sum_{y != n} (s_n t(y) - d(y))_+ : all-y sum minus the y = n term
        z_all = _sum_relu_scaled(tt, rho, s_n)
        self_term = torch.clamp(s_n * t_n - d[n_idx], min=0.0)
        z_n = z_all - self_term
        ok = z_n > 1e-300
        # a zero residual cannot occur when g_n < d(n) (mass conservation: sum_y (h^(n)-d)_+ =
        # sum_y (d-h^(n))_+ >= d(n) - g_n > 0); the guard only absorbs float64 rounding
        c_n = torch.where(ok, reject_mass[n_idx] / torch.where(ok, z_n, 1.0), 0.0)
        recovery = torch.zeros_like(t)
        recovery[support] = tt * _sum_relu_scaled(c_n, -s_n, -rho)  # sum c_n (s_n - rho_y)_+
        # remove each n's own (nonexistent) residual at y = n
        recovery[n_idx] -= c_n * self_term
        emitted += torch.clamp(recovery, min=0.0)
    return emitted, float(accept_mass.sum())


def emitted_law(rule: str, t: torch.Tensor, d: torch.Tensor, **params) -> tuple[torch.Tensor, float]:
    """rule in {"sps", "cactus", "tas"}; params: delta (cactus), epsilon/alpha (tas)."""
    if rule == "sps" or (rule == "cactus" and params.get("delta", 0.0) == 0.0):
        return t.double(), sps_acceptance(t, d)
    if rule == "cactus":
        return cactus_emitted(t, d, params["delta"])
    if rule == "tas":  # O(V) already: sampling's closed form is used as is
        acceptance, law = tas_closed_form(t, d, params.get("epsilon", 0.09), params.get("alpha", 0.3))
        return law, acceptance
    raise ValueError(f"no one-step emitted law for rule {rule!r}")
