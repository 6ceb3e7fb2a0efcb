"""The load policy (engine/goodput.py): one depth cap per shared verifier pass.

* PassCostModel: binned medians, monotone interpolation, pessimistic extrapolation.
* choose_depth_cap: deep where rows are free, 0 where they are not.
* A deterministic fake-cost simulation of B streams in lockstep through the real per-request
  DraftLengthPolicy and the real cap: speculative goodput never below plain batched decoding's
  (by more than 3 %), for CPU-, compute-bound- and GPU-shaped pass costs; without the cap the
  same simulation loses to plain (the test can fail).
* GoodputAudit: with a per-round cost the cap model cannot see, the model's open caps lose to
  plain and the realised-goodput audit vetoes them; acceptance noise alone is no veto.
* The verifier (tiny fp32 model): trees are cut to the cap, replies carry it, and concurrent
  greedy generations under caps still equal plain greedy token for token.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from collections import deque

import pytest

from specserve.cascade.draft_length import DraftLengthPolicy
from specserve.engine import GenerationRequest
from specserve.engine.goodput import (CallDemand, CatchUpCost, GoodputAudit, PassCostModel, PassPlanner,
                                      choose_depth_cap, rounds_left)
from specserve.engine.local import LocalDrafter, LocalVerifier
from specserve.engine.loop import DecodeLoop
from specserve.engine.workers import DraftCall, DraftReply
from specserve.models.drafters import LMDrafter
from specserve.models.ngram import PromptLookupDrafter
from specserve.sampling.params import SamplingParams
from specserve.tree.token_tree import TokenTree

from test_engine import twin_lm, verifier_lm  # noqa: F401 - fixtures
from test_models import random_ids
from test_verify_batching import chain, greedy_call, lm  # noqa: F401 - fixture

# pass seconds by rows, in units of a one-row step
CURVES = {
    "cpu-avx2": lambda rows: 1.0 + 0.08 * (rows - 1),  # measured here: 1 + 8 rows = 1.63 steps
    "compute-bound": lambda rows: max(1.0, rows / 4),  # rows free up to 4, then linear
    "gpu": lambda rows: 1.0 + 0.002 * rows,  # rows nearly free
}


def fitted(curve, rows=(1, 2, 4, 8, 16, 32, 64, 128, 256)) -> PassCostModel:
    model = PassCostModel()
    for r in rows:
        model.record(r, curve(r))
    return model


class FixedCost(PassCostModel):
    """A cost model that ignores measurements: the curve it is given is the truth."""

    def __init__(self, curve) -> None:
        super().__init__()
        self.curve = curve

    def record(self, rows: int, seconds: float) -> None:
        pass

    def seconds(self, rows: int) -> float:
        return self.curve(rows)


# ---- the cost model ---------------------------------------------------------------------------


def test_pass_cost_model_interpolates_medians_and_stays_monotone():
    model = PassCostModel()
    assert model.seconds(4) is None
    for seconds in (1.0, 1.1, 9.0):  # one outlier: the median ignores it
        model.record(1, seconds)
    model.record(8, 2.0)
    assert model.seconds(1) == pytest.approx(1.1)
    assert model.seconds(4) == pytest.approx(1.1 + (2.0 - 1.1) * 3 / 7)
    model.record(5, 0.5)  # a faster bigger pass (noise) never makes rows cheaper than fewer rows
    assert model.seconds(5) >= model.seconds(4) >= model.seconds(1)


def test_pass_cost_model_extrapolates_pessimistically():
    model = PassCostModel()
    model.record(4, 2.0)
    assert model.seconds(16) == pytest.approx(8.0)  # one bin: proportional to rows
    model.record(8, 3.0)
    assert model.seconds(16) == pytest.approx(3.0 + 0.25 * 8)  # the last segment's slope
    assert model.seconds(1) == pytest.approx(2.0)


def test_bins_are_exact_then_two_per_octave():
    assert [PassCostModel.bin_of(r) for r in (1, 7, 8, 9, 12, 15, 16, 23, 24, 40, 100)] == [
        1, 7, 8, 8, 12, 12, 16, 16, 24, 32, 96]


# ---- the cap ------------------------------------------------------------------------------------


def chain_demand(want: int, rate: float) -> CallDemand:
    return CallDemand(want=want, rates=[rate] * want, nodes_by_depth=list(range(1, want + 1)))


def test_cap_is_deep_where_rows_are_free_and_zero_where_they_are_not():
    free = choose_depth_cap([chain_demand(8, 0.8)] * 8, fitted(CURVES["gpu"]))
    assert free.cap == 8
    dear = choose_depth_cap([chain_demand(8, 0.5)] * 8, fitted(CURVES["compute-bound"]))
    assert dear.cap == 0 and dear.goodput == dear.plain_goodput


def test_cap_shrinks_as_the_batch_grows():
    costs = fitted(CURVES["cpu-avx2"])
    caps = [choose_depth_cap([chain_demand(8, 0.5)] * b, costs).cap for b in (1, 2, 4, 8, 16)]
    assert caps == sorted(caps, reverse=True) and caps[0] > 0 and caps[-1] == 0, caps


def test_one_deep_draft_pays_for_the_padding_of_the_whole_batch():
    """Seven plain calls and one request that copies text (acceptance 0.95): padding makes its
    depth cost 8 rows per position, which pays on a GPU-shaped curve and not on a compute-bound one."""
    demands = [CallDemand(want=0)] * 7 + [chain_demand(8, 0.95)]
    assert choose_depth_cap(demands, fitted(CURVES["gpu"])).cap == 8
    assert choose_depth_cap(demands, fitted(CURVES["compute-bound"])).cap == 0


def test_drafting_time_counts_against_depth():
    """Free rows do not make a slow drafter pay: with 0.5 steps of drafting per position (an LM
    drafter on the verifier's device) and acceptance 0.5, the cap is 0."""
    slow = [CallDemand(want=8, rates=[0.5] * 8, nodes_by_depth=list(range(1, 9)), draft_seconds=0.5)] * 4
    assert choose_depth_cap(slow, fitted(CURVES["gpu"])).cap == 0
    assert choose_depth_cap([chain_demand(8, 0.5)] * 4, fitted(CURVES["gpu"])).cap > 0


def test_no_cap_before_anything_was_measured():
    assert choose_depth_cap([chain_demand(4, 0.9)] * 2, PassCostModel()) is None


def test_a_call_that_said_nothing_is_assumed_at_half_acceptance():
    said_nothing = CallDemand(want=3, nodes_by_depth=[1, 2, 3])
    assert said_nothing.expected_tokens(3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert said_nothing.feed(5) == 4  # never deeper than it wants


def test_a_capped_call_is_costed_as_if_it_drafted_what_it_wants():
    capped = CallDemand(want=6, rates=[0.9] * 6, nodes_by_depth=[1, 2], nodes_per_position=1.0)
    assert capped.feed(2) == 3 and capped.feed(6) == 7


# ---- deterministic fake-cost simulation: never worse than plain -------------------------------


def simulate(batch: int, alpha: float, curve, caps: bool = True, rounds: int = 400, seed: int = 0,
             hidden: float = 0.0, audit: bool = True) -> float:
    """Aggregate tokens per unit time of `batch` streams in lockstep (a saturated continuous
    batcher: every round all streams share one pass). Each stream's draft is accepted position by
    position with probability alpha; pass time is curve(rows), rows = batch x padded feed, plus
    `hidden` for a pass that verifies any drafted position: a cost of drafted rounds that the
    pass cost model never sees (thread hops, tree building), which only the audit can catch."""
    rng = random.Random(seed)
    policies = [DraftLengthPolicy(16) for _ in range(batch)]
    planner = PassPlanner(audit=audit)
    sessions = [str(i) for i in range(batch)]
    hints = [-1] * batch
    tokens, clock = 0, 0.0
    for _ in range(rounds):
        wants = [p.next_length() for p in policies]
        depths = [min(w, h) if h >= 0 else w for w, h in zip(wants, hints)]
        cap = -1
        if caps and batch > 1:
            demands = [CallDemand(want=w, rates=[p.acceptance(d) for d in range(1, w + 1)],
                                  nodes_by_depth=list(range(1, d + 1))) for w, d, p in zip(wants, depths, policies)]
            cap = planner.depth_cap(demands)
        verified = [min(d, cap) if cap >= 0 else d for d in depths]
        rows = batch * (1 + max(verified))
        seconds = curve(rows)
        planner.costs.record(rows, seconds)
        started = clock
        clock += seconds + (hidden if max(verified) > 0 else 0.0)
        emitted = tokens
        for i, policy in enumerate(policies):
            accepted = 0
            while accepted < verified[i] and rng.random() < alpha:
                accepted += 1
            tokens += accepted + 1
            policy.record(verified[i], accepted, 0.0, seconds, verified[i])
            hints[i] = cap
        if batch > 1:
            planner.passed(started, sessions, max(verified) > 0, tokens - emitted)
    return tokens / clock


@pytest.mark.parametrize("curve", sorted(CURVES))
@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("batch", [1, 2, 4, 8])
def test_speculation_under_load_never_loses_to_plain_batched_decoding(batch, alpha, curve):
    plain = batch / CURVES[curve](batch)
    speculative = simulate(batch, alpha, CURVES[curve])
    assert speculative >= 0.97 * plain, (speculative, plain)


def test_where_rows_are_free_speculation_still_pays_at_eight_streams():
    assert simulate(8, 0.8, CURVES["gpu"]) >= 2.0 * 8 / CURVES["gpu"](8)


def test_without_the_cap_speculation_loses_under_load():
    """Negative control: the per-request policy alone (no cap) loses to plain at 8 streams on a
    compute-bound curve, so the test above can fail."""
    curve = CURVES["compute-bound"]
    assert simulate(8, 0.5, curve, caps=False) < 0.9 * 8 / curve(8)


# ---- the realised-goodput audit -----------------------------------------------------------------

HIDDEN_LOSSES = [("gpu", 8, 0.2), ("gpu", 4, 0.2), ("gpu", 2, 0.2), ("cpu-avx2", 2, 0.5), ("compute-bound", 2, 0.8)]


@pytest.mark.parametrize("curve,batch,alpha", HIDDEN_LOSSES)
def test_a_round_cost_the_model_cannot_see_is_caught_by_the_audit(curve, batch, alpha):
    """One step of per-round cost on every drafted pass (the model prices rows and drafting
    only): the model's caps lose 14-38 % to plain, the audit brings it back within 5 %."""
    plain = batch / CURVES[curve](batch)
    blind = statistics.mean(simulate(batch, alpha, CURVES[curve], hidden=1.0, audit=False, seed=s) for s in range(3))
    audited = statistics.mean(simulate(batch, alpha, CURVES[curve], hidden=1.0, seed=s) for s in range(3))
    assert blind < 0.87 * plain, (blind, plain)  # the case is real: without the audit it loses
    assert audited >= 0.95 * plain, (audited, blind, plain)


@pytest.mark.parametrize("curve", sorted(CURVES))
@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_the_audit_keeps_most_of_what_open_passes_gain(curve, alpha):
    """Where drafting pays (no hidden cost), the audit's re-check stretches of plain passes cost
    little of the gain; acceptance noise does not make it veto a cap that pays."""
    for batch in (2, 4):
        plain = batch / CURVES[curve](batch)
        blind = simulate(batch, alpha, CURVES[curve], audit=False)
        if blind < 1.05 * plain:
            continue  # nothing to keep
        audited = simulate(batch, alpha, CURVES[curve])
        assert audited - plain >= 0.9 * (blind - plain), (batch, audited, blind, plain)


def feed(audit: GoodputAudit, passes, sessions=("a", "b"), start: float = 0.0) -> float:
    """Consecutive shared passes of (opened, tokens, seconds); returns the clock after them."""
    clock = start
    for opened, tokens, seconds in passes:
        audit.passed(clock, sessions, opened, tokens)
        clock += seconds
    return clock


def test_the_audit_times_consecutive_passes_of_one_mode_and_skips_transitions():
    audit = GoodputAudit(min_samples=2)
    feed(audit, [(True, 6, 2.0)] * 3 + [(False, 2, 1.0)] * 3 + [(True, 6, 2.0)])
    assert audit.rate(2, True) == (3.0, 0.0)  # 2 samples; the open pass after the closed ones not yet
    assert audit.rate(2, False) == (2.0, 0.0)  # the open -> closed transition's interval left out
    assert audit.rate(4, True) is None  # another batch size: unmeasured


def test_a_different_session_set_breaks_the_chain():
    audit = GoodputAudit(min_samples=1)
    clock = feed(audit, [(True, 6, 2.0)], sessions=("a", "b"))
    feed(audit, [(True, 6, 2.0)], sessions=("a", "c"), start=clock)
    assert audit.rate(2, True) is None


def test_the_audit_vetoes_open_passes_that_realised_less_and_rechecks_later():
    audit = GoodputAudit(min_samples=3, audit_every=8, stretch=4)
    clock = feed(audit, [(True, 3, 2.0)] * 5)  # open: 1.5 tokens/s
    assert audit.allow_open(2) is False  # closed unmeasured: a stretch of plain passes first
    clock = feed(audit, [(False, 2, 1.0)] * 5, start=clock)  # closed: 2 tokens/s
    answers = "".join("T" if audit.allow_open(2) else "F" for _ in range(40))
    # the plain stretch ends (3 left), the veto holds 8 passes, a 4-pass open re-check; the veto
    # stands, so the next re-check waits twice as long (16 passes less the stretch just run)
    assert answers == "F" * 3 + "F" * 8 + "T" * 4 + "F" * 15 + "T" * 4 + "F" * 6, answers


def test_a_loss_inside_the_noise_is_no_veto():
    """Open passes whose tokens swing with acceptance (2.29 a pass against closed 2.4: 5 % less,
    inside its standard error of 0.42): no veto. Without the noise term it would be one."""
    audit = GoodputAudit(min_samples=4)
    clock = feed(audit, [(True, t, 1.0) for t in (1, 3, 2, 4, 1, 3, 2, 3)])
    feed(audit, [(False, 2.4, 1.0)] * 6, start=clock)
    assert all(audit.allow_open(2) for _ in range(20))


# ---- the verifier -----------------------------------------------------------------------------


def deep_calls(n: int) -> list:
    """n sessions, each with a 6-deep chain its policy wants verified, at acceptance 0.3."""
    calls = []
    for i in range(n):
        call = greedy_call(f"s{i}", random_ids(6 + i, seed=i), chain(random_ids(6, seed=10 + i)))
        call.want_depth, call.accept_rates = 6, (0.3,) * 6
        calls.append(call)
    return calls


def test_the_verifier_reports_each_shared_pass_to_the_audit(lm):  # noqa: F811
    """Two shared passes of the same sessions: the first one's tokens over the seconds to the
    second's start is one sample at batch 2, in the mode the pass ran (2 x 2 rows are free on
    this curve, so the cap is 1: open)."""
    verifier = LocalVerifier(lm, max_batch_size=8)
    verifier.planner.costs = FixedCost(CURVES["compute-bound"])
    first = verifier.verify_batch_sync(deep_calls(2))
    verifier.verify_batch_sync(deep_calls(2))
    assert verifier.shared_pass_caps == [1, 1]
    samples = verifier.planner.audit._samples[(2, True)]
    assert len(samples) == 1 and samples[0][0] == sum(len(r.tokens) for r in first) and samples[0][1] > 0
    assert (2, False) not in verifier.planner.audit._samples


def test_the_verifier_cuts_shared_passes_to_the_cap_and_says_so(lm):  # noqa: F811
    verifier = LocalVerifier(lm, max_batch_size=8)
    verifier.planner.costs = FixedCost(CURVES["compute-bound"])
    calls = deep_calls(4)
    replies = verifier.verify_batch_sync(calls)
    assert [r.depth_cap for r in replies] == [0] * 4
    assert all(r.path == [] and len(r.tokens) == 1 for r in replies)  # verified as plain steps
    assert verifier.shared_pass_caps == [0]
    alone = LocalVerifier(lm)
    for call, reply in zip(calls, replies):  # the same token as a plain step of that session
        assert reply.tokens == alone.verify_sync(greedy_call("a-" + call.session_id, call.committed, chain([]))).tokens

    free = LocalVerifier(lm, max_batch_size=8)
    free.planner.costs = FixedCost(CURVES["gpu"])
    for call in calls:
        call.accept_rates = (0.9,) * 6
    assert [r.depth_cap for r in free.verify_batch_sync(calls)] == [6] * 4


def test_a_lone_call_is_not_capped(lm):  # noqa: F811
    verifier = LocalVerifier(lm, max_batch_size=8)
    verifier.planner.costs = FixedCost(CURVES["compute-bound"])
    reply = verifier.verify_batch_sync([greedy_call("s", random_ids(5, seed=1), chain(random_ids(4, seed=2)))])[0]
    assert reply.depth_cap == -1


def test_the_verifier_times_its_passes_by_rows(lm):  # noqa: F811
    verifier = LocalVerifier(lm, max_batch_size=8)
    calls = [greedy_call(f"s{i}", random_ids(5 + i, seed=i), chain(random_ids(2 + i, seed=9 + i))) for i in range(3)]
    verifier.verify_batch_sync(calls)  # prefills: not timed
    assert verifier.planner.costs.points() == []
    for i, call in enumerate(calls):
        call.committed = call.committed + [1]
        call.tree = chain(random_ids(3, seed=30 + i))
    verifier.verify_batch_sync(calls)
    assert [rows for rows, _ in verifier.planner.costs.points()] == [3 * 4]


@pytest.mark.parametrize("curve", ["compute-bound", "cpu-avx2"])
def test_greedy_generations_under_caps_equal_plain_greedy(verifier_lm, twin_lm, curve):  # noqa: F811
    prompts = [random_ids(6 + 3 * i, seed=60 + i) for i in range(4)]
    expected = [verifier_lm.plain_generate(p, 24, SamplingParams()) for p in prompts]
    verifier = LocalVerifier(verifier_lm, max_batch_size=8)
    verifier.planner.costs = FixedCost(CURVES[curve])
    loop = DecodeLoop(verifier, [LocalDrafter(LMDrafter(twin_lm, name="twin")), LocalDrafter(PromptLookupDrafter())])

    async def main():
        requests = [
            GenerationRequest(prompt_ids=p, max_new_tokens=24, rule="greedy", draft_length=6, session_id=f"r{i}")
            for i, p in enumerate(prompts)
        ]
        return await asyncio.gather(*(loop.generate(r) for r in requests))

    results = asyncio.run(main())
    for (tokens, _), want in zip(results, expected):
        assert tokens == want
    assert any(cap >= 0 for cap in verifier.shared_pass_caps)  # caps really were applied


def test_a_lone_call_keeps_the_shared_cap_while_others_are_active(lm):  # noqa: F811
    """A deep lone pass would make the other streams wait and desynchronise them (then no pass is
    shared again): while other sessions are active a lone call gets the last shared cap."""
    verifier = LocalVerifier(lm, max_batch_size=8)
    verifier.planner.costs = FixedCost(CURVES["compute-bound"])
    calls = deep_calls(3)
    assert {r.depth_cap for r in verifier.verify_batch_sync(calls)} == {0}
    lone = greedy_call("s0", calls[0].committed + [1], chain(random_ids(6, seed=40)))
    reply = verifier.verify_batch_sync([lone])[0]
    assert reply.depth_cap == 0 and reply.path == []
    for _ in range(8):  # the others go quiet: their sessions leave the planner's memory
        verifier.verify_batch_sync([greedy_call("s0", lone.committed, chain([]))])
    assert verifier.verify_batch_sync([greedy_call("s0", lone.committed, chain([3]))])[0].depth_cap == -1


def test_exploration_is_said_and_filled_by_the_model_free_drafters(lm):  # noqa: F811
    """An exploring pass (cap raised one deeper to measure those rows) says so in its replies, and
    the loop's next round drafts with the model-free drafters only: an LM drafter would pay a
    catch-up prefill of everything since its last draft just to fill rows being measured."""
    planner = PassPlanner(explore_every=2)
    planner.costs = fitted(CURVES["compute-bound"], rows=(1, 2, 4, 6))
    demands = [CallDemand(want=6, rates=(0.3,) * 6) for _ in range(4)]
    caps = [(planner.depth_cap(demands), planner.explored, planner.last_cap) for _ in range(4)]
    assert caps[0] == (0, False, 0) and caps[1] == (1, True, 1)  # the 2nd pass explores cap 1
    # the pass after verifies that depth once, not itself exploring, and tells its calls the model's
    # own cap: told 1, every LM drafter of the batch caught up to draft one round (8 streams, Qwen)
    assert caps[2] == (1, False, 0)

    verifier = LocalVerifier(lm, max_batch_size=8)
    verifier.planner = PassPlanner(explore_every=1)
    verifier.planner.costs = fitted(CURVES["compute-bound"], rows=(1, 2, 4, 6))
    replies = verifier.verify_batch_sync(deep_calls(4))
    assert all(r.explore and r.depth_cap == 1 for r in replies)

    class Recording(LocalDrafter):
        def __init__(self, drafter, name):
            super().__init__(drafter, name)
            self.calls = 0

        async def draft(self, call):
            self.calls += 1
            return await super().draft(call)

    class Exploring:  # a verifier that always answers "explore at cap 2"
        name = "verifier"

        def __init__(self, inner):
            self.inner = inner

        async def verify(self, call):
            reply = await self.inner.verify(call)
            reply.depth_cap, reply.explore = 2, True
            return reply

    lm_drafter = Recording(LMDrafter(lm, name="lm"), "lm")
    free = Recording(PromptLookupDrafter(), "prompt-lookup")
    assert free.model_free and not lm_drafter.model_free
    loop = DecodeLoop(Exploring(LocalVerifier(lm)), [lm_drafter, free])
    prompt = random_ids(8, seed=5) * 2
    tokens, _ = asyncio.run(loop.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=12, rule="greedy",
                                                            draft_length=4)))
    assert tokens == lm.plain_generate(prompt, 12, SamplingParams())
    assert free.calls > 0 and lm_drafter.calls == 0


def test_catch_up_cost_is_learnt_per_token_and_keeps_cold_streams_capped():
    """A stream whose LM drafter sat out capped rounds pays a re-read of the unseen text before it
    drafts again; weighed once per call, it keeps the cap at 0 where per-position costs alone
    would open it, and is ignored for the few tokens of a normal round."""
    cost = CatchUpCost(min_tokens=16)
    assert cost.seconds_for(500) == 0.0  # nothing learnt yet
    cost.record(2.0, 500)  # a new request's first draft read its 500-token prompt in 2 s
    cost.record(0.5, 3)  # a normal round: not a catch-up sample
    assert cost.seconds_for(250) == pytest.approx(1.0) and cost.seconds_for(3) == 0.0

    model = fitted(CURVES["cpu-avx2"])
    warm = [CallDemand(want=2, rates=(0.8, 0.8), draft_seconds=0.02) for _ in range(2)]
    assert choose_depth_cap(warm, model).cap >= 1  # warm drafters: drafting pays
    cold = [CallDemand(want=2, rates=(0.8, 0.8), draft_seconds=0.02, catch_up_seconds=cost.seconds_for(300))
            for _ in range(2)]
    assert choose_depth_cap(cold, model).cap == 0  # 1.2 s of re-reading per call does not


def test_catch_up_samples_leave_out_the_drafting_positions_of_their_round():
    """A catch-up round also drafted: what its positions cost in normal rounds is taken off first."""
    cost = CatchUpCost(min_tokens=16)
    cost.record(0.06, 3, depth=2)  # a normal round: 30 ms a position
    cost.record(0.66, 100, depth=2)  # read 100 unseen tokens, then drafted 2 positions
    assert cost.seconds_for(100) == pytest.approx(0.6)


def test_a_re_read_is_spread_over_the_rounds_it_buys_so_a_stream_that_sat_out_can_rejoin():
    """Weighed whole against one pass, a re-read of a few hundred tokens never pays, and a stream
    whose LM once sat out stayed out for the rest of its request even where each pass gains from
    drafting; its share per remaining round is what one pass should weigh."""
    cost = CatchUpCost(min_tokens=16)
    cost.record(1.2, 300)  # 4 ms a token
    assert cost.per_round(300, tokens_left=60, rates=(0.5, 0.5)) == pytest.approx(1.2 / (60 / 1.75))
    assert cost.per_round(300, tokens_left=1, rates=(0.5,)) == pytest.approx(1.2)  # the last round pays it all
    assert cost.per_round(3, tokens_left=60, rates=(0.5,)) == 0.0  # a normal round's few tokens
    model = fitted(CURVES["cpu-avx2"])
    rates = (0.8, 0.8)

    def calls(catch_up):
        return [CallDemand(want=2, rates=rates, draft_seconds=0.02, catch_up_seconds=catch_up) for _ in range(2)]

    assert choose_depth_cap(calls(cost.seconds_for(300)), model).cap == 0  # the whole re-read in one pass
    assert choose_depth_cap(calls(cost.per_round(300, 100, rates)), model).cap >= 1  # its share: drafting pays
    assert choose_depth_cap(calls(cost.per_round(300, 1, rates)), model).cap == 0  # too late to pay back


def test_a_re_read_is_charged_over_the_open_rounds_it_buys_at_that_batch_size():
    """Spread over all the rounds a request has left, a re-read looked cheap; at 8 streams on the
    Qwen pair caps closed again after a pass or two and each re-read bought one round. Once open
    runs at a batch size have been seen, the planner spreads a catch-up over their length."""
    cost = CatchUpCost(min_tokens=16)
    cost.record(1.2, 300)
    rates = (0.8, 0.8)
    share, spread = cost.per_round(300, 100, rates), rounds_left(100, rates)
    demand = CallDemand(want=2, rates=rates, draft_seconds=0.02, catch_up_seconds=share, catch_up_rounds=spread)
    assert demand.catch_up_share(None) == share  # nothing seen: the call's own spread
    assert demand.catch_up_share(1.0) == pytest.approx(1.2)  # open for one round: the whole re-read
    assert demand.catch_up_share(1e6) == pytest.approx(share)  # never more rounds than the request has
    assert CallDemand(want=2, catch_up_seconds=0.3).catch_up_share(1.0) == 0.3  # not spread by its call

    def planner_with_runs(run_length: int | None) -> PassPlanner:
        planner = PassPlanner(explore_every=10 ** 6, audit=False)
        planner.costs = fitted(CURVES["cpu-avx2"])
        if run_length is not None:  # shared passes of 2 warm calls (open), then one capped at 0
            warm = [CallDemand(want=2, rates=rates, draft_seconds=0.02)] * 2
            shut = [CallDemand(want=2, rates=(0.05, 0.05), draft_seconds=0.02)] * 2
            for _ in range(3):
                for _ in range(run_length):
                    assert planner.depth_cap(warm) >= 1
                assert planner.depth_cap(shut) == 0
            assert planner.open_rounds(2) == run_length and planner.open_rounds(4) is None
        return planner

    cold = [demand] * 2
    assert planner_with_runs(None).depth_cap(cold) >= 1  # as before: its share over 57 rounds pays
    assert planner_with_runs(40).depth_cap(cold) >= 1  # long open runs: the re-read pays back
    assert planner_with_runs(1).depth_cap(cold) == 0  # runs of one pass: it would buy one round


def test_the_loop_times_lm_drafting_by_what_the_drafters_computed_not_by_its_wait():
    """Under load a draft call queues behind other streams' passes; the catch-up cost is learnt
    from the drafters' own seconds, or the queue would pass for re-reading."""

    class Slow:
        name, model_free = "lm", False

        async def draft(self, call):
            await asyncio.sleep(0.05)  # queued behind a pass
            return DraftReply(tree=TokenTree(), drafter="lm", seconds=0.002)

    class Free(Slow):
        name, model_free = "free", True

        async def draft(self, call):
            return DraftReply(tree=TokenTree(), drafter="free", seconds=0.5)

    loop = DecodeLoop(LocalVerifier.__new__(LocalVerifier), [])
    call = DraftCall(session_id="s", committed=[1, 2], num_tokens=1, sampling=SamplingParams(), seed=0)
    trees, computed = asyncio.run(loop._draft_timed([Slow(), Free()], call))
    assert len(trees) == 2 and computed == pytest.approx(0.002)  # the model-free drafter's seconds too are not LM time


def test_a_lone_call_that_would_catch_up_waits_for_a_shared_pass():
    """While others are active a lone pass keeps the shared cap, except for a call whose LM
    drafters would first re-read unseen text: the others would wait through it unweighed."""
    planner = PassPlanner()
    planner.costs = fitted(CURVES["gpu"])
    planner.saw(["a", "b"])
    assert planner.lone_cap("a") == -1  # no shared pass yet: nothing to keep ...
    assert planner.lone_cap("a", catch_up_seconds=1.5) == 0  # ... but b would wait through a's re-read
    assert planner.depth_cap([CallDemand(want=3, rates=(0.9,) * 3) for _ in range(2)]) == 3
    assert planner.lone_cap("a") == 3
    assert planner.lone_cap("a", catch_up_seconds=1.5) == 0
    for _ in range(8):  # b leaves the planner's memory: alone, nothing is capped
        planner.saw(["a"])
    assert planner.lone_cap("a", catch_up_seconds=1.5) == -1


class RecordingDrafter(LocalDrafter):
    """Records (session, committed length) of every draft call."""

    def __init__(self, drafter, name):
        super().__init__(drafter, name)
        self.calls: list[tuple[str, int]] = []

    async def draft(self, call):
        self.calls.append((call.session_id, len(call.committed)))
        return await super().draft(call)


class Capping:
    """A verifier whose every reply carries `cap` (>= 0: a shared pass under load; -1: alone),
    recording what each call announced."""

    name = "verifier"

    def __init__(self, inner, cap):
        self.inner, self.cap = inner, cap
        self.calls: list[tuple[int, int]] = []  # (committed length, want_depth)

    async def verify(self, call):
        self.calls.append((len(call.committed), call.want_depth))
        reply = await self.inner.verify(call)
        reply.depth_cap = self.cap
        return reply


@pytest.mark.parametrize("cap", [-1, 4])
def test_under_load_an_lm_drafter_reads_a_new_prompt_only_after_a_cap_weighed_it(verifier_lm, twin_lm, cap):  # noqa: F811
    """A new request's first LM draft reads its whole prompt, and under load every stream of the
    pass waits through it: the LM joins one round after the call that announced the depth it wants
    (with that catch-up cost), the model-free drafter drafting meanwhile. Alone it joins at once."""
    lm_drafter = RecordingDrafter(LMDrafter(twin_lm, name="twin"), "twin")
    free = RecordingDrafter(PromptLookupDrafter(), "prompt-lookup")
    verifier = Capping(LocalVerifier(verifier_lm), cap)
    loop = DecodeLoop(verifier, [lm_drafter, free])
    prompt = random_ids(10, seed=71) * 2  # 20 tokens: a catch-up (>= 16 unseen), and something to copy
    tokens, _ = asyncio.run(loop.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=16, rule="greedy",
                                                            draft_length=4)))
    assert tokens == verifier_lm.plain_generate(prompt, 16, SamplingParams())
    first_free, first_lm = free.calls[0][1], lm_drafter.calls[0][1]
    if cap < 0:
        assert first_lm == first_free  # alone: both draft from the first drafting round
    else:
        assert first_lm > first_free  # the free drafter alone in the first drafting round
        announced = [want for length, want in verifier.calls if length < first_lm]
        assert announced[-1] > 0  # the verify call before the LM's first draft asked to draft


def request(prompt, sid):
    return GenerationRequest(prompt_ids=prompt, max_new_tokens=12, rule="greedy", draft_length=4, session_id=sid)


def make_drafting_pay(loop, drafter_set):
    """What a warm-up request measured, made noise-free: drafting pays (a tiny model's ms jitter
    says anything), so a request alone drafts with its LM from the first round."""
    for tier in (loop._last_policy[drafter_set].full, loop._last_policy[drafter_set].free):
        tier.step_times, tier.draft_ratios = deque([0.1] * 4), deque([0.0] * 4)
        tier.tree_times = deque((n, 0.1 + 0.001 * n) for n in (1, 2, 3, 4) * 2)


def test_a_request_joining_others_reads_its_prompt_with_the_lm_only_after_a_cap(verifier_lm, twin_lm):  # noqa: F811
    """Before its first reply a new request knows no cap; if other requests of the loop are running,
    it still is under load: its first round drafts with the model-free drafters only, while a request
    that starts alone drafts with its LM from the first round (its costs known from an earlier one)."""
    lm_drafter = RecordingDrafter(LMDrafter(twin_lm, name="twin"), "twin")
    free = RecordingDrafter(PromptLookupDrafter(), "prompt-lookup")
    loop = DecodeLoop(LocalVerifier(verifier_lm), [lm_drafter, free])

    asyncio.run(loop.generate(request(random_ids(20, seed=72), "warm-up")))
    make_drafting_pay(loop, ("twin", "prompt-lookup"))
    alone, joining = random_ids(10, seed=73) * 2, random_ids(9, seed=74) * 2

    async def main():
        running = loop.rounds(request(alone, "alone"))
        await running.__anext__()  # "alone" is in flight
        joined = await loop.generate(request(joining, "joining"))
        async for _ in running:
            pass
        return joined

    tokens, _ = asyncio.run(main())
    assert tokens == verifier_lm.plain_generate(joining, 12, SamplingParams())
    assert ("alone", len(alone)) in lm_drafter.calls  # alone: its LM drafts in the first round
    assert ("joining", len(joining)) not in lm_drafter.calls  # joining: not before a reply
    assert ("joining", len(joining)) in free.calls  # the model-free drafter drafted it
    assert loop._in_flight == 0


def test_requests_that_start_together_all_count_as_under_load(verifier_lm, twin_lm):  # noqa: F811
    """A burst (streams started in the same event-loop tick) is load for every one of them, the
    first included: none reads its prompt with the LM before a reply, so their prefills share one
    pass instead of the first one's LM read and lone prefill holding the rest."""
    lm_drafter = RecordingDrafter(LMDrafter(twin_lm, name="twin"), "twin")
    free = RecordingDrafter(PromptLookupDrafter(), "prompt-lookup")
    verifier = LocalVerifier(verifier_lm, max_batch_size=4)
    loop = DecodeLoop(verifier, [lm_drafter, free])

    asyncio.run(loop.generate(request(random_ids(20, seed=75), "warm-up")))
    make_drafting_pay(loop, ("twin", "prompt-lookup"))
    alone = random_ids(10, seed=79) * 2
    asyncio.run(loop.generate(request(alone, "alone")))
    assert ("alone", len(alone)) in lm_drafter.calls  # alone: its LM drafts in the first round
    prompts = {f"burst-{i}": random_ids(10, seed=80 + i) * 2 for i in range(3)}

    async def burst():
        return await asyncio.gather(*(loop.generate(request(p, sid)) for sid, p in prompts.items()))

    results = asyncio.run(burst())
    for (sid, prompt), (tokens, _) in zip(prompts.items(), results):
        assert tokens == verifier_lm.plain_generate(prompt, 12, SamplingParams())
        assert (sid, len(prompt)) not in lm_drafter.calls  # no LM prompt read before a reply ...
        assert (sid, len(prompt)) in free.calls  # ... the model-free drafter drafted round 0
    assert loop._in_flight == 0


@pytest.mark.parametrize("seconds_per_token, lm_drafts", [(0.05, False), (1e-5, True)])
def test_an_lm_re_read_is_made_only_where_the_tokens_left_pay_it_back(verifier_lm, twin_lm, seconds_per_token,
                                                                       lm_drafts):  # noqa: F811
    """Alone, an LM drafter that would first re-read a long unseen text (a new prompt) does so only
    if what drafting saves per token (measured step and pass costs, acceptance) times the tokens
    left beats the re-read's measured seconds; otherwise the model-free drafters draft alone."""
    lm_drafter = RecordingDrafter(LMDrafter(twin_lm, name="twin"), "twin")
    free = RecordingDrafter(PromptLookupDrafter(), "prompt-lookup")
    loop = DecodeLoop(LocalVerifier(verifier_lm), [lm_drafter, free])
    asyncio.run(loop.generate(GenerationRequest(prompt_ids=random_ids(20, seed=75), max_new_tokens=12,
                                                rule="greedy", draft_length=4, session_id="warm-up")))
    drafter_set = ("twin", "prompt-lookup")
    for tier in (loop._last_policy[drafter_set].full, loop._last_policy[drafter_set].free):
        # noise-free costs: a step 0.1 s, rows nearly free, drafting free (it pays at any length)
        tier.step_times, tier.draft_ratios = deque([0.1] * 4), deque([0.0] * 4)
        tier.tree_times = deque((n, 0.1 + 0.001 * n) for n in (1, 2, 3, 4) * 2)
    loop._catch_up[drafter_set].rates = deque([seconds_per_token])
    # 40 prompt tokens, 8 to generate: saving at most ~0.05 s a token (0.4 s) against a 2 s or a
    # 0.4 ms re-read
    prompt = random_ids(20, seed=76) * 2
    tokens, _ = asyncio.run(loop.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=8, rule="greedy",
                                                            draft_length=4, session_id="short")))
    assert tokens == verifier_lm.plain_generate(prompt, 8, SamplingParams())
    lm_calls = [length for sid, length in lm_drafter.calls if sid == "short"]
    assert ("short", len(prompt)) in free.calls  # the model-free drafter drafted the first round
    assert bool(lm_calls) is lm_drafts
    if lm_drafts:
        assert lm_calls[0] == len(prompt)  # from the first round, as before this rule


def test_shadow_acceptance_follows_the_emitted_tokens_down_the_tree():
    from specserve.engine.goodput import shadow_accepted
    from specserve.tree.token_tree import ROOT, TokenTree

    tree = TokenTree()
    a = tree.propose(ROOT, 5, None, "x")
    tree.propose(ROOT, 6, None, "y")
    tree.propose(a, 7, None, "x")
    assert shadow_accepted(tree, [6]) == (1, 1)  # any sibling the verifier emits is accepted
    assert shadow_accepted(tree, [9]) == (1, 0)
    assert shadow_accepted(tree, [5, 7, 3]) == (2, 2)  # judged no deeper than the draft
    assert shadow_accepted(tree, [5, 8]) == (2, 1)
    assert shadow_accepted(TokenTree(), [5]) == (0, 0)


def test_a_request_held_at_cap_zero_keeps_measuring_its_model_free_acceptance(verifier_lm):  # noqa: F811
    """A cap of 0 verifies no draft; the model-free drafters still draft one position, unverified,
    and the emitted token judges it, so the acceptance estimates that decide the next caps do not
    freeze at whatever capped the request (without it, position 1 is never reached again)."""
    free = RecordingDrafter(PromptLookupDrafter(), "prompt-lookup")
    verifier = Capping(LocalVerifier(verifier_lm), 0)
    loop = DecodeLoop(verifier, [free])
    prompt = random_ids(12, seed=77) * 3  # repetitive: prompt lookup has something to propose
    tokens, stats = asyncio.run(loop.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=24,
                                                                rule="greedy", draft_length=4)))
    assert tokens == verifier_lm.plain_generate(prompt, 24, SamplingParams())
    assert stats.drafted == 0  # nothing was verified: the shadow drafts are not drafts
    policy = loop._last_policy[("prompt-lookup",)]
    assert free.calls and policy.reached[0] > 0  # judged while capped
    # the policy's estimate of position 1 is what the emitted tokens said, not the prior
    assert policy.acceptance(1) != pytest.approx(policy.prior_accept)


@pytest.mark.parametrize("rate, cap", [(0.05, 0), (0.25, 1)])
def test_a_cap_must_beat_plain_decoding_by_the_models_error_bar(rate, cap):
    """Rows free, drafting free: the predicted gain of verifying one position is its acceptance
    rate. A few % is inside what the model leaves out (a round's other costs), so it is not bought."""
    from specserve.engine.goodput import MIN_GAIN

    model = PassCostModel()
    for rows in (2, 4):
        model.record(rows, 0.2)
    choice = choose_depth_cap([CallDemand(want=1, rates=(rate,)) for _ in range(2)], model)
    assert choice.values[1] / choice.values[0] == pytest.approx(1 + rate)
    assert choice.cap == cap and MIN_GAIN > 0.05


def test_a_probe_re_reads_even_where_the_costs_say_drafting_does_not_pay(verifier_lm, twin_lm):  # noqa: F811
    """Carried costs that say drafting does not pay (a noisy drafting time, say) make what drafting
    saves 0, so by the payback rule no re-read is ever worth it: the policy's probes, the one way it
    re-measures, must still reach the LM drafter. Before, every probe was dropped by that rule and
    the LM sat out whole requests, and the next ones too (their costs were never re-measured)."""
    lm_drafter = RecordingDrafter(LMDrafter(twin_lm, name="twin"), "twin")
    loop = DecodeLoop(LocalVerifier(verifier_lm), [lm_drafter])
    asyncio.run(loop.generate(GenerationRequest(prompt_ids=random_ids(20, seed=75), max_new_tokens=12,
                                                rule="greedy", draft_length=4, session_id="warm-up")))
    policy = loop._last_policy[("twin",)]
    # a step 0.1 s, rows nearly free, but each drafted position measured at a whole step: no depth pays
    policy.step_times, policy.draft_ratios = deque([0.1] * 4), deque([1.0] * 4)
    policy.tree_times = deque((n, 0.1 + 0.001 * n) for n in (1, 2, 3, 4) * 2)
    loop._catch_up[("twin",)].rates = deque([1e-3])  # a re-read costs something
    prompt = random_ids(20, seed=76) * 2
    tokens, _ = asyncio.run(loop.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=40, rule="greedy",
                                                            draft_length=4, session_id="probed")))
    assert tokens == verifier_lm.plain_generate(prompt, 40, SamplingParams())
    assert [length for sid, length in lm_drafter.calls if sid == "probed"]  # the probes drafted
