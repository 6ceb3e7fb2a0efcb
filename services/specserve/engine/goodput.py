"""Speculation that never loses under load: one draft-depth cap per shared verifier pass.

Alone, a request's own DraftLengthPolicy (cascade/draft_length.py) picks how deep to draft from
its acceptance and its measured costs. Under load that view is wrong twice over: calls that share
a pass are padded to the longest feed (models/batched.py), so one deep draft makes every call in
the pass cost that many rows; and the rows that speculation adds are bought from a pass whose
other rows are already paid for by plain tokens. vLLM configures this
(`num_speculative_tokens_per_batch_size`), TensorRT-LLM too (`draft_len_schedule`); here the
verifier measures it. It knows the pass it is about to run: the calls, each with the depth its
policy wants and that policy's per-position acceptance estimates; and it has measured what a
pass of R rows costs (PassCostModel). It picks the depth cap K of the pass that maximises the
pass's expected goodput

    G(K) = sum_i E_i(min(K, want_i)) / (T(B * max_i (1 + nodes_i(K))) + sum_i min(K, want_i) s_i)

(E_i(k) = 1 + sum_{d<=k} prod_{j<=d} a_ij expected tokens, T the measured pass time, B calls,
s_i call i's drafting seconds per position),
K = 0 (plain decoding of the whole batch) unless a deeper cap beats it, cuts every tree to depth
K (cutting a draft is lossless: the verifier just sees fewer candidates) and tells each call the
cap, so its next draft is no deeper. As the batch grows and rows stop being free, K shrinks to 0.
An unmeasured shape is extrapolated pessimistically, so a batch that only ever ran plain passes
would never learn that deeper ones are cheap (on a GPU they are): every `explore_every`-th shared
pass, PassPlanner raises the cap by one when that reaches rows no pass has measured yet.
A cap of 0 verifies no draft, so a capped request's acceptance estimates would freeze at
whatever capped it, and the cap would stay 0 for good even when the text turns predictable (a
model-free drafter's acceptance moves a lot within one answer). Its model-free drafters still
draft one position each capped round, unverified, and the token the verifier emits judges it
(`shadow_accepted`): for greedy this is exactly what verification would have accepted; for a
sampled rule and a one-hot draft, P(emitted == drafted) = p(drafted) is the acceptance rate.
Pure arithmetic, no I/O: engine/local.py's verifier feeds it what each pass measured.
"""

from __future__ import annotations

import bisect
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..tree.token_tree import ROOT, TokenTree

UNKNOWN_RATE = 0.5  # acceptance assumed for a call that sent no estimates (a static draft length)


def tokens_per_round(rates: Sequence[float]) -> float:
    """Expected tokens of a round drafting one position per rate (position 1 first): the bonus
    token, plus each position with the probability that it and every one before it are accepted."""
    total, survive = 1.0, 1.0
    for rate in rates:
        survive *= rate
        total += survive
    return total


def shadow_accepted(tree: TokenTree, emitted: Sequence[int]) -> tuple[int, int]:
    """(positions judged, positions accepted) of an unverified draft against the tokens the
    verifier then emitted: the draft's longest path that the emitted tokens follow."""
    judged = min(tree.max_depth if len(tree) else 0, len(emitted))
    node, accepted = ROOT, 0
    for token in emitted[:judged]:
        node = next((c for c in tree.children(node) if tree.tokens[c] == token), None)
        if node is None:
            break
        accepted += 1
    return judged, accepted


class PassCostModel:
    """Measured seconds of a verifier pass as a function of the rows it computes (B x padded feed).

    Rows are binned (exact up to 8, then powers of two apart) and each bin keeps the median of its
    recent passes: medians, because first passes of a new shape and load spikes are outliers.
    Between bins the time is interpolated, kept non-decreasing in rows; past the largest bin it is
    extrapolated with the slope of the last two bins, or, with one bin only, as proportional to
    rows: pessimistic, so an unmeasured shape is never assumed free."""

    def __init__(self, window: int = 16) -> None:
        self.window = window
        self._bins: dict[int, deque] = {}
        self._points: list[tuple[float, float]] | None = None  # cached until the next record

    @staticmethod
    def bin_of(rows: int) -> int:
        if rows <= 8:
            return max(rows, 1)
        edge = 8
        while edge * 2 <= rows:
            edge *= 2
        # two bins per octave: 8, 12, 16, 24, 32, 48, ...
        return edge if rows < edge * 3 // 2 else edge * 3 // 2

    def record(self, rows: int, seconds: float) -> None:
        if rows < 1 or seconds <= 0:
            return
        times = self._bins.setdefault(self.bin_of(rows), deque(maxlen=self.window))
        times.append((rows, seconds))
        self._points = None

    def points(self) -> list[tuple[float, float]]:
        """(median rows, median seconds) per bin, by rows, made non-decreasing in seconds."""
        if self._points is not None:
            return self._points
        out: list[tuple[float, float]] = []
        for key in sorted(self._bins):
            samples = self._bins[key]
            rows = statistics.median(r for r, _ in samples)
            seconds = statistics.median(s for _, s in samples)
            out.append((rows, max(seconds, out[-1][1]) if out else seconds))
        self._points = out
        return out

    def largest_rows(self) -> float:
        pts = self.points()
        return pts[-1][0] if pts else 0.0

    def seconds(self, rows: int) -> float | None:
        """Estimated seconds of a pass over `rows` rows; None before any pass was measured."""
        pts = self.points()
        if not pts:
            return None
        xs = [x for x, _ in pts]
        if rows <= xs[0]:
            return pts[0][1]
        i = bisect.bisect_left(xs, rows)
        if i < len(pts):
            (x0, y0), (x1, y1) = pts[i - 1], pts[i]
            return y0 + (y1 - y0) * (rows - x0) / (x1 - x0) if x1 > x0 else y1
        if len(pts) == 1:
            return pts[0][1] * rows / pts[0][0]
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
        slope = (y1 - y0) / (x1 - x0) if x1 > x0 else 0.0
        return y1 + max(slope, 0.0) * (rows - x1)


class CatchUpCost:
    """Seconds an LM drafter spends re-reading text it has not seen: learnt across requests (the
    loop keeps one per drafter set), because what matters most is a NEW request's first draft,
    which reads its whole prompt. Under load a capped stream's drafters sit out, so letting it
    draft again first costs this; a pass that weighs only per-position drafting time lets streams
    start LM drafting that the whole batch then waits through. Model-free drafters re-read
    nothing measurable, so their samples are ~0.

    Samples are the drafters' own compute seconds (DraftReply.seconds), never the wall time the
    loop waited: under load a draft call queues behind other streams' passes on the compute
    thread, and counting that queue as re-reading made a 50-token read look like 0.4 s (5x what
    it costs) and kept every stream's LM out for good. A round that read fewer than `min_tokens`
    unseen tokens is a normal round: it measures the per-position cost that a catch-up round's
    drafting positions are charged before the rest counts as re-reading."""

    def __init__(self, min_tokens: int = 16, window: int = 16) -> None:
        self.min_tokens = min_tokens  # fewer unseen tokens than this are part of a normal round
        self.rates: deque = deque(maxlen=window)  # re-reading seconds per unseen token
        self.per_position: deque = deque(maxlen=window)  # drafting seconds per position, normal rounds

    def record(self, seconds: float, unseen: int, depth: int = 0) -> None:
        """A drafting round whose LM drafters computed for `seconds`, first reading `unseen`
        tokens, then drafting `depth` positions."""
        if unseen < self.min_tokens:
            if depth > 0:
                self.per_position.append(max(seconds, 0.0) / depth)
            return
        drafting = depth * statistics.median(self.per_position) if self.per_position else 0.0
        self.rates.append(max(seconds - drafting, 0.0) / unseen)

    def seconds_for(self, unseen: int) -> float:
        if unseen < self.min_tokens or not self.rates:
            return 0.0
        return statistics.median(self.rates) * unseen

    def per_round(self, unseen: int, tokens_left: int, rates: Sequence[float]) -> float:
        """The re-read's seconds spread over the rounds the request has left at the acceptance
        `rates` of its drafts: paid once, it buys drafting for all of them. Weighed whole against
        one pass, no re-read of a prompt ever paid, so a stream whose LM once sat out never
        drafted again even where every later pass would have gained from it."""
        seconds = self.seconds_for(unseen)
        if seconds <= 0.0:
            return 0.0
        return seconds / rounds_left(tokens_left, rates)


def rounds_left(tokens_left: int, rates: Sequence[float]) -> float:
    """The drafting rounds a request has left at the acceptance `rates` of its drafts (>= 1)."""
    return max(1.0, tokens_left / tokens_per_round(rates))


@dataclass
class CallDemand:
    """What one call brings to a shared pass."""

    want: int  # the depth its own policy would draft if nothing capped it
    rates: Sequence[float] = ()  # its per-position acceptance estimates (position 1 first)
    nodes_by_depth: Sequence[int] = ()  # tree nodes at depth <= d, d = 1..tree depth
    nodes_per_position: float = 1.0  # for depths beyond the tree it sent (it was capped)
    # its drafting seconds per drafted position: counted as time the pass's batch waits, which is
    # true where drafters share the verifier's device and conservative where they do not
    draft_seconds: float = 0.0
    # if it drafts at all: its LM drafters re-reading what they have not seen, this pass's share
    # of it (CatchUpCost.per_round), spread over `catch_up_rounds` (the rounds the request has left;
    # 0 = not spread). The planner re-spreads it over the rounds that stay open (PassPlanner)
    catch_up_seconds: float = 0.0
    catch_up_rounds: float = 0.0

    def catch_up_share(self, open_rounds: float | None) -> float:
        """This pass's share of the catch-up if drafting stays open for `open_rounds` rounds after
        it (None = unknown: as the call spread it, over all the rounds it has left). A re-read
        buys drafting only until the LM falls behind again, at the next closed pass."""
        if open_rounds is None or self.catch_up_rounds <= 0:
            return self.catch_up_seconds
        return self.catch_up_seconds * self.catch_up_rounds / max(1.0, min(self.catch_up_rounds, open_rounds))

    def expected_tokens(self, k: int) -> float:
        fill = self.rates[-1] if self.rates else UNKNOWN_RATE  # past the estimates it sent
        return tokens_per_round([self.rates[d] if d < len(self.rates) else fill for d in range(min(k, self.want))])

    def feed(self, k: int) -> float:
        """Rows this call feeds with its draft cut to depth k (1 = the pending token alone)."""
        k = min(k, self.want)
        if k <= 0:
            return 1.0
        have = len(self.nodes_by_depth)
        if k <= have:
            return 1.0 + self.nodes_by_depth[k - 1]
        base = self.nodes_by_depth[-1] if have else 0
        return 1.0 + base + (k - have) * max(self.nodes_per_position, 1.0)


@dataclass
class CapChoice:
    cap: int  # deepest draft position the pass verifies (0 = plain decoding for the whole batch)
    goodput: float  # expected tokens per second of the pass at that cap
    plain_goodput: float
    values: list[float] = field(default_factory=list)  # G(K) for K = 0..max want


# What a cap K > 0 must beat plain decoding of the batch by. The model leaves out what a round costs
# beyond rows and drafting positions (thread hops, the loop's Python, a late stream's lone pass) and
# takes the calls' acceptance estimates at face value. Measured (BENCHMARKS.md section 7, Qwen 0.5B int8
# -> 1.5B fp32, 4 streams): caps opened at a predicted gain of a few % lost 12-20 % (0.88x and 0.80x of
# plain in two runs), where at 2 streams a predicted gain of ~20 % paid.
MIN_GAIN = 0.10


def choose_depth_cap(demands: Sequence[CallDemand], cost: PassCostModel, margin: float = MIN_GAIN,
                     open_rounds: float | None = None) -> CapChoice | None:
    """The goodput-maximising depth cap of a pass shared by `demands`; None when the cost model has
    no data yet (the calls are then verified as drafted). A cap K > 0 must beat plain decoding of
    the batch by `margin` (MIN_GAIN): noise in the cost model must not buy rows that do not pay.
    `open_rounds`: how long drafting has stayed open at this batch size (CallDemand.catch_up_share)."""
    if not demands:
        return None
    batch = len(demands)
    values: list[float] = []
    for k in range(max(d.want for d in demands) + 1):
        rows = batch * max(d.feed(k) for d in demands)
        seconds = cost.seconds(int(round(rows)))
        if seconds is None:
            return None
        seconds += sum(min(k, d.want) * d.draft_seconds + (d.catch_up_share(open_rounds) if min(k, d.want) > 0 else 0.0)
                       for d in demands)
        values.append(sum(d.expected_tokens(k) for d in demands) / seconds)
    best = 0
    for k in range(1, len(values)):
        if values[k] > values[best] * (1 + 1e-9) and values[k] > values[0] * (1 + margin):
            best = k
    return CapChoice(cap=best, goodput=values[best], plain_goodput=values[0], values=values)


class GoodputAudit:
    """Realised goodput of open (drafted) against closed (plain) shared passes, per batch size.

    The cap model (choose_depth_cap) predicts a pass's goodput from rows and drafting positions;
    it leaves out what else a drafted round costs (thread hops, the loop's Python, trees built and
    cut, passes that split) and takes the calls' acceptance estimates at face value. Measured on
    the Qwen pair at 4 streams, caps it opened at a predicted gain lost 12-20 %. The audit
    measures instead: tokens emitted over the wall seconds from one shared pass's start to the
    next's, for consecutive passes of the same sessions in the same mode (a transition interval
    mixes both and is left out). Where open passes realised less than closed ones at that batch
    size, by more than the tolerance and the standard error of both figures, the model's open cap
    is vetoed (an open pass's tokens swing with acceptance; vetoing on noise threw away gains of
    10 % in the fake-cost simulation). Each verdict is re-checked by a short stretch of the
    other mode, on an interval that doubles each time the verdict holds: what checking costs
    shrinks while the verdict is right, and a changed load is still found."""

    def __init__(self, window: int = 16, min_samples: int = 4, audit_every: int = 32, stretch: int = 4,
                 tolerance: float = 0.02, z: float = 1.0) -> None:
        self.window, self.min_samples, self.tolerance, self.z = window, min_samples, tolerance, z
        self.audit_every, self.stretch = audit_every, stretch
        self._samples: dict[tuple[int, bool], deque] = {}
        self._last: tuple[float, frozenset, bool, int] | None = None  # start, sessions, open, tokens
        self._passes: dict[int, int] = {}  # shared passes seen per batch size
        self._due: dict[int, int] = {}  # pass count at which the verdict is next re-checked
        self._every: dict[int, int] = {}
        self._stretch: dict[int, tuple[bool, int]] = {}  # batch -> (forced mode, passes left)
        self._verdict: dict[int, bool] = {}  # the last verdict per batch size: open pays

    def passed(self, started: float, session_ids: Sequence[str], opened: bool, tokens: int) -> None:
        """A pass started at `started` (seconds) with these sessions emitted `tokens`; `opened`:
        it verified at least one drafted position."""
        sessions = frozenset(session_ids)
        last = self._last
        if last is not None and last[1] == sessions and last[2] == opened and len(sessions) > 1 and started > last[0]:
            self._samples.setdefault((len(sessions), opened), deque(maxlen=self.window)).append(
                (last[3], started - last[0]))
        self._last = (started, sessions, opened, tokens)

    def rate(self, batch: int, opened: bool) -> tuple[float, float] | None:
        """Realised tokens per second of that mode at that batch size and the standard error of
        that figure (None: too few samples)."""
        samples = self._samples.get((batch, opened))
        if not samples or len(samples) < self.min_samples:
            return None
        rates = [t / s for t, s in samples]
        spread = statistics.stdev(rates) / len(rates) ** 0.5 if len(rates) > 1 else 0.0  # min_samples may be 1
        return sum(t for t, _ in samples) / sum(s for _, s in samples), spread

    def allow_open(self, batch: int) -> bool:
        """Whether a shared pass of `batch` calls may keep the model's open cap (asked only when
        the model opened one)."""
        passes = self._passes[batch] = self._passes.get(batch, 0) + 1
        forced = self._stretch.get(batch)
        if forced is not None:
            mode, left = forced
            if left > 1:
                self._stretch[batch] = (mode, left - 1)
            else:
                del self._stretch[batch]
            return mode
        open_rate, closed_rate = self.rate(batch, True), self.rate(batch, False)
        if open_rate is None and closed_rate is None:
            return True  # measure the model's choice first
        if open_rate is None or closed_rate is None:  # one mode unmeasured: a stretch of it
            self._stretch[batch] = (open_rate is None, self.stretch)
            return self.allow_open(batch)
        # open stands unless it lost by more than the tolerance and the noise of both figures
        # (acceptance makes an open pass's tokens vary a lot; a veto on noise throws away a gain)
        (open_mean, open_se), (closed_mean, closed_se) = open_rate, closed_rate
        loss = closed_mean * (1 - self.tolerance) - open_mean
        verdict = loss <= self.z * (open_se ** 2 + closed_se ** 2) ** 0.5
        if self._verdict.get(batch) != verdict:  # a new verdict: re-check it soon
            self._verdict[batch] = verdict
            self._every[batch] = self.audit_every
            self._due[batch] = passes + self.audit_every
        elif passes >= self._due.get(batch, 0):  # re-check the standing verdict, then wait longer
            self._every[batch] = 2 * self._every.get(batch, self.audit_every)
            self._due[batch] = passes + self.stretch + self._every[batch]
            self._stretch[batch] = (not verdict, self.stretch)
            return self.allow_open(batch)
        return verdict


class PassPlanner:
    """The verifier's side: its pass cost model, and the cap of each shared pass.

    Exploration: a cap only limits drafts the calls already made, and calls draft no deeper than
    the last cap they were told, so a batch held at cap K never shows what K + 1 costs. Every
    `explore_every`-th shared pass whose K + 1 would reach rows no pass has measured, the pass
    answers K + 1 (its calls draft one deeper) and the next pass lets that depth through once,
    which measures it.

    Open runs: a call's pending catch-up (its LM re-reading what it skipped) buys drafting until
    the next pass that closes, when the LM falls behind again. The planner measures, per batch
    size, how many consecutive shared passes stayed open (the last `run_window` runs) and charges a
    catch-up over that many rounds, not over all the rounds the request has left: at 8 streams on
    the Qwen pair caps closed again after a pass or two, and each such re-read (220-370 ms while
    the other streams waited) bought one round. Before any run at a batch size has ended, the
    call's own spread stands."""

    def __init__(self, explore_every: int = 16, memory_passes: int = 8, audit: bool = True,
                 run_window: int = 8) -> None:
        self.costs = PassCostModel()
        self.audit = GoodputAudit() if audit else None  # realised goodput: vetoes caps that did not pay
        self.vetoes = 0  # shared passes whose open cap the audit closed
        self.explore_every = explore_every
        self.shared_passes = 0
        self._let_through = -1  # the depth the next pass lets through (exploration), -1 = none
        # sessions of the last passes, and the last shared pass's cap: a call that has a pass to
        # itself while other sessions are active keeps that cap (sticky), because a deep lone pass
        # makes the others wait and desynchronises them, and then no pass is shared any more
        self._recent: deque = deque(maxlen=memory_passes)
        self.last_cap = -1  # the cap the last shared pass's calls were told (depth_cap's doc)
        self.explored = False  # the last shared cap was raised for exploration
        self._open_runs: dict[int, deque] = {}  # batch size -> lengths of its last ended open runs
        self._open_run: dict[int, int] = {}  # batch size -> length of the open run in progress
        self.run_window = run_window

    def saw(self, session_ids: Sequence[str]) -> None:
        """A pass ran with these sessions."""
        self._recent.append(frozenset(session_ids))

    def lone_cap(self, session_id: str, catch_up_seconds: float = 0.0) -> int:
        """The cap for a call alone in its pass: the last shared cap while other sessions are
        active (seen in the last passes), else none (-1). A call whose LM drafters would first
        catch up (catch_up_seconds > 0) gets 0 while others are active: the others would wait
        through that re-read, and only a shared pass weighs it against what drafting buys; also
        before any shared pass (no cap yet): streams that start together each prefill alone
        first, and each LM re-reading its prompt in turn held all the others."""
        others = set().union(*self._recent) - {session_id} if self._recent else set()
        if not others:
            return -1
        return 0 if catch_up_seconds > 0 else self.last_cap

    def passed(self, started: float, session_ids: Sequence[str], opened: bool, tokens: int) -> None:
        """What a pass emitted, for the realised-goodput audit (every pass, lone ones too: they
        break the chain of consecutive shared passes that the audit times)."""
        if self.audit is not None:
            self.audit.passed(started, session_ids, opened, tokens)

    def depth_cap(self, demands: Sequence[CallDemand]) -> int:
        """The depth a pass shared by `demands` verifies (-1 = none: no measurement yet). Its calls
        are told `last_cap` for their next round: the same, except on the pass that lets an
        explored depth through, where they are told the model's own cap."""
        self.shared_passes += 1
        self.explored = False
        batch = len(demands)
        choice = choose_depth_cap(demands, self.costs, open_rounds=self.open_rounds(batch))
        if choice is None:
            return -1
        told = choice.cap
        if told > 0 and self.audit is not None and not self.audit.allow_open(len(demands)):
            told, self.vetoes = 0, self.vetoes + 1  # open passes of this size realised less than plain ones
        # the pass after an exploration verifies the explored depth (that measures it), but its calls
        # are told the model's own cap: told the explored depth, every LM drafter of the batch caught
        # up on what it skipped to draft one round (8 streams, Qwen pair: all the open passes there)
        cap, self._let_through = max(told, self._let_through), -1
        if self.shared_passes % self.explore_every == 0 and cap < max(d.want for d in demands):
            rows = len(demands) * max(d.feed(cap + 1) for d in demands)
            if rows > self.costs.largest_rows():
                cap = told = self._let_through = cap + 1
                self.explored = True
        self.last_cap = told
        self._count_open_run(batch, told > 0)
        return cap

    def open_rounds(self, batch: int) -> float | None:
        """Mean length of the last ended runs of open shared passes of `batch` calls (None: none yet)."""
        runs = self._open_runs.get(batch)
        return statistics.mean(runs) if runs else None

    def _count_open_run(self, batch: int, opened: bool) -> None:
        run = self._open_run.get(batch, 0)
        if opened:
            self._open_run[batch] = run + 1
        elif run:
            self._open_runs.setdefault(batch, deque(maxlen=self.run_window)).append(run)
            self._open_run[batch] = 0
