"""Dynamic draft length: the expected-gain model and its switch-off/probe behaviour."""

from __future__ import annotations

import random
from collections import deque

import pytest

from specserve.cascade.draft_length import DraftLengthPolicy
from specserve.sampling.closed_form import expected_tokens_per_call
from test_engine import verifier_lm  # noqa: F401 - fixture


def feed_iid(policy: DraftLengthPolicy, alpha: float, rounds: int, depth: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    for _ in range(rounds):
        accepted = 0
        while accepted < depth and rng.random() < alpha:
            accepted += 1
        policy.record(depth, accepted)


def test_expected_tokens_matches_leviathan_closed_form():
    """With every position's rate = alpha, E[tokens/step] = (1 - alpha^(k+1)) / (1 - alpha)."""
    policy = DraftLengthPolicy(8, prior_accept=0.8, prior_weight=1.0)
    for k in range(9):
        assert policy.expected_tokens(k) == pytest.approx(expected_tokens_per_call(0.8, k))
    assert policy.expected_tokens(4) == pytest.approx(3.3616)  # ALGORITHMS.md 0.4 check value


def test_learns_per_position_rates():
    policy = DraftLengthPolicy(4, forget=1.0)
    feed_iid(policy, 0.7, 4000, 4)
    for d in range(1, 5):
        assert policy.acceptance(d) == pytest.approx(0.7, abs=0.04)


def test_cheap_accurate_drafts_go_deep_and_costly_ones_stop_early():
    deep = DraftLengthPolicy(8, node_cost=0.01, measure_step_rounds=0)
    feed_iid(deep, 0.9, 300, 8)
    assert deep.next_length() == 8
    shallow = DraftLengthPolicy(8, node_cost=0.01, draft_cost_prior=0.3, measure_step_rounds=0)  # an LM drafter
    feed_iid(shallow, 0.6, 300, 8)
    k = shallow.next_length()
    # at alpha 0.6 and 0.3 step per drafted token the best depth is short but not zero: 2 for the
    # rates this seeded feed leaves (T(1) and T(2) are within 1 % of each other at the exact alpha)
    assert k == 2, f"a costly, so-so drafter drafts short but does draft: k = {k}"
    # k maximises T(k); its neighbours are no better
    value = lambda j: shallow.expected_tokens(j) / shallow.cost(j)  # noqa: E731
    assert value(k) >= max(value(j) for j in range(9))


def test_speculation_turns_off_when_it_does_not_pay_and_probes_again():
    policy = DraftLengthPolicy(4, node_cost=0.2, probe_every=5, measure_step_rounds=0)
    feed_iid(policy, 0.0, 200, 4)  # nothing is ever accepted
    lengths = []
    for _ in range(16):
        k = policy.next_length()
        lengths.append(k)
        policy.record(k, 0)  # probes fail too
    # off, probing one position deep after 5 rounds, then 10 (a failed probe doubles the interval)
    assert lengths == [0, 0, 0, 0, 1] + [0] * 9 + [1, 0]
    feed_iid(policy, 1.0, 60, 4)  # the text became predictable (e.g. copying the prompt)
    assert policy.next_length() == 4


def test_a_drafter_near_break_even_keeps_being_probed():
    """One failed probe is one Bernoulli draw: a drafter just below break-even is not backed off
    (it is probed every probe_every rounds), a clearly bad one is (previous test)."""
    policy = DraftLengthPolicy(4, node_cost=0.2, probe_every=5, measure_step_rounds=0)
    feed_iid(policy, 0.15, 200, 1, seed=3)  # break-even is 0.2 per position; 0.15 is close
    assert policy.best_length() == 0 and policy.acceptance(1) > 0.5 * 0.2
    lengths = []
    for _ in range(20):
        k = policy.next_length()
        lengths.append(k)
        policy.record(k, 0)  # every probe fails
    assert [i for i, k in enumerate(lengths) if k] == [4, 9, 14, 19]


def test_verifier_only_step_is_timed_early_and_fixes_the_cost_model():
    """Multi-row passes cost 2.5 steps (a CPU): speculation at alpha 0.5 stops paying."""
    policy = DraftLengthPolicy(6, forget=1.0)
    lengths = [policy.next_length() for _ in range(3)]
    assert lengths == [0, 0, 0]  # the prefill round, then verifier-only steps until two are timed
    for _ in range(2):
        policy.record(0, 0, 0.0, 0.1, tree_nodes=0)
    for n in (2, 6, 4, 3, 5):
        policy.record(n, 1, 0.0, 0.25 + 0.001 * n, tree_nodes=n)
    jump, node = policy.measured_costs()
    assert jump == pytest.approx(1.5, rel=1e-6) and node == pytest.approx(0.01, rel=1e-6)
    policy.reached, policy.accepted = [0.0] * 6, [0.0] * 6
    feed_iid(policy, 0.5, 300, 6)
    assert policy.best_length() == 0  # at most 2 tokens per round cannot beat 2.5x the cost
    feed_iid(policy, 0.95, 300, 6)
    assert policy.best_length() == 6


def test_verifier_only_rounds_are_not_evidence():
    policy = DraftLengthPolicy(3)
    before = (list(policy.reached), list(policy.accepted))
    policy.record(0, 0, draft_seconds=0.0, verify_seconds=1.0)
    assert (policy.reached, policy.accepted) == before


def test_draft_cost_is_the_median_ratio_without_the_prefill_round():
    policy = DraftLengthPolicy(4, draft_cost_prior=0.05)
    # first drafting round: an LM drafter prefills the prompt (10 s): not a per-token cost
    policy.record(4, 2, draft_seconds=10.0, verify_seconds=0.5)
    assert policy.draft_cost == pytest.approx(0.05)  # still the prior
    for draft_seconds in (0.4, 0.4, 3.0):  # a load spike among steady rounds
        policy.record(4, 2, draft_seconds=draft_seconds, verify_seconds=0.5)
    assert policy.draft_cost == pytest.approx(0.4 / (4 * 0.5))


def test_negative_max_length_is_refused():
    with pytest.raises(ValueError, match="max_length"):
        DraftLengthPolicy(-1)


def test_node_cost_is_fitted_from_verify_times():
    """time(n) = 0.1 s + 0.02 s per node -> node cost 0.2 of a step; expensive nodes cut depth."""
    policy = DraftLengthPolicy(6, node_cost=0.0, forget=1.0)
    assert policy.measured_costs() is None  # no data: the priors are used
    policy.record(0, 0, 0.0, 0.1, tree_nodes=0)
    for n in [1, 4, 8, 2, 6, 3, 12, 5] * 2:
        policy.record(min(n, 6), 0, 0.0, 0.1 + 0.02 * n, tree_nodes=n)
    assert policy.measured_costs() == pytest.approx((0.0, 0.2), rel=1e-6, abs=1e-9)
    cheap = DraftLengthPolicy(6, node_cost=0.0, forget=1.0, measure_step_rounds=0)
    for p in (policy, cheap):
        p.reached, p.accepted = [0.0] * 6, [0.0] * 6
        feed_iid(p, 0.5, 400, 6)
    assert cheap.best_length() == 6  # free nodes: draft the maximum
    assert 0 < policy.best_length() < 3


def test_constant_tree_size_uses_the_prior_slope():
    policy = DraftLengthPolicy(4, forget=1.0, node_cost=0.01)
    policy.record(0, 0, 0.0, 0.2, tree_nodes=0)
    for _ in range(20):
        policy.record(4, 2, 0.0, 0.3, tree_nodes=4)
    jump, node = policy.measured_costs()
    assert node == pytest.approx(0.01) and jump == pytest.approx(0.3 / 0.2 - 1 - 0.04)


def test_warm_up_outliers_do_not_set_the_costs():
    """First passes of new shapes are slow (kernel set-up): medians ignore them."""
    policy = DraftLengthPolicy(6, node_cost=0.01)
    for seconds in (1.1, 1.1, 0.1, 0.1, 0.1, 0.1):  # two slow first steps
        policy.record(0, 0, 0.0, seconds, tree_nodes=0)
    for seconds in (4.7, 0.16, 0.16):  # one slow first tree pass
        policy.record(5, 1, 0.0, seconds, tree_nodes=5)
    jump, node = policy.measured_costs()
    assert node == pytest.approx(0.01) and jump == pytest.approx(0.6 - 0.05)


def test_unmeasured_deep_positions_inherit_the_shallow_rate():
    """A policy that only ever drafted 3 deep still goes deeper when positions 1-3 are reliable:
    position 4 has no data, so it takes position 3's estimate as its prior (not a pessimistic 0.5
    that would keep every draft at 3 forever, since position 4 is never drafted and never measured)."""
    policy = DraftLengthPolicy(16, node_cost=0.05, draft_cost_prior=0.15, measure_step_rounds=0, forget=1.0)
    feed_iid(policy, 0.9, 400, 3)
    assert policy.acceptance(4) == pytest.approx(policy.acceptance(3), abs=1e-9)
    assert policy.acceptance(3) == pytest.approx(0.9, abs=0.04)
    assert policy.next_length() > 3
    # and a drafter that is bad at position 1 is not rescued by the prior
    bad = DraftLengthPolicy(16, node_cost=0.05, draft_cost_prior=0.15, measure_step_rounds=0, forget=1.0)
    feed_iid(bad, 0.1, 400, 3)
    assert bad.next_length() == 0


def test_deep_prior_floor_lets_depth_grow_past_position_one():
    """With a confidence stop, unreached positions are priored at >= the floor, so a drafter whose
    position 1 is mediocre still gets deeper drafts tried (and measured); the data then rules."""
    def policy(floor: float) -> DraftLengthPolicy:
        p = DraftLengthPolicy(8, deep_prior_floor=floor)
        for _ in range(30):  # position 1 accepted 45 % of the time, never deeper than 1
            p.record(1, 1 if p.rounds_seen % 20 < 9 else 0)
            p.rounds_seen += 1
        p.draft_ratios.extend([0.15] * 3)
        return p

    plain, floored = policy(0.0), policy(0.7)
    assert plain.acceptance_rates(3)[1] == pytest.approx(plain.acceptance_rates(3)[0])
    assert floored.acceptance_rates(3)[1] >= 0.7 > floored.acceptance_rates(3)[0]
    assert floored.best_length() > plain.best_length() >= 1
    # measured deep rejections win over the floor
    for _ in range(60):
        floored.record(3, 1)
    assert floored.acceptance_rates(3)[1] < 0.3


def test_the_load_policy_sees_mean_drafting_seconds_with_catch_ups():
    """The request's own depth uses the median cost (a catch-up prefill is an outlier there); the
    verifier's load policy gets the mean, catch-ups included: other streams wait through them."""
    policy = DraftLengthPolicy(4)
    policy.record(0, 0, 0.0, 0.5, tree_nodes=0)
    for seconds in (10.0, 0.4, 0.4, 0.4, 4.4):  # a prompt prefill, steady rounds, a catch-up
        policy.record(4, 2, draft_seconds=seconds, verify_seconds=0.5)
    assert policy.draft_cost == pytest.approx(0.4 / (4 * 0.5))  # the median of the later rounds
    assert policy.draft_seconds_per_position() == pytest.approx(5.6 / 16)  # the prompt prefill left out
    assert DraftLengthPolicy(4).draft_seconds_per_position() == 0.0


# ---- two tiers: the free drafters keep drafting when the whole set does not pay -------------------


def _feed(policy, rounds, accept, draft_seconds, verify_seconds=0.1):
    """Run `rounds` rounds: each drafted length accepted up to `accept(tier)` positions."""
    tiers = []
    for _ in range(rounds):
        k = policy.next_length()
        tier = "free" if policy.free_only else "full"
        tiers.append((tier, k))
        if k == 0:
            policy.record(0, 0, 0.0, verify_seconds)
            continue
        policy.record(k, min(k, accept(tier)), k * draft_seconds[tier], verify_seconds * (1 + 0.02 * k), k)
    return tiers


def test_tiered_policy_lets_the_free_drafters_draft_when_the_whole_set_does_not_pay():
    from specserve.cascade.draft_length import TieredLengthPolicy

    policy = TieredLengthPolicy(DraftLengthPolicy(8), DraftLengthPolicy(8))
    # the LM-including set accepts nothing and costs half a step a position; the free drafters
    # (nothing to pay) are right 6 positions deep
    tiers = _feed(policy, 60, accept=lambda tier: 0 if tier == "full" else 6,
                  draft_seconds={"full": 0.05, "free": 0.0})
    late = tiers[20:]
    assert sum(1 for tier, k in late if tier == "free" and k >= 4) >= 30, late
    # the whole set is still probed now and then (the text may change), one position deep
    assert any(tier == "full" and k == 1 for tier, k in late) and not any(tier == "full" and k > 1 for tier, k in late)
    # each tier measured only its own rounds
    assert policy.free.acceptance(1) > 0.8 and policy.full.acceptance(1) < 0.2
    policy.free_only = True  # on a free round the loop's questions go to the free tier
    assert policy.acceptance_rates(1) == policy.free.acceptance_rates(1)


def test_tiered_policy_is_the_whole_set_while_it_pays():
    from specserve.cascade.draft_length import TieredLengthPolicy

    policy = TieredLengthPolicy(DraftLengthPolicy(8), DraftLengthPolicy(8))
    tiers = _feed(policy, 40, accept=lambda tier: 5, draft_seconds={"full": 0.005, "free": 0.0})
    assert all(tier == "full" for tier, _ in tiers) and sum(k for _, k in tiers[10:]) > 60


def test_loop_drafts_with_the_free_drafters_alone_once_the_lm_does_not_pay(verifier_lm):  # noqa: F811
    """An LM drafter that is always wrong and a free one that always knows the answer: after a few
    rounds the LM is only probed, the free drafter drafts deep, and the output is plain greedy."""
    import asyncio

    from specserve.engine import GenerationRequest
    from specserve.engine.local import LocalDrafter, LocalVerifier
    from specserve.engine.loop import DecodeLoop
    from specserve.models.base import DraftProposal
    from specserve.sampling.params import SamplingParams

    prompt = list(range(5, 17))
    plain = verifier_lm.plain_generate(prompt, 80, SamplingParams())

    class Oracle:  # model-free: it reads the answer off plain decoding
        name, model_free = "oracle", True

        def propose(self, context, num_tokens, params=None, generator=None):
            done = len(context) - len(prompt)
            return DraftProposal(plain[done:done + num_tokens], None, self.name)

    class Wrong:  # costly and useless: a token no greedy step picks (its argmax is never 0 here)
        name = "wrong"

        def __init__(self):
            self.calls = 0

        def propose(self, context, num_tokens, params=None, generator=None):
            self.calls += 1
            import time

            # per drafted token, as an LM's cost is: a fixed 20 ms per call was 2.5 ms a position at
            # depth 8, within reach of the tiny verifier's step on a loaded CI box, where drafting
            # with the oracle in the set then paid (9 LM calls in 12 rounds in one full-suite run)
            time.sleep(0.02 * num_tokens)
            return DraftProposal([0] * num_tokens, None, self.name)

    assert 0 not in plain
    wrong = Wrong()
    loop = DecodeLoop(LocalVerifier(verifier_lm), [LocalDrafter(wrong, name="wrong"), LocalDrafter(Oracle(), name="oracle")])
    tokens, stats = asyncio.run(loop.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=80, rule="greedy",
                                                                draft_length=8)))
    assert tokens == plain
    assert stats.tokens_per_step > 2.0, stats
    assert wrong.calls < stats.rounds / 2, (wrong.calls, stats.rounds)


def test_a_policy_can_start_from_an_earlier_requests_costs():
    """Step, pass and drafting times carry over (they are the machine's); acceptance does not."""
    earlier = DraftLengthPolicy(6, forget=1.0)
    for _ in range(3):
        earlier.next_length()
    for _ in range(2):
        earlier.record(0, 0, 0.0, 0.1, tree_nodes=0)
    for n in (2, 6, 4, 3, 5):
        earlier.record(n, n, 0.002 * n, 0.1 + 0.001 * n, tree_nodes=n)
    fresh = DraftLengthPolicy(6, forget=1.0)
    fresh.carry_costs_from(earlier)
    assert fresh.timing_a_step  # 5 tree passes (a short warm-up): mostly first-shape outliers, not carried
    for n in (2, 6, 4, 3, 5):
        earlier.record(n, n, 0.002 * n, 0.1 + 0.001 * n, tree_nodes=n)
    fresh.carry_costs_from(earlier)  # 10: half a window and more
    assert not fresh.timing_a_step and fresh.next_length() > 0  # drafts from its first round
    assert fresh.measured_costs() == earlier.measured_costs() and fresh.draft_cost == earlier.draft_cost
    assert fresh.acceptance_rates() == DraftLengthPolicy(6).acceptance_rates()  # the prior, not the earlier text's
    fresh.record(0, 0, 0.0, 0.3, tree_nodes=0)
    assert len(earlier.step_times) == 2  # copies: the earlier request's samples are its own


def test_the_loop_times_a_step_once_per_drafter_set_not_per_request(verifier_lm):  # noqa: F811
    """The first request of a drafter set spends its first rounds timing a verifier step; the next
    one drafts from its first round, and both are plain greedy."""
    import asyncio

    from specserve.engine import GenerationRequest
    from specserve.engine.local import LocalDrafter, LocalVerifier
    from specserve.engine.loop import DecodeLoop
    from specserve.models.ngram import PromptLookupDrafter
    from specserve.sampling.params import SamplingParams

    loop = DecodeLoop(LocalVerifier(verifier_lm), [LocalDrafter(PromptLookupDrafter(), name="prompt-lookup")])
    for prompt, first_rounds_drafted in ((list(range(5, 17)) * 2, False), (list(range(30, 41)) * 2, True)):
        if first_rounds_drafted:  # what the first request measured, made noise-free (a tiny model's ms jitter)
            measured = loop._last_policy[("prompt-lookup",)]
            measured.step_times = deque([0.1] * 4)
            measured.tree_times = deque((n, 0.1 + 0.001 * n) for n in (1, 2, 3, 4) * 2)
            measured.draft_ratios = deque([0.0] * 4)
        request = GenerationRequest(prompt_ids=prompt, max_new_tokens=24, rule="greedy", draft_length=6)

        async def run():
            return [r async for r in loop.rounds(request)]

        rounds = asyncio.run(run())
        assert [t for r in rounds for t in r.tokens] == verifier_lm.plain_generate(prompt, 24, SamplingParams())
        assert (rounds[0].drafted_depth > 0) == first_rounds_drafted, [r.drafted_depth for r in rounds[:4]]
        if not first_rounds_drafted:
            assert [r.drafted_depth for r in rounds[:3]] == [0, 0, 0]
