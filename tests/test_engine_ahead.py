"""Enumerate-and-select drafting ahead (engine/ahead.py) in one process, tiny fp32 models:

* the batched branch decode (LMSession.extend_scored, LMDrafter.propose_ahead) gives each unit
  exactly the draft the drafter would make from that unit's real context (tokens and laws);
* the fan-out follows the acceptance estimates;
* greedy generation equals plain greedy token for token, and units really are used;
* a stale build (another round's stamp) never reaches verification; a builder that fails or is
  late costs speed only;
* SpS with units keeps the verifier's law (a chi-square test on an exactly computed marginal).
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from scipy import stats as scipy_stats

from specserve.engine import GenerationRequest, SpeculativeEngine
from specserve.engine.ahead import AheadContext, EnumerateAndSelect, allocate_fanout, make_strategy
from specserve.engine.local import LocalDrafter, LocalVerifier
from specserve.engine.workers import AheadReply, AheadUnitTree
from specserve.models.causal_lm import CausalLM
from specserve.models.drafters import LMDrafter
from specserve.models.ngram import PromptLookupDrafter
from specserve.sampling.params import SamplingParams, process_logits
from specserve.tree.token_tree import ROOT, TokenTree

from test_engine import PROMPT, VOCAB, plain, twin_lm, verifier_lm  # noqa: F401 - fixtures
from test_engine_overlap import RecordingVerifier


def test_extend_scored_equals_scoring_the_whole_tree(verifier_lm):  # noqa: F811
    tree = TokenTree()
    tree.add_sequence([3, 9, 4])
    first = verifier_lm.new_session()
    first.sync(PROMPT)
    first.score_tree(tree)
    tree.add_node(ROOT, 7)
    tree.add_node(1, 11)
    grown = first.extend_scored(tree)
    tree.add_node(4, 2)
    grown_again = first.extend_scored(tree)
    whole = verifier_lm.new_session()
    whole.sync(PROMPT)
    rows = whole.score_tree(tree)
    torch.testing.assert_close(grown, rows[4:6], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grown_again, rows[6:7], rtol=1e-4, atol=1e-5)


def test_extend_scored_refuses_a_tree_it_did_not_score(verifier_lm):  # noqa: F811
    session = verifier_lm.new_session()
    session.sync(PROMPT)
    with pytest.raises(ValueError, match="extend_scored"):
        session.extend_scored(TokenTree())


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.7)], ids=["greedy", "t0.7"])
def test_each_unit_is_the_draft_of_its_real_context(twin_lm, sampling):  # noqa: F811
    drafter = LMDrafter(twin_lm, name="twin")
    chain = [4, 19, 33]
    units = drafter.propose_ahead(PROMPT, chain, [2, 1, 1, 3], 4, sampling, torch.Generator().manual_seed(1),
                                  session_id="s")
    assert [u.accepted for u in units] == [0, 0, 1, 2, 3, 3, 3]
    for u in units:
        if u.accepted < len(chain):
            assert u.bonus != chain[u.accepted]  # the token that would have been accepted is no guess
        context = PROMPT + chain[: u.accepted] + [u.bonus]
        assert len(u.proposal.tokens) == 4
        session = twin_lm.new_session()
        for i, token in enumerate(u.proposal.tokens):
            session.sync(context + u.proposal.tokens[:i])
            logits = session.next_logits()
            if sampling.greedy:
                assert token == int(logits.argmax())
            else:
                torch.testing.assert_close(u.proposal.probs[i], process_logits(logits, sampling), rtol=1e-4, atol=1e-6)
    # the guesses at each accept length are the drafter's most likely other tokens
    session = twin_lm.new_session()
    session.sync(PROMPT + chain[:1])
    row = session.next_logits().clone()
    row[chain[1]] = float("-inf")
    assert [u.bonus for u in units if u.accepted == 1] == [int(row.argmax())]


def test_a_tree_build_drafts_for_every_branchs_ends(twin_lm):  # noqa: F811
    """A draft with two branches (an LM chain and a suffix match beside it): every end, on either
    branch, gets units drafted from exactly the text its outcome commits; an end's guesses exclude
    all its children's tokens."""
    drafter = LMDrafter(twin_lm, name="twin")
    tokens, parents = [4, 19, 33, 7, 12], [-1, 0, 1, 0, 3]  # 4 -> 19 -> 33, and 4 -> 7 -> 12
    fanout = [1, 2, 1, 1, 1, 2]  # ends: root, after 4, after 4 19, after 4 19 33, after 4 7, after 4 7 12
    units = drafter.propose_ahead(PROMPT, tokens, fanout, 3, SamplingParams(), session_id="t", parents=parents)
    assert [u.accepted for u in units] == [0, 1, 1, 2, 3, 4, 5, 5]
    paths = {0: [], 1: [4], 2: [4, 19], 3: [4, 19, 33], 4: [4, 7], 5: [4, 7, 12]}
    excluded = {0: {4}, 1: {19, 7}, 2: {33}, 3: set(), 4: {12}, 5: set()}
    for u in units:
        assert u.bonus not in excluded[u.accepted]
        context = PROMPT + paths[u.accepted] + [u.bonus]
        session = twin_lm.new_session()
        for i, token in enumerate(u.proposal.tokens):
            session.sync(context + u.proposal.tokens[:i])
            assert token == int(session.next_logits().argmax())
    session = twin_lm.new_session()
    session.sync(PROMPT + [4])
    row = session.next_logits().clone()
    row[[19, 7]] = float("-inf")
    assert [u.bonus for u in units if u.accepted == 1] == torch.topk(row, 2).indices.tolist()
    with pytest.raises(ValueError, match="parents"):
        drafter.propose_ahead(PROMPT, tokens, fanout, 3, SamplingParams(), session_id="t", parents=[-1, 2, 1, 0, 3])


def test_fanout_over_a_tree_weighs_each_end_by_how_likely_the_path_stops_there():
    from specserve.engine.ahead import outcome_probabilities

    # a chain: P(k* = k) = prod_{j<=k} a_j (1 - a_{k+1})
    assert outcome_probabilities([0.6, 0.5], [-1, 0]) == pytest.approx([0.4, 0.3, 0.3])
    # two branches under the root (the second one's token is right only where the first's is not)
    probs = outcome_probabilities([0.6, 0.5], [-1, 0, -1])
    assert probs == pytest.approx([0.4 - 0.24, 0.3, 0.3, 0.24]) and sum(probs) == pytest.approx(1.0)
    fanout = allocate_fanout([0.6, 0.5], 3, 9, r=0.0, parents=[-1, 0, -1])
    assert sum(fanout) == 9 and fanout[2] >= 1 and all(f >= 1 for f in fanout)  # the primary's full acceptance kept


def test_a_build_past_its_deadline_returns_every_unit_as_deep_as_it_got(twin_lm, monkeypatch):  # noqa: F811
    """A continuation step that would end past the deadline (by the last step's time) is not
    started: the units come back shallower, each a prefix of what the full build drafts."""
    import time as time_module

    from specserve.models.causal_lm import LMSession

    drafter = LMDrafter(twin_lm, name="twin")
    chain, fanout, greedy = [4, 19, 33], [2, 1, 1, 3], SamplingParams()
    full = drafter.propose_ahead(PROMPT, chain, fanout, 4, greedy, session_id="full")
    assert all(len(u.proposal.tokens) == 4 for u in full)
    extend = LMSession.extend_scored

    def slow_extend(self, tree):
        time_module.sleep(0.3)
        return extend(self, tree)

    monkeypatch.setattr(LMSession, "extend_scored", slow_extend)
    # steps start at ~0 and ~0.3 s; a third would start at ~0.6 s and end at ~0.9 s, past 0.75 s
    cut = drafter.propose_ahead(PROMPT, chain, fanout, 4, greedy, session_id="cut", deadline_s=0.75)
    assert [(u.accepted, u.bonus) for u in cut] == [(u.accepted, u.bonus) for u in full]
    for short, whole in zip(cut, full):
        assert short.proposal.tokens == whole.proposal.tokens[:2]


def test_sized_builds_get_a_deadline_from_the_measured_window():
    sized, unsized = EnumerateAndSelect(max_wait_fraction=0.25), EnumerateAndSelect(sized=False)
    assert sized.deadline_s() == 0.0  # nothing measured yet
    for strategy in (sized, unsized):
        strategy.budget.record(8, 3, 0.4, 1.0)
    assert sized.deadline_s() == pytest.approx(1.125)  # the window and half the grace after it
    assert unsized.deadline_s() == 0.0


def test_fanout_follows_the_acceptance_and_always_covers_full_acceptance():
    assert sum(allocate_fanout([0.9] * 4, 4, 8)) == 8
    high = allocate_fanout([0.95] * 4, 4, 8)
    low = allocate_fanout([0.2] * 4, 4, 8)
    assert high[-1] > low[-1] >= 1 and low[0] > high[0]
    assert allocate_fanout([0.5], 0, 4) == [4]  # an empty chain: every unit guesses the next token
    assert allocate_fanout([0.5] * 2, 2, 0) == [0, 0, 0]


def engine_with(verifier, twin_lm, **kw):  # noqa: F811
    """Drafter and verifier share this process's one compute thread, so a build only starts after
    the verification it runs "under": the strategy waits for it (a separate device would not), and
    builds are not sized by time (that would make what is built depend on this machine's speed)."""
    drafters = [LocalDrafter(LMDrafter(twin_lm, name="twin")), LocalDrafter(PromptLookupDrafter())]
    return SpeculativeEngine(verifier, drafters, ahead=EnumerateAndSelect(max_wait_fraction=1e6, sized=False), **kw)


@pytest.mark.parametrize("dynamic", [True, False])
def test_enumerate_and_select_greedy_equals_plain_greedy(verifier_lm, twin_lm, dynamic):  # noqa: F811
    engine = engine_with(LocalVerifier(verifier_lm), twin_lm, dynamic_length=dynamic)
    tokens, stats = engine.run(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=48, rule="greedy", draft_length=4))
    assert tokens == plain(verifier_lm, 48)
    assert stats.ahead_outcomes.get("hit", 0) > 0 and stats.rounds_drafted_ahead > 0


def test_units_are_what_the_verifier_sees_after_a_hit(verifier_lm, twin_lm):  # noqa: F811
    verifier = RecordingVerifier(verifier_lm)
    engine = engine_with(verifier, twin_lm, dynamic_length=False)
    results = list(engine.generate(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=40, rule="greedy",
                                                     draft_length=3)))
    hits = [i for i, r in enumerate(results) if r.drafted_ahead]
    assert hits
    companion_nodes = 0
    for i in hits:
        committed, tree = verifier.calls[i]
        by = {node: {p.drafter for p in tree.proposals.get(tree.parents[node], []) if p.child == node}
              for node in range(len(tree))}
        session = twin_lm.new_session()
        for node in (n for n in range(len(tree)) if "twin" in by[n]):  # the twin's greedy chain from exactly the committed text
            session.sync(committed + [tree.tokens[n] for n in tree.path_to(node)[:-1]])
            assert tree.tokens[node] == int(session.next_logits().argmax())
        # beside the unit, prompt lookup's draft from the same text (the companion drafter)
        lookup = PromptLookupDrafter().propose(committed, 3, SamplingParams()).tokens
        assert [tree.tokens[n] for n in range(len(tree)) if "prompt-lookup" in by[n]] == lookup
        companion_nodes += len(lookup)
    assert companion_nodes > 0  # the text repeats: prompt lookup found something in some hit round


class FakeBuilder:
    """A drafter backend that builds ahead badly on purpose."""

    name = "fake"
    can_draft_ahead = True

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.builds = 0

    async def draft(self, call):
        raise RuntimeError("the fake only drafts ahead")

    async def draft_ahead(self, call):
        self.builds += 1
        if self.mode == "fail":
            raise RuntimeError("killed mid-build")
        if self.mode == "late":
            await asyncio.sleep(5)
        # every outcome covered, with a marker draft that must never be verified
        units = []
        for k in range(len(call.chain) + 1):
            for bonus in range(VOCAB):
                tree = TokenTree()
                tree.add_sequence([VOCAB - 1] * max(call.num_tokens, 1), drafter="fake")
                units.append(AheadUnitTree(k, bonus, tree))
        return AheadReply(stamp="someone:else:0" if self.mode == "stale" else call.stamp, units=units, drafter="fake")


@pytest.mark.parametrize("mode", ["stale", "fail", "late"])
def test_stale_failed_and_late_builds_cost_speed_only(verifier_lm, mode):  # noqa: F811
    builder = FakeBuilder(mode)
    verifier = RecordingVerifier(verifier_lm)
    strategy = EnumerateAndSelect(max_wait_fraction=0.0)
    engine = SpeculativeEngine(verifier, [builder, LocalDrafter(PromptLookupDrafter())], ahead=strategy,
                               dynamic_length=False)
    tokens, stats = engine.run(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=24, rule="greedy", draft_length=3))
    assert tokens == plain(verifier_lm, 24)
    assert builder.builds > 0
    assert stats.ahead_outcomes.get("hit", 0) == 0
    assert set(stats.ahead_outcomes) <= {{"stale": "stale", "fail": "failed", "late": "late"}[mode], "miss"}
    assert not any(p.drafter == "fake" for _, tree in verifier.calls for ps in tree.proposals.values() for p in ps)


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="enumerate-select"):
        make_strategy("guess")


def exact_marginal(lm, prompt: list[int], position: int, sampling: SamplingParams) -> torch.Tensor:
    """The verifier's law of the token at `position` (1-based) after `prompt`, summed exactly over
    every prefix (V^(position-1) of them, scored in one batch per step)."""
    prefixes, weights = [list(prompt)], torch.ones(1)
    for step in range(position):
        ids = torch.tensor(prefixes)
        with torch.inference_mode():
            logits = lm.model(input_ids=ids).logits[:, -1].float()
        probs = process_logits(logits, sampling)
        if step == position - 1:
            return (weights[:, None] * probs).sum(0)
        joint = (weights[:, None] * probs).flatten()
        keep = joint > 1e-9  # drop prefixes that cannot matter
        index = keep.nonzero().flatten()
        prefixes = [prefixes[i // VOCAB] + [int(i % VOCAB)] for i in index.tolist()]
        weights = joint[index]
    raise AssertionError("unreachable")


def cousin_of(lm, noise: float = 0.05):
    """A drafter that is like the verifier but clearly not it (its law differs measurably)."""
    model = copy.deepcopy(lm.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=generator))
    return CausalLM(model, tokenizer=None, name="cousin")


class UniformRowsClaimed(EnumerateAndSelect):
    """Broken on purpose: a unit's tokens keep their law but claim a uniform one."""

    async def take(self, build, ctx, reply, verify_seconds):
        outcome = await super().take(build, ctx, reply, verify_seconds)
        for tree in outcome.trees:
            for proposals in tree.proposals.values():
                for p in proposals:
                    p.draft_probs = torch.full_like(p.draft_probs, 1.0 / p.draft_probs.numel())
        return outcome


def third_token_p_value(verifier_lm, drafter_lm, strategy, runs: int) -> tuple[float, int]:  # noqa: F811
    """Token 3 is drafted by a unit whenever round 1's build hit: chi-square of its empirical
    marginal against the verifier's, computed exactly over all prefixes."""
    sampling = SamplingParams(temperature=0.2)
    prompt = PROMPT[:6]
    engine = SpeculativeEngine(LocalVerifier(verifier_lm), [LocalDrafter(LMDrafter(drafter_lm, name="cousin"))],
                               ahead=strategy, dynamic_length=False)
    counts = torch.zeros(VOCAB)
    hits = 0
    for seed in range(runs):
        results = list(engine.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=4, rule="sps",
                                                         sampling=sampling, draft_length=1, seed=seed)))
        tokens = [t for r in results for t in r.tokens]
        counts[tokens[2]] += 1
        hits += sum(r.drafted_ahead for r in results)
    expected = exact_marginal(verifier_lm, prompt, 3, sampling) * counts.sum()
    big = expected >= 5
    observed, wanted = counts[big].clone().double(), expected[big].clone().double()
    observed[-1] += counts[~big].sum()  # the rare tokens pooled into one cell
    wanted[-1] += expected[~big].sum()
    p = scipy_stats.chisquare(observed.numpy(), wanted.numpy() * observed.sum().item() / wanted.sum().item()).pvalue
    return float(p), hits


@pytest.mark.slow
def test_sps_with_enumerate_and_select_keeps_the_verifiers_law(verifier_lm):  # noqa: F811
    """The tiny random models' laws are flat, so the build is wide (48 units) to hit often; the
    negative control (rows that lie about the unit's law) shows the test can fail."""
    drafter = cousin_of(verifier_lm)
    # after a miss the next round goes undrafted ("instant": no model-free drafter here), so its
    # build enumerates the first token only, and hits often
    options = dict(units=48, max_wait_fraction=1e6, sized=False, miss_drafters="instant")
    p, hits = third_token_p_value(verifier_lm, drafter, EnumerateAndSelect(**options), 1000)
    assert hits > 250  # units really drafted those tokens
    assert p > 1e-3, p
    p_broken, _ = third_token_p_value(verifier_lm, drafter, UniformRowsClaimed(**options), 1000)
    assert p_broken < 1e-3, p_broken


def test_build_budget_sizes_builds_to_fit_under_verification():
    from specserve.engine.ahead import BuildBudget

    budget = BuildBudget(max_units=8)
    assert budget.plan(6) == (8, 6)  # nothing measured: as asked
    budget.record(8, 6, build_seconds=1.4, window_seconds=0.5)  # 0.2 s a step at width 8: far too slow
    units, tokens = budget.plan(6)
    assert units < 8 and tokens >= 1
    assert (tokens + 1) * budget.step(units) <= 0.9 * 0.5 or units == 1
    fast = BuildBudget(max_units=8)
    fast.record(8, 4, build_seconds=0.1, window_seconds=1.0)
    assert fast.plan(4) == (8, 4)
    assert fast.step(4) == fast.step(8) and fast.step(16) == pytest.approx(2 * fast.step(8))


class CountingLM(LocalDrafter):
    """A LocalDrafter that records what it is asked: synchronous drafts and builds."""

    def __init__(self, drafter) -> None:
        super().__init__(drafter)
        self.drafts: list[int] = []  # committed length of each synchronous draft
        self.builds: list[int] = []  # ... and of each build

    async def draft(self, call):
        self.drafts.append(len(call.committed))
        return await super().draft(call)

    async def draft_ahead(self, call):
        self.builds.append(len(call.committed))
        return await super().draft_ahead(call)


LONG_PROMPT = (PROMPT * 3)[:36]  # more than EnumerateAndSelect's max_sync_read (16) tokens


def test_the_first_round_reads_the_prompt_in_the_build_not_in_a_synchronous_draft(verifier_lm, twin_lm):  # noqa: F811
    """Round 0 goes to the verifier drafted by the instant drafters only; the LM reads the prompt
    in the build that runs during that verification (on separate compute: while the verifier
    reads it too), so round 1 can already be answered by a unit."""
    lm = CountingLM(LMDrafter(twin_lm, name="twin"))
    engine = SpeculativeEngine(LocalVerifier(verifier_lm), [lm, LocalDrafter(PromptLookupDrafter())],
                               ahead=EnumerateAndSelect(max_wait_fraction=1e6, sized=False), dynamic_length=False)
    results = list(engine.generate(GenerationRequest(prompt_ids=LONG_PROMPT, max_new_tokens=32, rule="greedy",
                                                     draft_length=3)))
    assert [t for r in results for t in r.tokens] == plain(verifier_lm, 32, LONG_PROMPT)
    assert lm.builds[0] == len(LONG_PROMPT)  # the first build read the prompt ...
    assert all(n > len(LONG_PROMPT) for n in lm.drafts)  # ... and no synchronous draft did
    assert results[1].drafted_ahead


def test_after_a_miss_the_lm_drafts_synchronously_unless_told_instant(verifier_lm, twin_lm):  # noqa: F811
    drafters = [LocalDrafter(LMDrafter(twin_lm, name="twin")), LocalDrafter(PromptLookupDrafter())]
    every, instant = EnumerateAndSelect(), EnumerateAndSelect(miss_drafters="instant")
    assert every.fallback_drafters(drafters, unseen=3) == drafters  # a few tokens to read: worth the LM's chain
    assert every.fallback_drafters(drafters, unseen=40) == drafters[1:]  # a prompt: read it in the build
    assert instant.fallback_drafters(drafters, unseen=3) == drafters[1:]
    with pytest.raises(ValueError, match="miss_drafters"):
        EnumerateAndSelect(miss_drafters="sometimes")


def test_the_first_rounds_build_is_neither_sized_nor_measured():
    """Round 0's verification reads the prompt: its window says nothing about a decode round's."""
    strategy = EnumerateAndSelect()
    strategy.budget.record(2, 3, 0.4, 1.0)  # a measured decode window: sized builds are 2 wide
    tree = TokenTree()
    tree.add_sequence([4, 19])

    builder = FakeBuilder("hit")

    async def draft_all(drafters, call):
        return []

    def ctx(round_index):
        return AheadContext(session_id="s", committed=list(PROMPT), tree=tree, round_index=round_index, seed=0,
                            sampling=SamplingParams(), rule="greedy", coupling="independent", next_depth=4,
                            accept_rates=[0.8] * 4, drafters=[builder], draft_all=draft_all)

    async def start(round_index):
        build = strategy.start(ctx(round_index))
        await build.task
        return build
    first, later = asyncio.run(start(0)), asyncio.run(start(1))
    assert (first.sized, first.units, first.tokens) == (False, strategy.units, 4)
    assert later.sized and later.units < strategy.units


def test_a_path_along_the_second_branch_selects_its_unit():
    """The verifier accepts the suffix branch, not the LM's chain: the unit for that end is the
    next draft (before, only the first chain was enumerated and this was a miss)."""
    from specserve.engine.workers import VerifyReply

    tree = TokenTree()
    tree.add_sequence([4, 19], drafter="lm")
    tree.add_sequence([7, 12, 30], drafter="suffix")  # a second branch under the root
    builder = FakeBuilder("hit")  # a unit for every (end, bonus), marked with VOCAB - 1 tokens

    async def draft_all(drafters, call):
        return []

    ctx = AheadContext(session_id="s", committed=list(PROMPT), tree=tree, round_index=1, seed=0,
                       sampling=SamplingParams(), rule="greedy", coupling="independent", next_depth=3,
                       accept_rates=[0.8] * 4, drafters=[builder], draft_all=draft_all)
    strategy = EnumerateAndSelect(sized=False)

    async def verify(reply):
        build = strategy.start(ctx)
        assert build.ends[(7, 12)] == 4  # node 3 (12) ends the path: end 1 + 3
        await build.task
        return await strategy.take(build, ctx, reply, 0.1)

    along_suffix = asyncio.run(verify(VerifyReply(tokens=[7, 12, 5], path=[2, 3])))
    assert along_suffix.status == "hit" and along_suffix.trees[0].tokens == [VOCAB - 1] * 3
    # a path the draft does not hold (a corrupt reply) is a miss, never some other end's unit
    assert asyncio.run(verify(VerifyReply(tokens=[7, 19, 5], path=[2, 1]))).status == "miss"


def test_a_cancelled_build_stops_at_its_next_step(twin_lm, monkeypatch):  # noqa: F811
    """Cancelling the awaiting task cannot stop the drafter's thread; its flag ends the build at
    the next continuation step, so the round's synchronous draft does not queue behind it."""
    import threading

    from specserve.engine.workers import AheadCall
    from specserve.models.causal_lm import LMSession

    steps, stepping = [], threading.Event()
    extend = LMSession.extend_scored

    def slow_extend(self, tree):
        steps.append(1)
        stepping.set()
        # a slow step: long enough that the whole 12-step build would take 6 s
        threading.Event().wait(0.5)
        return extend(self, tree)

    monkeypatch.setattr(LMSession, "extend_scored", slow_extend)
    lm = LocalDrafter(LMDrafter(twin_lm, name="twin"))
    call = AheadCall(session_id="s", committed=list(PROMPT), chain=[4, 19], fanout=[1, 1, 1], num_tokens=12,
                     sampling=SamplingParams(), seed=0, stamp="s:13:0")

    async def cancel_mid_build():
        task = asyncio.ensure_future(lm.draft_ahead(call))
        await asyncio.get_running_loop().run_in_executor(None, stepping.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(cancel_mid_build())
    # the lane's next call runs once the build let go of the drafter (bounded wait, not a sleep)
    assert lm._lock.acquire(timeout=10)
    lm._lock.release()
    assert len(steps) <= 2  # the step running at the cancel, at most: not the 12 asked for
