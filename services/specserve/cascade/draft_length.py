"""Dynamic draft length: draft as deep as pays, and not at all when speculation does not pay.

Model (Leviathan et al.; ALGORITHMS.md 0.4, with per-position rates): position d of a draft
is accepted with conditional probability a_d given that positions 1..d-1 were, so it yields
an expected prod_{j<=d} a_j extra tokens. In units of one verifier-only step, a round with
k > 0 positions costs 1 + jump + k * c, where c = drafting cost per position + verifier cost
per extra tree node, and `jump` is what going from one row to several costs at all. We pick
the k in 0..max that maximises expected tokens per unit of time

    T(k) = (1 + sum_{d<=k} prod_{j<=d} a_j) / (1 + [k > 0] jump + k c)

The verifier's costs are measured, not assumed. On a GPU extra rows are nearly free; on a CPU
a pass over several rows costs far more than a one-row step (we measured ~2.5 steps for 6
rows on a 2-core box, most of it the vocabulary projection per row). From the last
`window` timed rounds:
  step = median verify time of verifier-only rounds (n = 0 tree nodes),
  node = least-squares slope of time against n over tree rounds (prior `node_cost` while
         the sizes seen barely vary), in steps,
  jump = median over tree rounds of time / step - 1 - node * n,
with priors (jump_cost, node_cost) until there is data. Medians, because the first passes of
each new shape and load spikes on a shared machine are slow outliers. Two verifier-only
rounds run first (after the prefill round), so `step` is always measured; a request that starts
from an earlier one's measurements (`carry_costs_from`, what the decode loop does per drafter
set) drafts from its first round.

The drafting cost per position is the median of the same recent window of rounds, leaving out
the first drafting round (an LM drafter prefills the prompt there).

k = 0 is plain decoding (T = 1): speculation is switched off when no k > 0 beats it, and
probed again (one position deep) every `probe_every` rounds so it can switch back on when the text changes
(e.g. the model starts copying from the prompt). Rates are Beta-smoothed, exponentially
forgetting counts, so the policy follows the text as it goes.
Pure arithmetic, no I/O: the loop feeds it what each round measured.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass
class DraftLengthPolicy:
    max_length: int
    node_cost: float = 0.01  # prior: verifier time per extra tree node / verifier-only step
    jump_cost: float = 0.0  # prior: extra cost of any multi-row pass / verifier-only step
    prior_accept: float = 0.5  # Beta prior mean of each position's acceptance rate
    prior_weight: float = 2.0  # Beta prior strength, in pseudo-rounds
    forget: float = 0.95  # per-round decay of old counts
    probe_every: int = 8  # rounds between probes while speculation is off (first interval)
    max_probe_every: int = 64  # a probe that did not pay doubles the interval, up to this
    probe_length: int = 1  # a probe drafts this deep: it re-measures position 1 at the least cost
    # a failed probe doubles the interval only if position 1's rate is below this share of its
    # break-even rate (cost(1) - 1: what one drafted position must bring to pay for itself)
    backoff_below: float = 0.5
    measure_step_rounds: int = 2  # verifier-only rounds wanted for timing (forced if missing)
    draft_cost_prior: float = 0.0  # drafting time per position / verifier step, until measured
    # With a confidence stop (DraftCall.min_confidence) the drafter ends a chain at a token it
    # doubts, so position d > 1 is reached only after a confident token: its prior is at least
    # this floor (the threshold), not just position d - 1's estimate. Without it the depth could
    # never grow past what position 1's unconditional rate allows, since unreached positions are
    # never measured; with it deep positions are tried, and measured, until the data says no.
    deep_prior_floor: float = 0.0
    reached: list[float] = field(default_factory=list)  # rounds whose draft reached position d
    accepted: list[float] = field(default_factory=list)  # ... and had position d accepted
    rounds_off: int = 0
    probe_interval: int = 0  # current interval (0 = probe_every)
    probing: bool = False  # the last length handed out was a probe
    rounds_seen: int = 0
    window: int = 16  # timed rounds of each kind kept for the cost estimates
    step_rounds: int = 0  # verifier-only rounds timed
    step_times: deque = field(default_factory=deque)  # recent verifier-only verify seconds
    tree_times: deque = field(default_factory=deque)  # recent (nodes, verify seconds) of tree rounds
    draft_rounds: int = 0  # rounds that drafted (timed or not)
    draft_ratios: deque = field(default_factory=deque)  # recent draft seconds / (depth * verify seconds)
    draft_spend: deque = field(default_factory=deque)  # recent (draft seconds, drafted depth), every drafting round
    free_only = False  # one tier: every drafter drafts what it hands out (TieredLengthPolicy below)
    # runner-up siblings beside greedy LM chains (DraftCall.alternatives): P(the verifier takes the
    # runner-up | it rejected the chain token there), a Beta estimate like the positions' rates
    alternative_prior: float = 0.5  # measured 0.4-0.6 for Qwen 0.5B@int8 -> 1.5B on mt_bench
    alternative_judged: float = 0.0
    alternative_hits: float = 0.0
    alternatives_margin: float = 0.01  # relative gain they must bring over their rows' cost

    def __post_init__(self) -> None:
        if self.max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {self.max_length}")
        self.reached = self.reached or [0.0] * self.max_length
        self.accepted = self.accepted or [0.0] * self.max_length

    # ---- estimates ------------------------------------------------------------
    def acceptance(self, position: int) -> float:
        """Smoothed P(position accepted | previous positions accepted); position is 1-based.

        The prior of position d > 1 is the estimate of position d - 1, not a fixed 0.5: a position
        the policy has rarely drafted then inherits what the shallower ones show (acceptance barely
        depends on depth), instead of a pessimistic constant that would keep drafts short forever
        because deep positions are never drafted and so never measured."""
        return self.acceptance_rates(position)[-1] if position > 0 else self.prior_accept

    def acceptance_rates(self, upto: int | None = None) -> list[float]:
        """acceptance(d) for d = 1..upto (default max_length), in one pass."""
        rates, estimate = [], self.prior_accept
        for d in range(1, (self.max_length if upto is None else upto) + 1):
            prior = max(estimate, self.deep_prior_floor) if d > 1 else estimate
            estimate = (self.accepted[d - 1] + self.prior_weight * prior) / (self.reached[d - 1] + self.prior_weight)
            rates.append(estimate)
        return rates

    def expected_tokens(self, k: int) -> float:
        """Expected tokens per verifier step with k drafted positions (the +1 is the bonus/correction)."""
        total, survive = 1.0, 1.0
        for rate in self.acceptance_rates(k):
            survive *= rate
            total += survive
        return total

    def measured_costs(self) -> tuple[float, float] | None:
        """(jump, node cost) in verifier-only steps, or None before any tree round was timed."""
        if not self.step_times or not self.tree_times:
            return None
        step = statistics.median(self.step_times)
        if step <= 0:
            return None
        ns = [n for n, _ in self.tree_times]
        ts = [t / step for _, t in self.tree_times]
        node = self.node_cost
        if len(ns) >= 3 and statistics.pvariance(ns) >= 0.5:
            node = statistics.linear_regression(ns, ts).slope
        # one more row never costs more than a whole step (a step already is one row); the
        # clamps keep outliers on a shared machine from switching speculation off for good
        node = min(max(node, 0.0), 1.0)
        jump = statistics.median(t - 1.0 - node * n for n, t in zip(ns, ts))
        return min(max(jump, 0.0), 2.0), node

    @property
    def draft_cost(self) -> float:
        """Drafting time per drafted position, in verifier steps: the median of recent rounds."""
        return statistics.median(self.draft_ratios) if self.draft_ratios else self.draft_cost_prior

    def draft_seconds_per_position(self) -> float:
        """Drafting seconds per drafted position as the verifier's load policy must weigh them
        (engine/goodput.py): the MEAN over recent drafting rounds, catch-ups included. Under load
        an LM drafter that sat out capped rounds first re-prefills everything since its last draft;
        the median (right for this request's own depth) hides those rounds, but the other streams
        in the pass wait through them all. The first drafting round is left out: its prompt
        prefill is paid once, whatever the caps decide later (counted, it held the cap at 0 for
        good, since capped rounds never dilute it)."""
        seconds = sum(s for s, _ in self.draft_spend)
        positions = sum(p for _, p in self.draft_spend)
        return seconds / positions if positions else 0.0

    def cost(self, k: int, nodes_per_position: float = 1.0, measured: tuple[float, float] | None | bool = False) -> float:
        if k == 0:
            return 1.0
        if measured is False:  # not handed in by a caller that already has it
            measured = self.measured_costs()
        jump, node = measured if measured is not None else (self.jump_cost, self.node_cost)
        return 1.0 + jump + k * (self.draft_cost + nodes_per_position * node)

    def best_length(self, nodes_per_position: float = 1.0) -> int:
        """argmax_k T(k) over 0..max_length (0 = plain decoding); ties go to the shorter draft."""
        measured = self.measured_costs()
        best_k, best = 0, 1.0
        tokens, survive = 1.0, 1.0
        for k, rate in enumerate(self.acceptance_rates(), start=1):
            survive *= rate
            tokens += survive
            value = tokens / self.cost(k, nodes_per_position, measured)
            if value > best * (1 + 1e-9):
                best_k, best = k, value
        return best_k

    def seconds_saved_per_token(self, k: int, nodes_per_position: float = 1.0) -> float:
        """What drafting k positions saves per generated token against plain decoding, in seconds,
        by the measured costs and this request's acceptance (0 before a step was timed, or where it
        does not pay): a plain token costs a step, a drafted round cost(k) steps for
        expected_tokens(k) tokens."""
        if k <= 0 or not self.step_times:
            return 0.0
        step = statistics.median(self.step_times)
        return max(0.0, step * (1.0 - self.cost(k, nodes_per_position) / self.expected_tokens(k)))

    def alternative_rate(self) -> float:
        return (self.alternative_hits + self.prior_weight * self.alternative_prior) / (
            self.alternative_judged + self.prior_weight)

    def alternative_positions(self, k: int, nodes_per_position: float = 1.0) -> int:
        """How many of a k-position chain's first positions get a runner-up sibling (one verifier
        row each; 0 = a plain chain). A sibling at position d adds one token (its own row's bonus)
        in the rounds that reach d and reject the chain token there, if the verifier takes it:
        reach(d) (1 - a_d) h tokens a round, h the siblings' measured hit rate; it pays while that
        share of the round's tokens exceeds its row's share of the round's cost (the measured node
        cost; none measured yet: no siblings). Deep positions are rarely reached, so the siblings
        stop where the gain falls under the cost. Where rows are nearly free (fp32 on AVX512, AMX,
        GPUs) the first positions get them; where a row costs a tenth of a step they do not."""
        if k <= 0:
            return 0
        measured = self.measured_costs()
        if measured is None:
            return 0
        tokens, cost = self.expected_tokens(k), self.cost(k, nodes_per_position, measured)
        hit, node = self.alternative_rate(), measured[1]
        positions, reach = 0, 1.0
        for rate in self.acceptance_rates(k):
            gain = reach * (1.0 - rate) * hit
            tokens, cost = tokens + gain, cost + node
            if tokens / cost <= (tokens - gain) / (cost - node) * (1 + self.alternatives_margin):
                break
            positions += 1
            reach *= rate
        return positions

    def record_alternatives(self, judged: bool, hit: bool) -> None:
        """One round with siblings: `judged` = the chain was rejected where a sibling stood."""
        if not judged and not hit:
            return
        self.alternative_judged = self.alternative_judged * self.forget + 1.0
        self.alternative_hits = self.alternative_hits * self.forget + float(hit)

    @property
    def timing_a_step(self) -> bool:
        """Still handing out the verifier-only rounds that time a step (no drafting yet)."""
        return self.step_rounds < self.measure_step_rounds

    def carry_costs_from(self, earlier: DraftLengthPolicy) -> None:
        """Start from what an earlier request of the same drafter set measured: step, tree-pass
        and drafting times are the machine's and the models', not the text's, so a new request need
        not spend its first rounds timing a step (three undrafted rounds: a tenth of a short reply).
        Acceptance stays this request's own. The samples were taken at the earlier request's
        context length; this request's own rounds replace them as they come (same window).
        Only from a request that timed at least half a window of tree passes: a short one (a
        warm-up) holds little more than the slow first passes of each new shape, and starting
        from those drafted less (the README prompt after an 8-token warm-up: 9-10 rounds for 19
        tokens instead of 8); the request then times its own steps as before."""
        if len(earlier.tree_times) < self.window // 2 or not earlier.step_times:
            return
        for mine, theirs in ((self.step_times, earlier.step_times), (self.tree_times, earlier.tree_times),
                             (self.draft_ratios, earlier.draft_ratios), (self.draft_spend, earlier.draft_spend)):
            mine.clear()
            mine.extend(theirs)
        self.step_rounds = earlier.step_rounds

    # ---- the loop's two calls ---------------------------------------------------
    def next_length(self, nodes_per_position: float = 1.0) -> int:
        self.rounds_seen += 1
        if self.timing_a_step:
            # round 1 holds the prompt prefill (untimed, and plain decoding pays it too); the
            # next ones time a verifier-only step
            return 0
        self.probing = False
        k = self.best_length(nodes_per_position)
        if k > 0:
            self.rounds_off = 0
            return k
        self.rounds_off += 1
        if self.rounds_off >= (self.probe_interval or self.probe_every):
            # re-measure: the text may have become predictable (e.g. the model starts copying)
            self.rounds_off = 0
            self.probing = True
            # shallow: a full-depth probe of a bad drafter costs ~1 + jump + max * c steps for ~1
            # token; if position 1 turns out good the model itself deepens the next drafts
            return min(self.probe_length, self.max_length)
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
        accepted; the verifier scored `tree_nodes` nodes (default: drafted_depth) in verify_seconds
        (0 = not timed, e.g. a round that included the prompt prefill)."""
        n = drafted_depth if tree_nodes is None else tree_nodes
        if self.probing and drafted_depth > 0:
            # back off exponentially only while the drafter is clearly bad: one probe is one
            # Bernoulli draw, and a drafter near break-even fails half of them, so doubling on
            # every failed probe switched good-enough drafters off for the rest of a request
            paid = accepted_length + 1 >= self.cost(drafted_depth, n / drafted_depth)
            interval = self.probe_interval or self.probe_every
            clearly_bad = self.acceptance(1) < self.backoff_below * max(self.cost(1, n / drafted_depth) - 1.0, 0.0)
            self.probe_interval = (min(2 * interval, self.max_probe_every) if not paid and clearly_bad
                                   else self.probe_every)
            self.probing = False
        if verify_seconds > 0 and n == 0:
            self.step_rounds += 1
            self.step_times.append(verify_seconds)
            if len(self.step_times) > self.window:
                self.step_times.popleft()
        elif verify_seconds > 0:
            self.tree_times.append((n, verify_seconds))
            if len(self.tree_times) > self.window:
                self.tree_times.popleft()
        if drafted_depth <= 0:
            return  # a verifier-only round says nothing about drafting
        self.reached = [r * self.forget for r in self.reached]
        self.accepted = [a * self.forget for a in self.accepted]
        for d in range(1, min(accepted_length + 1, drafted_depth, self.max_length) + 1):
            self.reached[d - 1] += 1.0
        for d in range(1, min(accepted_length, self.max_length) + 1):
            self.accepted[d - 1] += 1.0
        self.draft_rounds += 1
        if draft_seconds > 0 and self.draft_rounds > 1:
            self.draft_spend.append((draft_seconds, drafted_depth))
            if len(self.draft_spend) > self.window:
                self.draft_spend.popleft()
        # a neural drafter's first round also prefills the whole prompt into its own cache: a
        # one-off cost that must not count as per-token drafting cost (it would switch
        # speculation off for dozens of rounds)
        if verify_seconds > 0 and self.draft_rounds > 1:
            # in verifier-only steps, the unit of the whole model (a tree pass costs more than one)
            step = statistics.median(self.step_times) if self.step_times else verify_seconds
            self.draft_ratios.append(draft_seconds / (drafted_depth * step))
            if len(self.draft_ratios) > self.window:
                self.draft_ratios.popleft()


@dataclass
class TieredLengthPolicy:
    """Draft lengths for a drafter set that mixes costly drafters (an LM) with free ones (n-gram,
    suffix, prompt lookup): when the whole set does not pay, the free drafters alone may.

    One DraftLengthPolicy for the whole set and one for the free drafters alone, each fed only
    the rounds it handed out (verifier-only rounds feed both: they time a step). Each round the
    whole set's policy goes first, probes included; only when it says "plain decoding" does the
    free drafters' policy decide, and then only they draft (`free_only`). Without it one policy
    over the merged set switched the free drafters off with the LM: an early exit that did not
    pay on a summarization prompt stopped prompt lookup copying from it (1.05 tokens a step).
    The loop's other questions (rates, costs, the next best length) go to whichever tier drafted."""

    full: DraftLengthPolicy
    free: DraftLengthPolicy
    free_only: bool = False  # the last length handed out was the free tier's

    @property
    def active(self) -> DraftLengthPolicy:
        return self.free if self.free_only else self.full

    @property
    def probing(self) -> bool:
        """The last length handed out is the whole set's probe (the LM's re-measurement)."""
        return not self.free_only and self.full.probing

    def next_length(self, nodes_per_position: float = 1.0) -> int:
        k = self.full.next_length(nodes_per_position)
        self.free_only = False
        if k > 0 or self.full.timing_a_step:
            return k
        k = self.free.next_length(nodes_per_position)
        self.free_only = k > 0
        return k

    def record(self, drafted_depth: int, accepted_length: int, draft_seconds: float = 0.0,
               verify_seconds: float = 0.0, tree_nodes: int | None = None) -> None:
        if drafted_depth > 0:
            self.active.record(drafted_depth, accepted_length, draft_seconds, verify_seconds, tree_nodes)
            return
        for policy in (self.full, self.free):  # a step's time is the same for both
            policy.record(drafted_depth, accepted_length, draft_seconds, verify_seconds, tree_nodes)

    def acceptance_rates(self, upto: int | None = None) -> list[float]:
        return self.active.acceptance_rates(upto)

    def draft_seconds_per_position(self) -> float:
        return self.active.draft_seconds_per_position()

    def best_length(self, nodes_per_position: float = 1.0) -> int:
        return self.active.best_length(nodes_per_position)

    def measured_costs(self) -> tuple[float, float] | None:
        return self.active.measured_costs()

    def seconds_saved_per_token(self, k: int, nodes_per_position: float = 1.0) -> float:
        return self.active.seconds_saved_per_token(k, nodes_per_position)

    def alternative_positions(self, k: int, nodes_per_position: float = 1.0) -> int:
        return 0 if self.free_only else self.full.alternative_positions(k, nodes_per_position)

    def record_alternatives(self, judged: bool, hit: bool) -> None:
        self.full.record_alternatives(judged, hit)  # only the LM tier drafts them

    def carry_costs_from(self, earlier: TieredLengthPolicy) -> None:
        self.full.carry_costs_from(earlier.full)
        self.free.carry_costs_from(earlier.free)
