"""Dynamic draft length: draft as deep as pays, and not at all when speculation does not pay.

Model (Leviathan et al.; ALGORITHMS.md 0.4, with per-position rates): position d of a draft
is accepted with conditional probability a_d given that positions 1..d-1 were, so it yields
an expected prod_{j<=d} a_j extra tokens. A round with k positions costs, in units of one
verifier step, 1 + k * c, where c = drafting cost per position + verifier cost per extra
tree node. We pick the k in 0..max that maximises expected tokens per unit of time

    T(k) = (1 + sum_{d<=k} prod_{j<=d} a_j) / (1 + k * c)

The verifier's cost per extra node is measured, not assumed: on a GPU a few more rows are
nearly free, on a busy CPU each row can cost 10-20% of a step. A forgetting least-squares fit
of verify time against tree size gives time(n) = a + b n, so node cost = b / a (the prior
`node_cost` is used until the tree sizes seen vary enough to fit).

k = 0 is plain decoding (T = 1): speculation is switched off when no k > 0 beats it, and
probed again every `probe_every` rounds so it can switch back on when the text changes
(e.g. the model starts copying from the prompt). Rates are Beta-smoothed, exponentially
forgetting counts, so the policy follows the text as it goes.
Pure arithmetic, no I/O: the loop feeds it what each round measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DraftLengthPolicy:
    max_length: int
    node_cost: float = 0.01  # verifier time per extra tree node / time of one verifier step (prior)
    prior_accept: float = 0.5  # Beta prior mean of each position's acceptance rate
    prior_weight: float = 2.0  # Beta prior strength, in pseudo-rounds
    forget: float = 0.95  # per-round decay of old counts
    cost_smoothing: float = 0.2  # EMA weight of the newest draft-cost measurement
    probe_every: int = 8  # rounds between probes while speculation is off
    draft_cost: float = 0.0  # drafting time per position / verifier step time (measured)
    reached: list[float] = field(default_factory=list)  # rounds whose draft reached position d
    accepted: list[float] = field(default_factory=list)  # ... and had position d accepted
    rounds_off: int = 0
    min_fit_rounds: float = 4.0  # (decayed) rounds with varying tree sizes before the fit is used
    # forgetting sums for the verify-time fit: weight, n, t, n^2, n t
    _fit: list[float] = field(default_factory=lambda: [0.0] * 5)

    def __post_init__(self) -> None:
        if self.max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {self.max_length}")
        self.reached = self.reached or [0.0] * self.max_length
        self.accepted = self.accepted or [0.0] * self.max_length

    # ---- estimates ------------------------------------------------------------
    def acceptance(self, position: int) -> float:
        """Smoothed P(position accepted | previous positions accepted); position is 1-based."""
        a = self.prior_accept * self.prior_weight
        return (self.accepted[position - 1] + a) / (self.reached[position - 1] + self.prior_weight)

    def expected_tokens(self, k: int) -> float:
        """Expected tokens per verifier step with k drafted positions (the +1 is the bonus/correction)."""
        total, survive = 1.0, 1.0
        for d in range(1, k + 1):
            survive *= self.acceptance(d)
            total += survive
        return total

    def measured_node_cost(self) -> float | None:
        """b / a of the fit time(n) = a + b n, or None while the data cannot pin it down."""
        w, sn, st, snn, snt = self._fit
        if w < self.min_fit_rounds:
            return None
        var = snn / w - (sn / w) ** 2
        if var < 0.5:  # tree sizes barely varied: the slope is noise
            return None
        slope = (snt / w - (sn / w) * (st / w)) / var
        intercept = st / w - slope * sn / w
        if intercept <= 0:
            return None
        return max(slope, 0.0) / intercept

    def cost(self, k: int, nodes_per_position: float = 1.0) -> float:
        node_cost = self.measured_node_cost()
        node_cost = self.node_cost if node_cost is None else node_cost
        return 1.0 + k * (self.draft_cost + nodes_per_position * node_cost)

    def best_length(self, nodes_per_position: float = 1.0) -> int:
        """argmax_k T(k) over 0..max_length (0 = plain decoding); ties go to the shorter draft."""
        best_k, best = 0, 1.0
        for k in range(1, self.max_length + 1):
            value = self.expected_tokens(k) / self.cost(k, nodes_per_position)
            if value > best * (1 + 1e-9):
                best_k, best = k, value
        return best_k

    # ---- the loop's two calls ---------------------------------------------------
    def next_length(self, nodes_per_position: float = 1.0) -> int:
        k = self.best_length(nodes_per_position)
        if k > 0:
            self.rounds_off = 0
            return k
        self.rounds_off += 1
        if self.rounds_off >= self.probe_every:  # re-measure: the text may have become predictable
            self.rounds_off = 0
            return self.max_length
        return 0

    def record(
        self,
        drafted_depth: int,
        accepted_length: int,
        draft_seconds: float = 0.0,
        verify_seconds: float = 0.0,
        tree_nodes: int | None = None,
    ) -> None:
        """One round: the draft reached `drafted_depth`, its first `accepted_length` positions were
        accepted; the verifier scored `tree_nodes` nodes (default: drafted_depth) in verify_seconds."""
        if verify_seconds > 0:
            n = float(drafted_depth if tree_nodes is None else tree_nodes)
            decay = self.forget
            self._fit = [decay * v for v in self._fit]
            for i, v in enumerate((1.0, n, verify_seconds, n * n, n * verify_seconds)):
                self._fit[i] += v
        if drafted_depth <= 0:
            return  # a verifier-only round says nothing about drafting
        self.reached = [r * self.forget for r in self.reached]
        self.accepted = [a * self.forget for a in self.accepted]
        for d in range(1, min(accepted_length + 1, drafted_depth, self.max_length) + 1):
            self.reached[d - 1] += 1.0
        for d in range(1, min(accepted_length, self.max_length) + 1):
            self.accepted[d - 1] += 1.0
        if verify_seconds > 0:
            measured = draft_seconds / (drafted_depth * verify_seconds)
            w = self.cost_smoothing
            self.draft_cost = (1 - w) * self.draft_cost + w * measured
