"""Drafting ahead: the next round's draft is made while the verifier checks this one.

It pays only where drafters and verifier run on different devices (their own nodes, or at least
their own cores); on one shared CPU it takes cycles the verifier needs. One interface, two
strategies; the decode loop calls `start` as it sends a verify call and `take` when the reply is
in, and drafts the next round itself (with `fallback_drafters`) when `take` has nothing:

* FullAcceptanceBet (`overlap_drafting=True`): the drafters draft from the committed text + the
  whole chain, one token deeper, betting that everything is accepted; the draft is kept only if
  it was and the drafter's first token is the verifier's bonus token. Hit rate ~alpha^(k+1).
* EnumerateAndSelect (SSD/Saguaro, SGLang's decoupled drafting): one LM drafter builds the next
  round for the LIKELY OUTCOMES of this verification: for each end e of the draft being verified
  (where the accepted path may stop: before the first token, or at any node of any branch; for a
  chain, each accept length k = 0..K) its top-F_e guesses of the bonus token (never a child's
  token, which would have been accepted), each continued as one batched tree decode
  (LMDrafter.propose_ahead). The fan-out follows the measured acceptance: F_e proportional to
  P(the path ends at e)^(1/(1+r)), at least one unit for full acceptance of the primary branch.
  When the reply (accepted path, bonus) arrives the matching unit is the next draft at once, and
  the model-free drafters draft beside it from the real text (`companion_drafters`: a suffix
  match is free and often long); on a miss (or a stale, late or failed build) the build is
  stopped and the next round drafts synchronously (`miss_drafters`: every drafter, or the
  model-free ones only), never with a draft made for another context. The first round overlaps
  the two prefills: it goes to the verifier drafted by the model-free drafters only, and the
  build reads the prompt on the drafter's compute while the verifier reads it on its own (a
  synchronous LM draft would make the verifier wait for that read).

Lossless: a unit is a proposal drawn from the drafter's law given exactly the text the verifier
committed (its stamp and its (end, bonus) key say which), with its rows, so every acceptance rule
treats it as any other draft. Only the timing changes, never the output law.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..sampling.params import SamplingParams
from ..tree.token_tree import ROOT, Coupling, TokenTree
from .merge import subtree_after
from .workers import AheadCall, DraftCall, DrafterBackend, VerifyReply

log = logging.getLogger(__name__)


@dataclass
class AheadContext:
    """What a strategy knows when the round's verify call goes out."""

    session_id: str
    committed: list[int]  # the text before this round
    tree: TokenTree  # what the verifier checks now
    round_index: int
    seed: int  # already mixed for drafting ahead (its own RNG stream)
    sampling: SamplingParams
    rule: str
    coupling: Coupling
    next_depth: int  # how deep the next round would draft
    accept_rates: Sequence[float]  # the policy's per-position acceptance estimates
    drafters: Sequence[DrafterBackend]
    draft_all: Callable[[Sequence[DrafterBackend], DraftCall], Awaitable[list[TokenTree]]]
    min_confidence: float = 0.0  # the loop's confidence stop for chains (DraftCall.min_confidence)

    @property
    def stamp(self) -> str:
        """(session, committed length, generation): a build answers exactly one round."""
        return f"{self.session_id}:{len(self.committed)}:{self.round_index}"


@dataclass
class AheadBuild:
    task: asyncio.Task
    stamp: str
    # the enumerated draft's ends by their accepted tokens: () -> 0 (nothing accepted), the path
    # to node i -> 1 + i (keyed by tokens, not node ids: a depth cap may renumber the tree)
    ends: dict[tuple[int, ...], int] = field(default_factory=dict)
    units: int = 0
    tokens: int = 0
    sized: bool = True  # planned by the build budget (so its time is recorded into it)
    started: float = field(default_factory=time.perf_counter)


@dataclass
class AheadOutcome:
    trees: list[TokenTree]  # the next round's drafts; empty = draft as usual
    status: str  # "hit" | "miss" | "late" | "stale" | "failed"


class DraftingAhead(Protocol):
    name: str

    def start(self, ctx: AheadContext) -> AheadBuild | None: ...

    async def take(self, build: AheadBuild, ctx: AheadContext, reply: VerifyReply,
                   verify_seconds: float) -> AheadOutcome: ...

    def fallback_drafters(self, drafters: Sequence[DrafterBackend], unseen: int) -> list[DrafterBackend]:
        """Who drafts a round that no build answered (a miss, or the first round), synchronously;
        `unseen`: committed tokens the drafters have not read yet (the whole prompt at first)."""
        ...

    def companion_drafters(self, drafters: Sequence[DrafterBackend]) -> list[DrafterBackend]:
        """Who drafts beside a build's draft in the round it answered, from the real text (the
        drafters that answer at once; none where the build drafted with all of them)."""
        ...


def _cancel(task: asyncio.Task) -> None:
    task.cancel()  # a no-op once done
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" warning


class FullAcceptanceBet:
    """Bet on full acceptance of a chain (module doc)."""

    name = "full-acceptance"

    def start(self, ctx: AheadContext) -> AheadBuild | None:
        tree = ctx.tree
        if not len(tree) or not tree.is_chain() or ctx.next_depth <= 0:
            return None
        call = DraftCall(
            session_id=ctx.session_id,
            committed=[*ctx.committed, *tree.tokens],
            num_tokens=ctx.next_depth + 1,  # + the guess of the bonus token
            sampling=ctx.sampling,
            seed=ctx.seed,
            coupling=ctx.coupling,
            rule=ctx.rule,
            min_confidence=ctx.min_confidence,
        )
        return AheadBuild(asyncio.ensure_future(ctx.draft_all(ctx.drafters, call)), ctx.stamp)

    async def take(self, build: AheadBuild, ctx: AheadContext, reply: VerifyReply,
                   verify_seconds: float) -> AheadOutcome:
        if len(reply.path) != len(ctx.tree) or len(reply.tokens) != len(ctx.tree) + 1:
            _cancel(build.task)  # the bet lost: the next round drafts from the real text
            return AheadOutcome([], "miss")
        bonus = reply.tokens[-1]
        trees = [t for t in (subtree_after(x, bonus) for x in await build.task) if t is not None and len(t)]
        return AheadOutcome(trees, "hit" if trees else "miss")

    def fallback_drafters(self, drafters: Sequence[DrafterBackend], unseen: int) -> list[DrafterBackend]:
        return list(drafters)

    def companion_drafters(self, drafters: Sequence[DrafterBackend]) -> list[DrafterBackend]:
        return []  # every drafter drafted the bet


def outcome_probabilities(accept_rates: Sequence[float], parents: Sequence[int]) -> list[float]:
    """P(the verifier's accepted path ends at e) for every end e of a draft tree: e = 0 nothing
    accepted, e = 1 + i the path ends at node i (`parents[i]`: node i's parent, -1 the root; nodes
    in topological order). A node at depth d is reached with its parent's probability times a_d,
    times (1 - a_d) per earlier sibling (the first child is the primary drafter's; a later one is
    right only where the ones before it were not). For a chain: P(k* = k) = prod_{j<=k} a_j (1 - a_{k+1})."""
    def rate(depth: int) -> float:
        if depth - 1 < len(accept_rates):
            return accept_rates[depth - 1]
        return accept_rates[-1] if accept_rates else 0.5

    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]  # by end index
    depth, reach = [0] * len(parents), [0.0] * len(parents)
    for node, parent in enumerate(parents):
        siblings = children[parent + 1]
        depth[node] = 1 if parent < 0 else depth[parent] + 1
        a = rate(depth[node])
        reach[node] = (1.0 if parent < 0 else reach[parent]) * a * (1 - a) ** len(siblings)
        siblings.append(node)
    return [max((1.0 if e == 0 else reach[e - 1]) - sum(reach[c] for c in children[e]), 0.0)
            for e in range(len(parents) + 1)]


def chain_parents(length: int) -> list[int]:
    return list(range(-1, length - 1))


def allocate_fanout(accept_rates: Sequence[float], chain_length: int, units: int, r: float = 1.0,
                    parents: Sequence[int] | None = None) -> list[int]:
    """Units per end e of the draft being verified (outcome_probabilities; for a chain, per accept
    length k = 0..chain_length): proportional to P(e)^(1/(1+r)) (largest remainders); the full
    acceptance of the primary branch (first children from the root: the chain's end) always gets
    at least one unit (its bonus is the drafter's own next token). `parents`: the tree's shape
    (default: a chain of `chain_length`)."""
    parents = chain_parents(chain_length) if parents is None else list(parents)
    if units <= 0:
        return [0] * (len(parents) + 1)
    probs = outcome_probabilities(accept_rates, parents)
    weights = [max(p, 1e-6) ** (1 / (1 + r)) for p in probs]
    budget = units - 1  # one is reserved for full acceptance of the primary branch
    shares = [budget * w / sum(weights) for w in weights]
    fanout = [math.floor(s) for s in shares]
    for e in sorted(range(len(shares)), key=lambda e: shares[e] - fanout[e], reverse=True)[: budget - sum(fanout)]:
        fanout[e] += 1
    primary = 0  # end index of the primary branch's leaf
    while (first := next((i for i, p in enumerate(parents) if p == primary - 1), None)) is not None:
        primary = first + 1
    fanout[primary] += 1
    return fanout


class BuildBudget:
    """How wide and deep a build can be and still be ready when the verifier answers.

    A build is one forward over the chain plus one per continuation token, each over all its units
    at once, so it costs (tokens + 1) steps of a width-U batch. Measured per width: seconds per
    step (EMA), and the verification window it must fit under (EMA). `plan` picks the widest U
    (up to the maximum) whose steps fit `fit` x window with the depth wanted (at least
    `min_tokens` of it), else the best it can. An unmeasured width is assumed to cost like the
    nearest measured narrower one scaled by the width ratio (pessimistic), or the same as a wider one."""

    def __init__(self, max_units: int, fit: float = 0.9, min_tokens: int = 2, smoothing: float = 0.3) -> None:
        self.max_units = max_units
        self.fit = fit
        self.min_tokens = min_tokens
        self.smoothing = smoothing
        self.step_seconds: dict[int, float] = {}
        self.window: float | None = None

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def record(self, units: int, tokens: int, build_seconds: float, window_seconds: float) -> None:
        if units > 0 and build_seconds > 0:
            self.step_seconds[units] = self._ema(self.step_seconds.get(units), build_seconds / (tokens + 1))
        if window_seconds > 0:
            self.window = self._ema(self.window, window_seconds)

    def step(self, units: int) -> float | None:
        if units in self.step_seconds:
            return self.step_seconds[units]
        narrower = [u for u in self.step_seconds if u < units]
        if narrower:
            u = max(narrower)
            return self.step_seconds[u] * units / u
        wider = [u for u in self.step_seconds if u > units]
        return self.step_seconds[min(wider)] if wider else None

    def plan(self, want_tokens: int) -> tuple[int, int]:
        """(units, tokens) for the next build."""
        if self.window is None or not self.step_seconds:
            return self.max_units, want_tokens  # nothing measured yet
        best = (1, 1)
        for units in range(self.max_units, 0, -1):
            step = self.step(units)
            tokens = min(want_tokens, int(self.fit * self.window / step) - 1) if step else want_tokens
            if tokens >= min(want_tokens, self.min_tokens):
                return units, tokens
            best = max(best, (units, tokens), key=lambda p: p[1]) if tokens >= 1 else best
        return best


def draft_ends(tree: TokenTree) -> tuple[list[int], list[int], dict[tuple[int, ...], int]]:
    """The draft as an AheadCall sends it (tokens, parents by index, -1 the root; ctx.tree's
    node order is topological) and its ends keyed by the tokens accepted to reach them."""
    tokens, parents = list(tree.tokens), [p if p != ROOT else -1 for p in tree.parents]
    ends = {(): 0}
    for node in range(len(tree)):
        ends[tuple(tree.tokens[n] for n in tree.path_to(node))] = node + 1
    return tokens, parents, ends


class EnumerateAndSelect:
    """Enumerate the verifier's likely outcomes, draft for each, select the one that happened
    (module doc). `units`: branches built per round (the batched decode's width); `r`: how
    strongly the fan-out favours likely accept lengths (0 = proportional); `max_wait_fraction`:
    how long after the verify reply a build still in progress may take, as a fraction of the
    verification time, before the round goes on without it. Builds are sized to be ready in
    time (BuildBudget): narrower and shallower where the drafter is slow against the verifier
    (`sized=False`: always `units` wide and as deep as asked, e.g. where drafter and verifier share
    one compute thread and a build can only follow the verification). `miss_drafters`: who drafts
    a round no build answered: "all" (the LM too, synchronously: it has only this round's few
    tokens to read, and its chain is worth more than the model-free drafters' alone) or "instant"
    (the model-free drafters only: the verifier never waits for the LM). Either way a round whose
    drafters would first read more than `max_sync_read` unseen tokens (the prompt, in the first
    round) drafts with the instant ones: the build reads that text during the verification."""

    name = "enumerate-select"
    MISS_DRAFTERS = ("all", "instant")

    def __init__(self, units: int = 8, r: float = 1.0, max_wait_fraction: float = 0.25, sized: bool = True,
                 miss_drafters: str = "all", max_sync_read: int = 16) -> None:
        if miss_drafters not in self.MISS_DRAFTERS:
            raise ValueError(f"enumerate-select: miss_drafters must be one of {self.MISS_DRAFTERS}, not {miss_drafters!r}")
        self.units = units
        self.r = r
        self.max_wait_fraction = max_wait_fraction
        self.sized = sized
        self.miss_drafters = miss_drafters
        self.max_sync_read = max_sync_read
        self.budget = BuildBudget(units)

    @staticmethod
    def builder(drafters: Sequence[DrafterBackend]) -> DrafterBackend | None:
        return next((d for d in drafters if getattr(d, "can_draft_ahead", False)), None)

    def start(self, ctx: AheadContext) -> AheadBuild | None:
        builder = self.builder(ctx.drafters)
        if builder is None or ctx.next_depth <= 0:
            return None
        chain, parents, ends = draft_ends(ctx.tree)  # every branch: any of them may be accepted
        # the first round's verification reads the prompt: a window far longer than a decode step's,
        # and not the one the budget measures (so it is neither sized by it nor recorded into it)
        sized = self.sized and ctx.round_index > 0
        units, tokens = self.budget.plan(ctx.next_depth) if sized else (self.units, ctx.next_depth)
        call = AheadCall(
            session_id=ctx.session_id,
            committed=list(ctx.committed),
            chain=chain,
            parents=[] if ctx.tree.is_chain() else parents,
            fanout=allocate_fanout(ctx.accept_rates, len(chain), units, self.r, parents),
            num_tokens=tokens,
            sampling=ctx.sampling,
            seed=ctx.seed,
            stamp=ctx.stamp,
            rule=ctx.rule,
            # the budget's size is an estimate; the deadline makes a build that runs slow return
            # shallower but in time, instead of late and useless (`take` waits only so long)
            deadline_s=self.deadline_s() if sized else 0.0,
        )
        return AheadBuild(asyncio.ensure_future(builder.draft_ahead(call)), ctx.stamp, ends, units, tokens,
                          sized=sized)

    def deadline_s(self) -> float:
        """How long a build may continue: the measured verification window and half the grace
        `take` gives after the reply (0 = no deadline: unsized builds, or nothing measured yet)."""
        window = self.budget.window
        return window * (1 + self.max_wait_fraction / 2) if self.sized and window else 0.0

    async def take(self, build: AheadBuild, ctx: AheadContext, reply: VerifyReply,
                   verify_seconds: float) -> AheadOutcome:
        end = build.ends.get(tuple(reply.tokens[:-1])) if reply.tokens else None
        if end is None or len(reply.tokens) != len(reply.path) + 1:
            _cancel(build.task)  # an outcome the build did not enumerate
            return AheadOutcome([], "miss")
        bonus = reply.tokens[-1]
        if not build.task.done():  # a little late is still worth it; much later is not
            await asyncio.wait({build.task}, timeout=self.max_wait_fraction * verify_seconds)
            if not build.task.done():
                _cancel(build.task)
                if build.sized:  # at least this long: enough for the budget to size the next builds down
                    self.budget.record(build.units, build.tokens, time.perf_counter() - build.started, verify_seconds)
                return AheadOutcome([], "late")
        if build.task.cancelled() or build.task.exception() is not None:
            if not build.task.cancelled():
                log.warning("drafting ahead failed (this round drafts without it): %r", build.task.exception())
            return AheadOutcome([], "failed")
        result = build.task.result()
        # as deep as it got (a deadline may have stopped it short of the planned depth)
        built = max((len(unit.tree) for unit in result.units), default=build.tokens)
        if build.sized:
            self.budget.record(build.units, built, result.seconds, verify_seconds)
        if result.stamp != build.stamp:  # never a draft made for another round's text
            return AheadOutcome([], "stale")
        for unit in result.units:
            if unit.accepted == end and unit.bonus == bonus and len(unit.tree):
                return AheadOutcome([unit.tree], "hit")
        return AheadOutcome([], "miss")

    def fallback_drafters(self, drafters: Sequence[DrafterBackend], unseen: int) -> list[DrafterBackend]:
        """A round no build answered: every drafter where the LM has little to read (class doc),
        else the drafters that answer at once (everything but the LM builder)."""
        if self.miss_drafters == "all" and unseen <= self.max_sync_read:
            return list(drafters)
        return self.companion_drafters(drafters)

    def companion_drafters(self, drafters: Sequence[DrafterBackend]) -> list[DrafterBackend]:
        """The drafters that answer at once: everything but the LM builder."""
        builder = self.builder(drafters)
        return [d for d in drafters if d is not builder]


STRATEGIES = {"full-acceptance": FullAcceptanceBet, "enumerate-select": EnumerateAndSelect}


def make_strategy(name: str | None, **options) -> DraftingAhead | None:
    """A strategy by name ("full-acceptance", "enumerate-select"; None or "" = no drafting ahead),
    with its constructor's options."""
    if not name:
        return None
    if name not in STRATEGIES:
        raise ValueError(f"drafting ahead: unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
    return STRATEGIES[name](**options)
