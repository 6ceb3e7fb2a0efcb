"""The Serve app in local testing mode (no cluster): the deployment graph wires up, the router's
remote backends carry protobuf bytes, and greedy speculative output equals plain greedy decoding.

A tiny random Llama (fp32, vocab 96) with a word-level tokenizer stands in for the real model:
the plumbing is the point here, not the model.
"""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from ray import serve  # noqa: E402

from specserve.engine.types import GenerationRequest  # noqa: E402
from specserve.models.causal_lm import CausalLM  # noqa: E402
from specserve.serve.app import build_app  # noqa: E402
from specserve.serve.deployments import grpc_status_for  # noqa: E402
from specserve.serve.router import RemoteDrafter, RemoteRounds, RemoteVerifier, WorkerUnavailable  # noqa: E402
from specserve.serve.service import ServiceError, VerifierUnavailable  # noqa: E402
from specserve.v1 import generation_pb2 as gen_pb  # noqa: E402

TINY_VOCAB = 96
PROMPT = [5, 9, 11, 5, 9, 11, 5, 9, 20, 31]


def save_tiny_model(path: str, seed: int = 0) -> str:
    """A 2-layer random Llama + a word-level tokenizer ("w0".."w92"), saved like a real checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(TINY_VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def tiny_settings(model_dir: str, **overrides) -> dict:
    """App args for the tiny model: every model role on it, the small drafter = its first layer."""
    args = {
        "models": {
            "verifier": model_dir,
            "small_drafter": model_dir,
            "medium_drafter": model_dir,
            "small_drafter_layers": 1,
            "session_cache_size": 4,
        },
        "drafters": ["ngram", "small", "medium"],
        "draft_timeout_s": 20.0,
        "verify_timeout_s": 20.0,
    }
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def plain_greedy(tiny_model_dir) -> list[int]:
    lm = CausalLM.load(tiny_model_dir, dtype="float32")
    return lm.plain_generate(PROMPT, 24, stop_ids=())


def token_request(max_new_tokens: int = 24, **fields) -> gen_pb.GenerateRequest:
    return gen_pb.GenerateRequest(
        token_ids=gen_pb.TokenIds(ids=PROMPT),
        rule="greedy",
        max_new_tokens=max_new_tokens,
        seed=7,
        stop_token_ids=[],
        **fields,
    )


@pytest.fixture(scope="module", params=["verifier", "router"])
def local_router(tiny_model_dir, request):
    # both app shapes: the verifier replica runs the rounds (default), or the router does
    handle = serve.run(build_app(tiny_settings(tiny_model_dir, round_driver=request.param)), _local_testing_mode=True)
    yield handle


def test_local_app_greedy_equals_plain_greedy(local_router, plain_greedy):
    reply = local_router.Generate.remote(token_request()).result()
    # the tiny model's eos (2) may come up: plain decoding includes it and stops, so compare prefixes
    assert list(reply.token_ids) == plain_greedy[: len(reply.token_ids)]
    assert len(reply.token_ids) == 24 or reply.token_ids[-1] == 2
    stats = reply.stats
    assert stats.rounds >= 1 and stats.generated_tokens == len(reply.token_ids)
    # (LM drafters' runner-up siblings, where the policy widens greedy chains, are "<name>/alt")
    assert {d.removesuffix("/alt") for d in stats.drafters} <= {"ngram", "small", "medium"}
    # every drafter was consulted (drafted > 0) through the remote backends
    assert stats.drafted > 0


def test_local_app_concurrent_requests_each_equal_their_plain_greedy(local_router, tiny_model_dir):
    # concurrent requests share the Verifier replica's passes (cross-request batching)
    lm = CausalLM.load(tiny_model_dir, dtype="float32")
    prompts = [PROMPT[: 4 + 3 * i] for i in range(4)]
    requests = [token_request(16) for _ in prompts]
    for request, prompt in zip(requests, prompts):
        request.token_ids.ids[:] = prompt
    responses = [local_router.Generate.remote(r) for r in requests]  # all in flight at once
    for prompt, response in zip(prompts, responses):
        tokens = list(response.result().token_ids)
        assert tokens == lm.plain_generate(prompt, 16, stop_ids=())[: len(tokens)]
        assert len(tokens) == 16 or tokens[-1] == 2


def test_local_app_stream_matches_unary(local_router):
    unary = local_router.Generate.remote(token_request()).result()
    chunks = list(local_router.options(stream=True).GenerateStream.remote(token_request()))
    streamed = [t for c in chunks for t in c.token_ids]
    assert streamed == list(unary.token_ids)
    assert chunks[-1].HasField("stats") and len(chunks) >= 2


def test_local_app_rejects_bad_input_with_invalid_argument(local_router):
    bad = gen_pb.GenerateRequest(token_ids=gen_pb.TokenIds(ids=[TINY_VOCAB + 5]), rule="greedy")
    with pytest.raises(ServiceError) as info:
        local_router.Generate.remote(bad).result()
    assert grpc_status_for(info.value)[0] == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_local_app_runs_mcsd_ti_through_remote_backends(local_router, temperature):
    # the LOSSY improved MCSD carries its target roots over the wire (DraftCall.roots, VerifyReply.next_roots)
    request = token_request(16, tree=gen_pb.TreeConfig(branching=[2, 1, 1]))
    request.rule = "mcsd-ti"
    request.sampling.temperature = temperature
    reply = local_router.Generate.remote(request).result()
    assert len(reply.token_ids) == 16 or reply.token_ids[-1] == 2
    assert reply.stats.generated_tokens == len(reply.token_ids)


# ---------------------------------------------------------------- remote backends, no Ray needed


class _Response:
    def __init__(self, coro_factory):
        self._factory = coro_factory
        self.cancelled = False

    def __await__(self):
        return self._factory().__await__()

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    """A DeploymentHandle stand-in: records options, answers with `behaviour(payload)`."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.calls: list[dict] = []
        self.responses: list[_Response] = []

    def options(self, **options):
        self.calls.append(options)
        return self

    def remote(self, payload):
        async def run():
            return await self.behaviour(payload)

        response = _Response(run)
        self.responses.append(response)
        return response


def _verify_call():
    from specserve.engine.types import RuleParams
    from specserve.engine.workers import VerifyCall
    from specserve.sampling.params import SamplingParams
    from specserve.tree.token_tree import TokenTree

    tree = TokenTree()
    tree.add_sequence([3, 4], drafter="ngram")
    return VerifyCall("s1", [1, 2], tree, SamplingParams(), "greedy", RuleParams(), seed=3)


def test_remote_verifier_retries_once_then_raises_unavailable():
    attempts = []

    async def dead(payload):
        attempts.append(payload)
        raise RuntimeError("ActorDiedError: replica gone")

    handle = FakeHandle(dead)
    verifier = RemoteVerifier(handle, timeout_s=1.0, attempts=2, retry_backoff_s=0.01)
    with pytest.raises(VerifierUnavailable):
        asyncio.run(verifier.verify(_verify_call()))
    assert len(attempts) == 2
    # the call travels over gRPC, keyed by the session for affinity
    assert handle.calls[0] == {"method_name": "verify", "session_id": "s1", "_by_reference": False}
    assert grpc_status_for(ServiceError(grpc.StatusCode.UNAVAILABLE, "x"))[0] == grpc.StatusCode.UNAVAILABLE


def test_remote_verifier_succeeds_on_retry():
    from specserve.engine.workers import VerifyReply
    from specserve.serve import convert

    state = {"n": 0}

    async def flaky(payload):
        state["n"] += 1
        if state["n"] == 1:
            raise RuntimeError("first replica died")
        return convert.verify_reply_to_proto(VerifyReply(tokens=[3, 4, 9], path=[0, 1])).SerializeToString()

    reply = asyncio.run(RemoteVerifier(FakeHandle(flaky), timeout_s=1.0, retry_backoff_s=0.01).verify(_verify_call()))
    assert reply.tokens == [3, 4, 9] and reply.path == [0, 1] and state["n"] == 2


class FakeStreams:
    """A DeploymentHandle stand-in for streaming calls, speaking the wire format of `Verifier.rounds`
    (a RoundsCall in, RoundReply messages out): the i-th call streams `scripts[i]` (RoundResults, or an
    exception to raise there), and records its options, its request and whether it was cancelled."""

    def __init__(self, *scripts):
        self.scripts = list(scripts)
        self.calls: list[dict] = []
        self.requests: list[GenerationRequest] = []
        self.cancelled: list[int] = []

    def options(self, **options):
        self.calls.append(options)
        return self

    def remote(self, payload: bytes):
        from specserve.serve import convert
        from specserve.v1 import internal_pb2 as int_pb

        index = len(self.requests)
        self.requests.append(convert.rounds_call_from_proto(int_pb.RoundsCall.FromString(payload)))
        streams = self

        class Stream:
            def __init__(self):
                self.items = iter(streams.scripts[index])

            def __aiter__(self):
                return self

            async def __anext__(self):
                item = next(self.items, None)
                if item is None:
                    raise StopAsyncIteration
                if isinstance(item, BaseException):
                    raise item
                return convert.round_reply_to_proto(item).SerializeToString()

            def cancel(self):
                streams.cancelled.append(index)

        return Stream()


def _rounds(*token_lists, finished_last=True):
    from specserve.engine.types import RoundResult

    out = [RoundResult(tokens=list(t), num_drafted=len(t) - 1, num_accepted=len(t) - 1) for t in token_lists]
    out[-1].finished = finished_last
    return out


def _collect(remote_rounds, request, upto=None):
    async def run():
        got = []
        gen = remote_rounds.rounds(request)
        async for result in gen:
            got.append(result)
            if upto is not None and len(got) == upto:
                await gen.aclose()
                break
        return got

    return asyncio.run(run())


def test_remote_rounds_resume_a_broken_stream_from_what_was_streamed():
    handle = FakeStreams(_rounds([5, 6], [7], finished_last=False) + [RuntimeError("replica died")], _rounds([8, 9]))
    verifier = RemoteVerifier(handle, timeout_s=5.0, attempts=2, retry_backoff_s=0.0)
    request = GenerationRequest(prompt_ids=[1, 2, 3], max_new_tokens=5, rule="greedy", seed=11, session_id="s9")
    got = _collect(RemoteRounds(verifier, drafters=("ngram",)), request)
    assert [t for r in got for t in r.tokens] == [5, 6, 7, 8, 9]
    resumed = handle.requests[1]
    assert resumed.prompt_ids == [1, 2, 3, 5, 6, 7] and resumed.max_new_tokens == 2
    assert resumed.session_id == "s9" and resumed.seed != 11  # no random number is spent twice
    assert request.prompt_ids == [1, 2, 3] and request.max_new_tokens == 5  # the caller's request is untouched
    assert handle.calls[0] == {"method_name": "rounds", "stream": True, "session_id": "s9", "_by_reference": False}
    assert handle.cancelled == [0]  # the broken call is cancelled; the finished one is not


def test_remote_rounds_give_up_after_the_attempts_and_never_retry_a_bad_request():
    broken = FakeStreams([RuntimeError("down")], [RuntimeError("still down")])
    verifier = RemoteVerifier(broken, timeout_s=5.0, attempts=2, retry_backoff_s=0.0)
    request = GenerationRequest(prompt_ids=[1, 2], max_new_tokens=4, rule="greedy", seed=1, session_id="s")
    with pytest.raises(VerifierUnavailable, match="still down"):
        _collect(RemoteRounds(verifier, drafters=()), request)
    assert len(broken.requests) == 2
    bad = FakeStreams([ValueError("drafters: unknown drafter(s) ['x']")])
    with pytest.raises(ValueError, match="drafters"):
        _collect(RemoteRounds(RemoteVerifier(bad, timeout_s=5.0, attempts=2, retry_backoff_s=0.0), drafters=()), request)
    assert len(bad.requests) == 1


def test_remote_rounds_cancel_the_replicas_loop_when_the_consumer_leaves():
    handle = FakeStreams(_rounds([5], [6], [7]))
    verifier = RemoteVerifier(handle, timeout_s=5.0, attempts=2, retry_backoff_s=0.0)
    request = GenerationRequest(prompt_ids=[1], max_new_tokens=3, rule="greedy", session_id="s")
    got = _collect(RemoteRounds(verifier, drafters=()), request, upto=1)
    assert [r.tokens for r in got] == [[5]] and handle.cancelled == [0]


def test_remote_drafter_timeout_cancels_and_raises():
    from specserve.engine.workers import DraftCall
    from specserve.sampling.params import SamplingParams

    async def slow(payload):
        await asyncio.sleep(5)

    handle = FakeHandle(slow)
    drafter = RemoteDrafter("small", handle, timeout_s=0.05)
    with pytest.raises(WorkerUnavailable):
        asyncio.run(drafter.draft(DraftCall("s1", [1, 2], 3, SamplingParams(), seed=1)))
    assert handle.responses[0].cancelled


def _ahead_call():
    from specserve.engine.workers import AheadCall
    from specserve.sampling.params import SamplingParams

    return AheadCall("s1", [1, 2], chain=[3, 4], fanout=[1, 1, 1], num_tokens=4, sampling=SamplingParams(),
                     seed=1, stamp="s1:2:0")


@pytest.mark.parametrize("method", ["draft", "draft_ahead"])
def test_cancelled_remote_drafter_call_cancels_the_replicas_request(method):
    """A round that stops waiting (a build that missed, a consumer that left) cancels the
    DeploymentResponse: Serve does not cancel a unary call whose awaiting task is cancelled, and
    the replica would run the useless build on, in front of the next synchronous draft."""
    from specserve.engine.workers import DraftCall
    from specserve.sampling.params import SamplingParams

    started = asyncio.Event()

    async def slow(payload):
        started.set()
        await asyncio.sleep(5)

    handle = FakeHandle(slow)
    drafter = RemoteDrafter("small", handle, timeout_s=10.0, can_draft_ahead=True)
    call = _ahead_call() if method == "draft_ahead" else DraftCall("s1", [1, 2], 3, SamplingParams(), seed=1)

    async def go():
        task = asyncio.ensure_future(getattr(drafter, method)(call))
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert handle.responses[0].cancelled


@pytest.mark.parametrize(
    "rule, encoding",
    [("greedy", "ROW_ENCODING_OMIT"), ("tas", "ROW_ENCODING_OMIT"), ("cactus", "ROW_ENCODING_FP16"),
     ("mcsd-ti", "ROW_ENCODING_FP16"), ("sps", "ROW_ENCODING_EXACT"), ("rrs", "ROW_ENCODING_EXACT"),
     ("", "ROW_ENCODING_EXACT")],
)
def test_remote_drafter_asks_only_for_the_rows_the_rule_reads(rule, encoding):
    from specserve.engine.workers import DraftCall, DraftReply
    from specserve.sampling.params import SamplingParams
    from specserve.tree.token_tree import TokenTree
    from specserve.serve import convert
    from specserve.v1 import internal_pb2 as int_pb

    seen = []

    async def answer(payload):
        seen.append(int_pb.DraftCall.FromString(payload).row_encoding)
        return convert.draft_reply_to_proto(DraftReply(TokenTree(), "small")).SerializeToString()

    asyncio.run(RemoteDrafter("small", FakeHandle(answer), timeout_s=1.0).draft(
        DraftCall("s1", [1, 2], 3, SamplingParams(), seed=1, rule=rule)))
    assert seen == [int_pb.RowEncoding.Value(encoding)]


def test_engine_request_type_is_what_the_router_speaks():
    # the router hands the service's GenerationRequest to the engine loop unchanged
    assert GenerationRequest(prompt_ids=[1]).session_id == ""


def test_local_app_enumerate_and_select_equals_plain_greedy(tiny_model_dir, plain_greedy):
    """Drafting ahead through the remote backends: the medium drafter deployment builds units
    (draft_ahead), the router selects; greedy output is plain greedy output."""
    # one process, one compute thread: a build runs after the verification it hides behind, so
    # the router waits for it (ahead_max_wait) instead of drafting without it
    handle = serve.run(build_app(tiny_settings(tiny_model_dir, drafters=["ngram", "medium"], ahead_max_wait=1e6,
                                               drafting_ahead="enumerate-select", name="ahead")),
                       _local_testing_mode=True)
    reply = handle.Generate.remote(token_request()).result()
    assert list(reply.token_ids) == plain_greedy[: len(reply.token_ids)]
    # the medium drafter is the verifier's own model: every build holds what happened
    assert reply.stats.drafting_ahead["hit"] > 0
