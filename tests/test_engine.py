"""Decode loop: exactness against plain greedy decoding, fault tolerance, stats, seeds.

Tiny randomly initialised fp32 Llama models stand in for real ones (fast, deterministic)."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specserve.engine import GenerationRequest, GenerationStats, SpeculativeEngine, round_seed
from specserve.engine.local import LocalDrafter, LocalVerifier
from specserve.engine.merge import accepted_by_drafter, merge_trees
from specserve.models.base import DraftProposal
from specserve.models.causal_lm import CausalLM
from specserve.models.drafters import EarlyExitDrafter, LMDrafter
from specserve.models.ngram import MaxGramDrafter, PromptLookupDrafter
from specserve.sampling.params import SamplingParams
from specserve.tree.token_tree import ROOT, TokenTree

VOCAB = 97


def tiny_lm(seed: int, layers: int = 2, name: str = "tiny") -> CausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return CausalLM(LlamaForCausalLM(config).eval().float(), tokenizer=None, name=name)


@pytest.fixture(scope="module")
def verifier_lm() -> CausalLM:
    return tiny_lm(0)


@pytest.fixture(scope="module")
def twin_lm(verifier_lm) -> CausalLM:
    """A copy of the verifier with slightly perturbed weights: agrees most of the time."""
    twin = copy.deepcopy(verifier_lm.model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.003 * torch.randn_like(p))
    return CausalLM(twin, tokenizer=None, name="twin")


PROMPT = [5, 17, 23, 42, 8, 5, 17, 23, 61, 3, 9, 5, 17]


def plain(lm: CausalLM, n: int, prompt=PROMPT, stops=()) -> list[int]:
    return lm.plain_generate(prompt, n, SamplingParams(), stop_ids=stops)


def run(verifier_lm, drafter_list, dynamic_length=True, **request) -> tuple[list[int], GenerationStats]:
    engine = SpeculativeEngine(
        LocalVerifier(verifier_lm), [LocalDrafter(d) for d in drafter_list], dynamic_length=dynamic_length
    )
    request.setdefault("prompt_ids", PROMPT)
    request.setdefault("rule", "greedy")
    return engine.run(GenerationRequest(**request))


# ---- exactness: greedy speculative == plain greedy --------------------------------------
@pytest.mark.parametrize(
    "make_drafters",
    [
        lambda v, t: [],  # verifier-only decoding
        lambda v, t: [LMDrafter(t, name="twin")],  # high acceptance: full-accept + bonus path
        lambda v, t: [LMDrafter(tiny_lm(7), name="stranger")],  # ~0 acceptance: correction path
        lambda v, t: [EarlyExitDrafter(v, 1)],
        lambda v, t: [PromptLookupDrafter(), MaxGramDrafter()],  # deterministic drafters
        lambda v, t: [LMDrafter(t, name="twin"), LMDrafter(tiny_lm(7), name="stranger"), PromptLookupDrafter()],
    ],
    ids=["none", "twin", "stranger", "early-exit", "ngram", "merged-three"],
)
@pytest.mark.parametrize("dynamic", [True, False])
def test_chain_greedy_equals_plain_greedy(verifier_lm, twin_lm, make_drafters, dynamic):
    drafters = make_drafters(verifier_lm, twin_lm)
    engine = SpeculativeEngine(
        LocalVerifier(verifier_lm), [LocalDrafter(d) for d in drafters], dynamic_length=dynamic
    )
    tokens, stats = engine.run(
        GenerationRequest(prompt_ids=PROMPT, max_new_tokens=40, rule="greedy", draft_length=5)
    )
    assert tokens == plain(verifier_lm, 40)
    assert stats.generated == 40
    assert stats.rounds <= 40
    if drafters and not dynamic:
        assert stats.drafted > 0


@pytest.mark.parametrize("rule", ["sps", "rrs", "spechub"])
def test_lossless_rules_at_temperature_zero_verify_as_greedy(verifier_lm, twin_lm, rule, monkeypatch):
    """A lossless rule at temperature 0 runs as the greedy rule (engine/types.py verification_rule):
    the same tokens as plain greedy, and no vocabulary-sized laws built for it on either side."""
    def no_laws(*args, **kwargs):
        raise AssertionError("process_logits called for a greedy-equivalent round")

    monkeypatch.setattr("specserve.engine.local.process_logits", no_laws)
    drafters = [LMDrafter(twin_lm, name="twin"), PromptLookupDrafter()]
    tokens, stats = run(verifier_lm, drafters, rule=rule, max_new_tokens=40, draft_length=5)
    assert tokens == plain(verifier_lm, 40)
    assert stats.accepted > 0


@pytest.mark.parametrize("tree_config", [(2, 2), (3, 1, 1), (2, 2, 2)])
def test_kconfig_tree_greedy_equals_plain_greedy(verifier_lm, twin_lm, tree_config):
    tokens, stats = run(
        verifier_lm, [LMDrafter(twin_lm, name="twin")], max_new_tokens=30, tree_config=tree_config
    )
    assert tokens == plain(verifier_lm, 30)
    assert stats.accepted > 0  # the twin agrees often: some tree paths were accepted


def test_high_acceptance_drafter_cuts_verifier_steps(verifier_lm):
    """The verifier as its own drafter accepts every draft: tokens/step = draft_length + 1."""
    tokens, stats = run(
        verifier_lm,
        [LMDrafter(verifier_lm, name="self")],
        dynamic_length=False,
        max_new_tokens=30,
        draft_length=4,
    )
    assert tokens == plain(verifier_lm, 30)
    assert stats.accepted == stats.drafted  # every drafted token was accepted
    assert stats.rounds == 6  # 5 tokens per round
    assert stats.acceptance_rate("self") == 1.0


# ---- fault tolerance -----------------------------------------------------------------------
class FlakyDrafter:
    """Raises on some calls, hangs on others, otherwise proposes the verifier's own continuation."""

    def __init__(self, inner, fail_on: set[int], hang_on: set[int] = frozenset(), name="flaky"):
        self.inner, self.fail_on, self.hang_on, self.name, self.calls = inner, fail_on, hang_on, name, 0

    def propose(self, context, num_tokens, params, generator=None):
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("replica died")
        if self.calls in self.hang_on:
            import time

            time.sleep(0.5)
        return self.inner.propose(context, num_tokens, params, generator)


def test_drafter_failures_change_speed_not_output(verifier_lm):
    flaky = FlakyDrafter(LMDrafter(verifier_lm, name="self"), fail_on={2, 3}, hang_on={5})
    engine = SpeculativeEngine(
        LocalVerifier(verifier_lm), [LocalDrafter(flaky)], draft_timeout_s=0.2, dynamic_length=False
    )
    tokens, stats = engine.run(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=40, rule="greedy"))
    assert tokens == plain(verifier_lm, 40)
    # calls 2, 3 (raised) and 5 (timed out) left their rounds verifier-only; every drafted
    # round accepted all its tokens (the drafter is the verifier itself), 4 but near the end
    rounds_with_drafts = stats.drafted_per_position[0]
    assert stats.rounds - rounds_with_drafts >= 3
    assert stats.accepted == stats.drafted
    assert stats.drafted_per_position[3] >= rounds_with_drafts - 1


def test_all_drafters_failing_is_plain_decoding(verifier_lm):
    dead = FlakyDrafter(MaxGramDrafter(), fail_on=set(range(1, 1000)), name="dead")
    tokens, stats = run(verifier_lm, [dead], max_new_tokens=12)
    assert tokens == plain(verifier_lm, 12)
    assert stats.rounds == 12 and stats.drafted == 0


# ---- stopping, stats, seeds ----------------------------------------------------------------
def test_stop_token_ends_generation(verifier_lm):
    reference = plain(verifier_lm, 40)
    stop = reference[10]
    expected = reference[: reference.index(stop) + 1]
    tokens, _ = run(verifier_lm, [LMDrafter(verifier_lm, name="self")], max_new_tokens=40, stop_token_ids=(stop,))
    assert tokens == expected


def test_rounds_stream_and_stats_add_up(verifier_lm, twin_lm):
    engine = SpeculativeEngine(LocalVerifier(verifier_lm), [LocalDrafter(LMDrafter(twin_lm, name="twin"))])
    stats = GenerationStats()
    results = list(engine.generate(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=25, rule="greedy"), stats))
    assert results[-1].finished and results[-1].finish_reason == "length"
    assert not any(r.finished for r in results[:-1])
    assert sum(len(r.tokens) for r in results) == stats.generated == 25
    assert stats.rounds == len(results)
    assert stats.accepted == sum(r.num_accepted for r in results) == sum(stats.accepted_per_position)
    assert stats.drafted == sum(stats.drafted_by_drafter.values())
    assert stats.accepted_by_drafter.get("twin", 0) == stats.accepted
    # per position: accepted at depth d <= drafted to depth d, and decreasing with depth
    for acc, dr in zip(stats.accepted_per_position, stats.drafted_per_position):
        assert acc <= dr
    assert stats.accepted_per_position == sorted(stats.accepted_per_position, reverse=True)
    assert stats.tokens_per_step == pytest.approx(25 / len(results))


def test_sampled_run_is_reproducible_and_consistent(verifier_lm, twin_lm):
    """Fixed depth: same seed, same tokens. (With dynamic length the depths follow measured
    timings, so a sampled run's exact tokens may differ between runs; its law does not.)"""

    def once(seed):
        return run(
            verifier_lm,
            [LMDrafter(twin_lm, name="twin"), PromptLookupDrafter()],
            dynamic_length=False,
            max_new_tokens=30,
            rule="sps",
            sampling=SamplingParams(temperature=1.0),
            seed=seed,
        )

    a, stats = once(11)
    b, _ = once(11)
    c, _ = once(12)
    assert a == b and a != c
    assert len(a) == stats.generated == 30
    assert all(0 <= t < VOCAB for t in a)
    assert stats.accepted <= stats.drafted
    assert stats.generated == stats.accepted + stats.rounds  # one correction/bonus per round


def test_round_seed_is_deterministic_and_distinct():
    seeds = {round_seed(s, r) for s in range(20) for r in range(50)}
    assert len(seeds) == 1000
    assert round_seed(3, 4) == round_seed(3, 4)


def test_unknown_drafter_name_is_refused(verifier_lm):
    with pytest.raises(ValueError, match="drafters"):
        run(verifier_lm, [MaxGramDrafter()], max_new_tokens=3, drafters=("nope",))


# ---- merging --------------------------------------------------------------------------------
def test_merge_keeps_proposals_and_merges_shared_prefixes():
    a, b = TokenTree(), TokenTree()
    a.add_sequence([1, 2, 3], drafter="a")
    b.add_sequence([1, 2, 4], drafter="b")
    b.add_sequence([5], drafter="b")
    merged = merge_trees([a, b])
    assert merged.tokens == [1, 2, 3, 5, 4]
    assert merged.parents == [ROOT, 0, 1, ROOT, 1]
    assert [p.drafter for p in merged.proposals[ROOT]] == ["a", "b", "b"]
    assert len(merged.proposals[0]) == 2  # both drafters proposed token 2 after token 1
    assert accepted_by_drafter(merged, [0, 1, 4]) == {"a": 2, "b": 3}
    assert merge_trees([a, b], max_depth=1).tokens == [1, 5]


def test_loop_is_backend_agnostic():
    """Any objects with async draft/verify work (what the Ray router plugs in)."""
    from specserve.engine.loop import DecodeLoop
    from specserve.engine.workers import DraftReply, VerifyReply

    class EchoVerifier:  # accepts every draft; bonus token 0
        async def verify(self, call):
            path = list(range(len(call.tree)))
            return VerifyReply([call.tree.tokens[i] for i in path] + [0], path)

    class CountDrafter:
        name = "count"

        async def draft(self, call):
            tree = TokenTree()
            tree.add_sequence([len(call.committed) + i for i in range(call.num_tokens)], drafter=self.name)
            return DraftReply(tree, self.name)

    loop = DecodeLoop(EchoVerifier(), [CountDrafter()], dynamic_length=False)
    tokens, stats = asyncio.run(loop.generate(GenerationRequest(prompt_ids=[9], max_new_tokens=7, draft_length=2)))
    # two full rounds of 2 drafts + bonus; the last token is verifier-only (never draft past the end)
    assert tokens == [1, 2, 0, 4, 5, 0, 0]
    assert stats.rounds == 3 and stats.drafted == 4


# ---- improved MCSD (mcsd-ti, LOSSY) ---------------------------------------------------------
def test_mcsd_ti_with_one_root_is_greedy_decoding(verifier_lm, twin_lm):
    """Width 1: the root is the verifier's argmax and the chain is exact-match verified, so
    nothing is selected among roots and the output is plain greedy decoding."""
    tokens, stats = run(
        verifier_lm, [LMDrafter(twin_lm, name="twin")], dynamic_length=False,
        max_new_tokens=30, rule="mcsd-ti", tree_config=(1,), draft_length=3,
    )
    assert tokens == plain(verifier_lm, 30)
    assert stats.accepted > 0 and "target" not in stats.drafted_by_drafter
    assert stats.accepted <= stats.drafted


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mcsd_ti_two_roots_runs_and_survives_drafter_failure(verifier_lm, twin_lm, temperature):
    flaky = FlakyDrafter(LMDrafter(twin_lm, name="twin"), fail_on={2, 4})
    tokens, stats = run(
        verifier_lm, [flaky], max_new_tokens=25, rule="mcsd-ti", tree_config=(2,), draft_length=3,
        sampling=SamplingParams(temperature=temperature), seed=5,
    )
    assert len(tokens) == stats.generated == 25
    assert all(0 <= t < VOCAB for t in tokens)
    assert stats.accepted <= stats.drafted
