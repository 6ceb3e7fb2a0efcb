"""The standalone grpc.aio server over real loopback gRPC (fake deterministic backends, real DecodeLoop)."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from specserve.client import AsyncSpecServeClient, SpecServeClient, SpecServeError, build_request
from specserve.serve.service import VerifierUnavailable
from specserve.v1 import generation_pb2 as gen_pb
from test_grpc_support import (
    EOS,
    FakeDrafter,
    FakeVerifier,
    ServerThread,
    byte_tokenizer,
    expected_continuation,
    free_port,
    make_service,
)

PROMPT = "The quick brown fox"
PROMPT_IDS = list(PROMPT.encode())


@pytest.fixture(scope="module")
def server():
    with ServerThread(make_service(), metrics_port=free_port()) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with SpecServeClient(server.target, timeout=30) as c:
        yield c


def test_stream_end_to_end(client):
    want = expected_continuation(PROMPT_IDS, 40)
    chunks = list(client.generate_stream(PROMPT, max_new_tokens=40, draft_length=4, rule="greedy"))
    ids = [t for c in chunks for t in c.token_ids]
    assert ids == want
    assert "".join(c.text for c in chunks) == bytes(want).decode()
    assert len(chunks) > 2  # one chunk per round: tokens really stream
    last = chunks[-1]
    assert last.finish_reason == gen_pb.FINISH_REASON_LENGTH and last.session_id
    st = last.stats
    assert st.generated_tokens == 40 and st.prompt_tokens == len(PROMPT_IDS)
    assert st.rounds == sum(1 for c in chunks if c.HasField("round"))
    assert 0 < st.accepted < st.drafted  # the fake drafter is right most of the time, not always
    assert st.tokens_per_step == pytest.approx(40 / st.rounds) and st.tokens_per_step > 1.5
    assert st.mean_accepted_length == pytest.approx(st.accepted / st.rounds)
    assert st.drafters["fake"].drafted == st.drafted and st.drafters["fake"].accepted == st.accepted
    assert sum(st.accepted_per_position) == st.accepted and list(st.accepted_per_position) == sorted(
        st.accepted_per_position, reverse=True
    )
    assert st.rule == "greedy" and not st.lossy
    assert st.timings.time_to_first_token_seconds <= st.timings.total_seconds


def test_unary_equals_stream(client):
    reply = client.generate(list(PROMPT_IDS), max_new_tokens=25, draft_length=3)
    want = expected_continuation(PROMPT_IDS, 25)
    assert list(reply.token_ids) == want and reply.text == bytes(want).decode()
    assert reply.finish_reason == gen_pb.FINISH_REASON_LENGTH and reply.stats.generated_tokens == 25


def test_stop_sequence_and_stop_token(client):
    full = bytes(expected_continuation(PROMPT_IDS, 60)).decode()
    stop = full[20:23]
    reply = client.generate(PROMPT, max_new_tokens=60, stop=[stop, "never-there"])
    assert reply.finish_reason == gen_pb.FINISH_REASON_STOP_SEQUENCE
    assert reply.text == full[: full.find(stop)]
    # ids end with the token that completed the stop sequence, even mid-round (one char per token here)
    assert list(reply.token_ids) == list(full[: full.find(stop) + 3].encode())
    assert reply.stats.generated_tokens == len(reply.token_ids)
    # streamed text never shows a prefix of the stop sequence that later completes it
    streamed = "".join(c.text for c in client.generate_stream(PROMPT, max_new_tokens=60, stop=[stop]))
    assert streamed == reply.text

    want = expected_continuation(PROMPT_IDS, 60)
    stop_id = want[10]
    reply = client.generate(PROMPT, max_new_tokens=60, stop_token_ids=[stop_id])
    assert reply.finish_reason == gen_pb.FINISH_REASON_STOP
    assert list(reply.token_ids) == want[: want.index(stop_id) + 1]


BAD_REQUESTS = [
    ("prompt", lambda r: r.ClearField("text")),
    ("prompt.text", lambda r: setattr(r, "text", "")),
    ("prompt.token_ids", lambda r: r.token_ids.SetInParent()),
    ("prompt.token_ids[1]", lambda r: r.token_ids.ids.extend([5, 257])),
    ("prompt.token_ids[0]", lambda r: r.token_ids.ids.extend([-1])),
    ("prompt.text", lambda r: setattr(r, "text", "x" * 600)),  # over the 512-token context
    ("sampling.temperature", lambda r: setattr(r.sampling, "temperature", -0.5)),
    ("sampling.temperature", lambda r: setattr(r.sampling, "temperature", float("nan"))),
    ("sampling.top_p", lambda r: setattr(r.sampling, "top_p", 0.0)),
    ("sampling.top_p", lambda r: setattr(r.sampling, "top_p", 1.5)),
    ("sampling.top_k", lambda r: setattr(r.sampling, "top_k", -3)),
    ("rule", lambda r: setattr(r, "rule", "yolo")),
    ("rule_params.delta", lambda r: setattr(r.rule_params, "delta", -0.1)),
    ("rule_params.tas_epsilon", lambda r: setattr(r.rule_params, "tas_epsilon", 0.0)),
    ("max_new_tokens", lambda r: setattr(r, "max_new_tokens", 0)),
    ("max_new_tokens", lambda r: setattr(r, "max_new_tokens", 100000)),
    ("max_new_tokens", lambda r: setattr(r, "max_new_tokens", 500)),  # fits the limit, not the context
    ("drafters[0]", lambda r: r.drafters.append("gpt-17")),
    ("drafters[1]", lambda r: r.drafters.extend(["fake", "fake"])),
    ("draft_length", lambda r: setattr(r, "draft_length", -1)),
    ("tree.branching[1]", lambda r: r.tree.branching.extend([2, 0])),
    ("tree.branching", lambda r: r.tree.branching.extend([8, 8, 8])),
    ("tree.branching[0]", lambda r: (setattr(r, "rule", "spechub"), r.tree.branching.extend([3]))),
    ("stop[0]", lambda r: r.stop.append("")),
    ("stop_token_ids[0]", lambda r: r.stop_token_ids.append(9999)),
    ("chat", lambda r: (r.token_ids.ids.append(5), setattr(r, "chat", True))),
]


def _bad(mutate) -> gen_pb.GenerateRequest:
    req = gen_pb.GenerateRequest(text="hello")
    mutate(req)
    return req


def test_bad_inputs_get_invalid_argument_naming_the_field_while_good_requests_complete(server):
    # a slow-ish good request in flight the whole time
    slow = make_service(FakeVerifier(delay=0.02))
    with ServerThread(slow) as slow_server, SpecServeClient(slow_server.target, timeout=30) as c:
        want = expected_continuation(PROMPT_IDS, 30)
        result = {}
        good = threading.Thread(target=lambda: result.setdefault("r", c.generate(PROMPT, max_new_tokens=30)))
        good.start()
        for field, mutate in BAD_REQUESTS:
            for method in (c.generate, lambda r: list(c.generate_stream(r))):
                with pytest.raises(SpecServeError) as err:
                    method(_bad(mutate))
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value)
                assert err.value.details.startswith(field + ":"), (field, err.value.details)
                assert "Traceback" not in err.value.details
        good.join(30)
        assert list(result["r"].token_ids) == want


def test_malformed_message_is_invalid_argument(server):
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.unary_unary("/specserve.v1.Generation/Generate")  # bytes in, bytes out
        for payload in (b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\xff\xff\xff\xff"):
            with pytest.raises(grpc.RpcError) as err:
                raw(payload, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("request:")


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "specserve.v1.Generation"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"specserve.v1.Generation", "grpc.health.v1.Health"} <= services
        from google.protobuf.descriptor_pool import DescriptorPool

        method = DescriptorPool(db).FindServiceByName("specserve.v1.Generation").methods_by_name["GenerateStream"]
        assert method.server_streaming and method.input_type.full_name == "specserve.v1.GenerateRequest"


def test_metrics_are_exported(server, client):
    client.generate(PROMPT, max_new_tokens=12, rule="greedy")
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.config.metrics_port}/metrics", timeout=10).read().decode()
    for needle in (
        'specserve_spec_decode_num_drafts_total{drafter="fake",rule="greedy"}',
        'specserve_spec_decode_num_draft_tokens_total{drafter="fake",rule="greedy"}',
        'specserve_spec_decode_num_accepted_tokens_total{drafter="fake",rule="greedy"}',
        'specserve_spec_decode_num_accepted_tokens_per_pos_total{position="0",rule="greedy"}',
        'specserve_spec_decode_mean_acceptance_length{rule="greedy"}',
        "specserve_time_to_first_token_seconds_bucket",
        "specserve_round_seconds_bucket",
        'specserve_requests_total{rule="greedy",status="OK"}',
    ):
        assert needle in body, needle


def test_deadline_exceeded_and_server_stays_healthy():
    with ServerThread(make_service(FakeVerifier(delay=0.1))) as s, SpecServeClient(s.target) as c:
        started = time.perf_counter()
        for call in (c.generate, lambda *a, **k: list(c.generate_stream(*a, **k))):
            with pytest.raises(SpecServeError) as err:
                call(PROMPT, max_new_tokens=200, timeout=0.4)
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.perf_counter() - started < 5
        assert list(c.generate(PROMPT, max_new_tokens=3, timeout=10).token_ids) == expected_continuation(PROMPT_IDS, 3)


def test_over_the_concurrency_limit_is_resource_exhausted():
    service = make_service(FakeVerifier(delay=0.05), max_concurrent_requests=1)
    with ServerThread(service) as s, SpecServeClient(s.target, timeout=30) as c:
        stream = c.generate_stream(PROMPT, max_new_tokens=30, draft_length=1)  # >= 15 rounds of 50 ms
        first = next(stream)  # in flight now
        with pytest.raises(SpecServeError) as err:
            c.generate(PROMPT, max_new_tokens=2)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        rest = list(stream)
        assert [t for ch in [first, *rest] for t in ch.token_ids] == expected_continuation(PROMPT_IDS, 30)


def test_verifier_gone_is_unavailable_and_bugs_are_internal_without_trace():
    for error, code in ((VerifierUnavailable("no replica"), grpc.StatusCode.UNAVAILABLE),
                        (RuntimeError("secret internals"), grpc.StatusCode.INTERNAL)):
        with ServerThread(make_service(FakeVerifier(error=error))) as s, SpecServeClient(s.target, timeout=10) as c:
            with pytest.raises(SpecServeError) as err:
                c.generate(PROMPT, max_new_tokens=5)
            assert err.value.code == code
            assert "secret" not in err.value.details and "Traceback" not in err.value.details


def test_draft_length_zero_is_plain_decoding_through_the_same_server(client):
    speculative = client.generate(PROMPT, max_new_tokens=20, rule="greedy")
    plain = client.generate(PROMPT, max_new_tokens=20, rule="greedy", draft_length=0)
    assert list(plain.token_ids) == list(speculative.token_ids) == expected_continuation(PROMPT_IDS, 20)
    assert plain.stats.drafted == 0 and plain.stats.rounds == 20  # one verifier step per token
    assert speculative.stats.drafted > 0


def test_a_failing_drafter_changes_speed_not_output():
    class Broken(FakeDrafter):
        async def draft(self, call):
            raise RuntimeError("drafter crashed")

    service = make_service(drafters=[Broken("broken"), FakeDrafter("fake")])
    with ServerThread(service) as s, SpecServeClient(s.target, timeout=30) as c:
        reply = c.generate(PROMPT, max_new_tokens=20)
        assert list(reply.token_ids) == expected_continuation(PROMPT_IDS, 20)
        assert reply.stats.drafters["fake"].drafted > 0 and "broken" not in reply.stats.drafters


def test_load_32_concurrent_streams_all_complete(server):
    n, new_tokens = 32, 48
    prompts = [f"request number {i}: " for i in range(n)]

    async def one(client, prompt):
        started = time.perf_counter()
        ids, first = [], None
        async for chunk in client.generate_stream(prompt, max_new_tokens=new_tokens):
            if first is None and chunk.token_ids:
                first = time.perf_counter() - started
            ids.extend(chunk.token_ids)
        return ids, first, time.perf_counter() - started

    async def run_all():
        async with AsyncSpecServeClient(server.target, timeout=60) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts)), 60)

    results = asyncio.run(run_all())
    assert len(results) == n
    for prompt, (ids, _, _) in zip(prompts, results):
        assert ids == expected_continuation(list(prompt.encode()), new_tokens)  # none lost, none mixed up
    latency = sorted(r[2] for r in results)
    ttft = sorted(r[1] for r in results)
    p = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    print(
        f"\n32 concurrent streams x {new_tokens} tokens: request latency p50 {statistics.median(latency) * 1e3:.1f} ms, "
        f"p99 {p(latency, 0.99) * 1e3:.1f} ms; time to first token p50 {statistics.median(ttft) * 1e3:.1f} ms, "
        f"p99 {p(ttft, 0.99) * 1e3:.1f} ms"
    )


def test_eos_ends_generation_and_is_not_in_the_text():
    class EndsAfterSeven(FakeVerifier):
        async def verify(self, call):
            reply = await super().verify(call)
            keep = len(PROMPT_IDS) + 7 - len(call.committed)  # token 8 of the answer is EOS
            if keep < len(reply.tokens):
                reply.tokens, reply.path = reply.tokens[:keep] + [EOS], reply.path[:keep]
            return reply

    with ServerThread(make_service(EndsAfterSeven())) as s, SpecServeClient(s.target, timeout=30) as c:
        reply = c.generate(PROMPT, max_new_tokens=50)
    want = expected_continuation(PROMPT_IDS, 7)
    assert list(reply.token_ids) == want + [EOS]
    assert reply.finish_reason == gen_pb.FINISH_REASON_STOP
    assert reply.text == bytes(want).decode() == byte_tokenizer().decode(want)


def test_a_failure_before_the_engine_is_internal_without_trace():
    service = make_service()

    class BrokenTokenizer(type(service.tokenizer)):
        def encode(self, *args, **kwargs):
            raise RuntimeError("secret tokenizer state")

    service.tokenizer.__class__ = BrokenTokenizer
    with ServerThread(service) as s, SpecServeClient(s.target, timeout=10) as c:
        with pytest.raises(SpecServeError) as err:
            c.generate(PROMPT, max_new_tokens=5)
        assert err.value.code == grpc.StatusCode.INTERNAL and err.value.details.startswith("internal error (incident")
        assert "secret" not in err.value.details
        # token-id prompts do not touch the tokenizer's encode: still served
        assert list(c.generate(PROMPT_IDS, max_new_tokens=3).token_ids) == expected_continuation(PROMPT_IDS, 3)
        # chat needs a chat template: the byte tokenizer has none
        with pytest.raises(SpecServeError, match="INVALID_ARGUMENT: chat:"):
            c.generate(PROMPT, chat=True)


def test_graceful_shutdown_drains_running_streams():
    s = ServerThread(make_service(FakeVerifier(delay=0.03)))
    with SpecServeClient(s.target, timeout=30) as c:
        stream = c.generate_stream(PROMPT, max_new_tokens=30, draft_length=1)  # >= 15 rounds of 50 ms
        ids = list(next(stream).token_ids)
        stopping = threading.Thread(target=lambda: s._run(s.server.stop(grace=20)))
        stopping.start()
        ids += [t for chunk in stream for t in chunk.token_ids]  # the running stream finishes
        stopping.join(30)
        assert ids == expected_continuation(PROMPT_IDS, 30)
        with pytest.raises(SpecServeError) as err:  # and the server takes nothing new
            c.generate(PROMPT, max_new_tokens=2, timeout=3)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    s.loop.call_soon_threadsafe(s.loop.stop)
    s.thread.join(5)
