"""Cross-request verification batching: several sessions' trees in ONE forward (models/batched.py),
the verifier's batch entry point (LocalVerifier.verify_batch_sync) and the continuous batcher.

Tiny random fp32 models, so these are exact-math checks: batched rows equal rows scored alone,
the KV cache each session keeps afterwards is the one it would have kept alone, and concurrent
greedy generations through a batching verifier equal plain greedy decoding token for token."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from specserve.engine import GenerationRequest
from specserve.engine.local import ContinuousBatcher, LocalDrafter, LocalVerifier
from specserve.engine.loop import DecodeLoop
from specserve.engine.workers import VerifyCall
from specserve.models.batched import score_trees
from specserve.models.causal_lm import CausalLM
from specserve.models.drafters import LMDrafter
from specserve.models.ngram import PromptLookupDrafter
from specserve.sampling.params import SamplingParams
from specserve.tree.token_tree import TokenTree

from test_engine import twin_lm, verifier_lm  # noqa: F401 - fixtures
from test_models import ATOL, VOCAB, branching_tree, check_rows, random_ids, tiny_model


@pytest.fixture(params=[("llama", "sdpa"), ("qwen2", "eager")], ids=lambda p: "-".join(p))
def lm(request) -> CausalLM:
    arch, attn = request.param
    return CausalLM(tiny_model(arch, attn), tokenizer=None, name=f"tiny-{arch}-{attn}")


def chain(tokens: list[int]) -> TokenTree:
    tree = TokenTree()
    tree.add_sequence(tokens)
    return tree


# sessions of different lengths (one with an empty cache), trees of different sizes and shapes
CASES = [
    (random_ids(11, seed=1), chain(random_ids(5, seed=2))),
    (random_ids(3, seed=3), branching_tree(seed=4)),
    (random_ids(1, seed=5), chain(random_ids(2, seed=6))),  # nothing cached before the pending token
    (random_ids(20, seed=7), TokenTree()),  # a verifier-only round
]


def test_batched_rows_equal_rows_scored_alone(lm):
    sessions = [lm.new_session() for _ in CASES]
    for session, (committed, _) in zip(sessions, CASES):
        session.sync(committed)
    rows = score_trees(sessions, [tree for _, tree in CASES])
    for (committed, tree), logits in zip(CASES, rows):
        check_rows(lm, committed, tree, logits)  # against plain full forwards without a cache


def test_each_session_keeps_its_own_cache_after_a_batched_pass(lm):
    """Score in a batch, commit a path per session, then score again (batched and alone): the
    rows must still be right, i.e. each cache holds exactly its own accepted rows."""
    sessions = [lm.new_session() for _ in CASES]
    for session, (committed, _) in zip(sessions, CASES):
        session.sync(committed)
    trees = [tree for _, tree in CASES]
    score_trees(sessions, trees)
    for session, tree in zip(sessions, trees):
        leaf = len(tree) - 1
        path = tree.path_to(leaf) if len(tree) else []
        session.commit(path, tree, next_token=13)
    forwards = [s.forwards for s in sessions]
    second = [chain(random_ids(3, seed=20 + i)) for i in range(len(sessions))]
    rows = score_trees(sessions, second)
    assert [s.forwards for s in sessions] == [f + 1 for f in forwards]  # kept rows reused, no prefill
    for session, tree, logits in zip(sessions, second, rows):
        check_rows(lm, session.committed, tree, logits)


def test_a_session_twice_in_one_batch_is_refused(lm):
    session = lm.new_session()
    session.sync(random_ids(5, seed=1))
    with pytest.raises(ValueError, match="only once"):
        score_trees([session, session], [chain([1]), chain([2])])


def greedy_call(session_id: str, committed: list[int], tree: TokenTree, rule: str = "greedy") -> VerifyCall:
    from specserve.engine.types import RuleParams

    return VerifyCall(session_id, committed, tree, SamplingParams(), rule, RuleParams(), seed=1)


def test_verify_batch_sync_answers_each_call_and_isolates_a_bad_one(lm):
    verifier = LocalVerifier(lm, max_batch_size=8)
    good = [greedy_call(f"s{i}", committed, tree) for i, (committed, tree) in enumerate(CASES)]
    bad = greedy_call("bad", random_ids(4, seed=9), chain([VOCAB + 50]))  # id beyond the embedding
    replies = verifier.verify_batch_sync(good[:2] + [bad] + good[2:])
    assert isinstance(replies[2], Exception)
    answered = replies[:2] + replies[3:]
    alone = LocalVerifier(lm)
    for call, reply in zip(good, answered):
        assert not isinstance(reply, Exception), reply
        expected = alone.verify_sync(greedy_call("alone-" + call.session_id, call.committed, call.tree))
        assert reply.tokens == expected.tokens and reply.path == expected.path


def test_verify_batch_sync_runs_one_pass_for_the_batch(lm):
    verifier = LocalVerifier(lm, max_batch_size=8)
    calls = [greedy_call(f"s{i}", committed, tree) for i, (committed, tree) in enumerate(CASES)]
    verifier.verify_batch_sync(calls)
    assert verifier.shared_pass_sizes == [len(CASES)]


# ---- the continuous batcher ------------------------------------------------------------------


def test_continuous_batcher_groups_calls_that_arrive_while_a_batch_runs():
    seen: list[list[int]] = []

    def run_batch(items):
        seen.append(list(items))
        return [ValueError(f"bad {i}") if i == 3 else i * 10 for i in items]

    async def main():
        batcher = ContinuousBatcher(run_batch, max_batch_size=4)
        return await asyncio.gather(*(batcher.submit(i) for i in range(7)), return_exceptions=True)

    results = asyncio.run(main())
    assert results[:3] == [0, 10, 20] and results[4:] == [40, 50, 60]
    assert isinstance(results[3], ValueError)  # a failed item fails alone
    assert seen == [[0, 1, 2, 3], [4, 5, 6]]  # everything queued, in order, at most 4 per batch


def test_continuous_batcher_skips_cancelled_calls():
    ran: list[int] = []

    def run_batch(items):
        ran.extend(items)
        return items

    async def main():
        batcher = ContinuousBatcher(run_batch, max_batch_size=8)
        first = asyncio.ensure_future(batcher.submit(0))
        doomed = asyncio.ensure_future(batcher.submit(1))
        kept = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0)
        doomed.cancel()
        return await first, await kept

    assert asyncio.run(main()) == (0, 2)
    assert ran == [0, 2]  # the cancelled call never reached the model


# ---- end to end: concurrent generations through one batching verifier ------------------------


def test_concurrent_greedy_generations_through_a_batching_verifier_equal_plain_greedy(verifier_lm, twin_lm):  # noqa: F811
    prompts = [random_ids(6 + 3 * i, seed=40 + i) for i in range(5)]
    expected = [verifier_lm.plain_generate(p, 24, SamplingParams()) for p in prompts]
    verifier = LocalVerifier(verifier_lm, max_batch_size=8)
    loop = DecodeLoop(verifier, [LocalDrafter(LMDrafter(twin_lm, name="twin")), LocalDrafter(PromptLookupDrafter())])

    async def main():
        requests = [
            GenerationRequest(prompt_ids=p, max_new_tokens=24, rule="greedy", draft_length=3, session_id=f"r{i}")
            for i, p in enumerate(prompts)
        ]
        return await asyncio.gather(*(loop.generate(r) for r in requests))

    results = asyncio.run(main())
    for (tokens, _), want in zip(results, expected):
        assert tokens == want
    assert max(verifier.shared_pass_sizes) > 1  # the passes really were shared


def test_continuous_batcher_regroups_streams_that_alternate():
    """Two streams whose calls keep missing each other's passes: the batcher waits (briefly) for
    the caller of the last batches that is about to call again, and they share passes again."""
    seen: list[list[str]] = []

    def run_batch(items):
        time.sleep(0.02)
        seen.append(sorted(items))
        return items

    async def stream(batcher, name: str, delay: float, rounds: int):
        await asyncio.sleep(delay)
        for _ in range(rounds):
            await batcher.submit(name)
            await asyncio.sleep(0.003)  # drafting the next round

    async def main(key):
        batcher = ContinuousBatcher(run_batch, max_batch_size=4, key=key)
        await asyncio.gather(stream(batcher, "a", 0.0, 10), stream(batcher, "b", 0.01, 10))
        return batcher

    seen.clear()
    asyncio.run(main(None))
    alternating = sum(len(b) == 2 for b in seen)
    seen.clear()
    batcher = asyncio.run(main(lambda item: item))
    regrouped = sum(len(b) == 2 for b in seen)
    assert alternating <= 1 and regrouped >= 8, (alternating, regrouped)
    assert batcher.regroup_waits >= 1


def test_a_batch_waits_for_streams_whose_drafts_hold_its_compute_thread():
    """Streams whose LM drafts run one after another on the verifier's compute thread (a CPU) call
    later than the regroup grace; waiting for them costs nothing while that thread is busy (the
    batch would queue behind their drafts anyway), and without it the last drafters miss the pass
    and get passes of their own."""
    from specserve.models.compute import run_async

    seen: list[list[str]] = []

    def run_batch(items):
        time.sleep(0.01)
        seen.append(sorted(items))
        return items

    async def stream(batcher, name: str, rounds: int):
        for _ in range(rounds):
            await run_async(time.sleep, 0.02, device="cpu")  # an LM draft on the compute thread
            await batcher.submit(name)

    async def main(busy_waits: bool):
        batcher = ContinuousBatcher(run_batch, max_batch_size=4, device="cpu", key=lambda item: item,
                                    max_wait_s=0.005)
        if not busy_waits:
            batcher._thread_busy = lambda: False
        await asyncio.gather(*(stream(batcher, name, 8) for name in "abc"))

    for busy_waits in (False, True):
        seen.clear()
        asyncio.run(main(busy_waits))
        full = sum(len(b) == 3 for b in seen)
        if busy_waits:
            assert full >= 6 and len(seen) <= 10, seen  # ~one pass per round, all three streams in it
        else:
            assert full <= 4 and len(seen) >= 12, seen  # passes split between the streams
