"""The distributed app on a real (local) Ray cluster, driven through Serve's gRPC proxy.

One Ray session for the module. The model is a tiny random fp32 Llama (tests/test_ray_app.py), so
the cluster, the transport and the failure handling are what these tests exercise:

* a gRPC client gets streamed tokens, equal to plain greedy decoding;
* a drafter replica killed mid-generation: same output;
* every drafter replica killed: verifier-only rounds, same output;
* the verifier replica killed mid-generation: the request is retried to completion or ends with a
  clear UNAVAILABLE, never a hang;
* under drafter load the drafter deployment scales up and back down while the verifier's replica
  count stays put.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import grpc
import pytest
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Replicas report their own ongoing requests to the autoscaler. The default (the calling handles
# report queued + ongoing) left the drafter at 1 replica in about 1 run in 4 here, with the load
# running (thousands of calls done, no errors) and Serve reporting HEALTHY and no decision.
os.environ.setdefault("RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE", "0")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from specserve.engine.workers import AheadCall  # noqa: E402
from specserve.sampling.params import SamplingParams  # noqa: E402
from specserve.serve.app import GRPC_SERVICER_FUNCTION, build_app, run_local  # noqa: E402
from specserve.serve.autoscaling import running_replicas  # noqa: E402
from specserve.v1 import generation_pb2 as gen_pb  # noqa: E402
from specserve.v1 import generation_pb2_grpc as gen_grpc  # noqa: E402

from test_ray_app import PROMPT, save_tiny_model, tiny_settings  # noqa: E402

pytestmark = pytest.mark.slow

APP = "specserve"
MAX_NEW = 40
LONG_PROMPT, LONG_NEW = [7, 3, 12], 480  # no eos in these 480 greedy tokens (checked in the deadline test)


def free_port(start: int) -> int:
    for port in range(start, start + 500):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.25, describe=None):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    state = describe() if describe else repr(last)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (state: {state})")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = save_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        yield {"model_dir": model_dir, "tmp": tmp_path_factory.mktemp("config")}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def app(cluster):
    """Deployed the way `specserve serve` does it: a Serve config file through run_local, with the
    app builder + args as import path (the checked-in configs use a built app instead). Drafting
    ahead is enumerate-and-select, so every test below (greedy equality, concurrent streams, a
    drafter replica killed mid-generation = mid-build, the verifier killed) runs through it."""
    grpc_port = free_port(20100)
    HTTP["port"] = free_port(grpc_port + 1)
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": HTTP["port"]},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER_FUNCTION]},
        "applications": [{
            "name": APP,
            "route_prefix": "/specserve",
            "import_path": "specserve.serve.app:build_app",
            "args": tiny_settings(cluster["model_dir"], drafters=["ngram", "small"], draft_timeout_s=3.0,
                                  verify_timeout_s=15.0, drafting_ahead="enumerate-select"),
        }],
    }
    path = cluster["tmp"] / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    run_local(path)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield gen_grpc.GenerationStub(channel)
    channel.close()
    serve.delete(APP)  # no-op when a later test already deleted it


@pytest.fixture(scope="module")
def plain_greedy(cluster) -> list[int]:
    from specserve.models.causal_lm import CausalLM

    lm = CausalLM.load(cluster["model_dir"], dtype="float32")
    return lm.plain_generate(PROMPT, MAX_NEW, stop_ids=())


def greedy_request(**fields) -> gen_pb.GenerateRequest:
    return gen_pb.GenerateRequest(token_ids=gen_pb.TokenIds(ids=PROMPT), rule="greedy", max_new_tokens=MAX_NEW,
                                  seed=11, **fields)


METADATA = (("application", APP),)
HTTP: dict = {}  # Serve's HTTP proxy port (set by the app fixture)


def replica_actors(deployment: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]]


def kill_replicas(deployment: str) -> int:
    names = replica_actors(deployment)
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return len(names)


def expected(plain: list[int], got: list[int]) -> list[int]:
    # the tiny model's eos (2) ends generation early in both decoders
    return plain[: len(got)] if got and got[-1] == 2 else plain


def stream(stub, request, after_first_chunk=None, timeout=90):
    chunks = []
    for chunk in stub.GenerateStream(request, metadata=METADATA, timeout=timeout):
        chunks.append(chunk)
        if len(chunks) == 1 and after_first_chunk:
            after_first_chunk()
    return chunks


def test_model_replicas_compute_on_every_core_not_on_rays_one_thread(app):
    # Ray starts a fractional replica with OMP_NUM_THREADS=1; the cpu profile's torch_threads=0
    # gives the verifier and the LM drafter the node's cores (the n-gram one has no model)
    cores = len(os.sched_getaffinity(0))
    for deployment in ("Verifier", "SmallDrafter"):
        handle = serve.get_deployment_handle(deployment, app_name=APP)
        assert handle.compute_threads.remote().result(timeout_s=30) == cores, deployment


def test_grpc_stream_equals_plain_greedy(app, plain_greedy):
    chunks = stream(app, greedy_request())
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == expected(plain_greedy, tokens)
    assert len(chunks) >= 3  # one chunk per round + the final stats chunk
    assert chunks[-1].stats.generated_tokens == len(tokens)
    assert chunks[-1].stats.drafted > 0  # remote drafters took part


def test_grpc_unary_and_invalid_argument(app, plain_greedy):
    reply = app.Generate(greedy_request(), metadata=METADATA, timeout=60)
    assert list(reply.token_ids) == expected(plain_greedy, list(reply.token_ids))
    with pytest.raises(grpc.RpcError) as info:
        app.Generate(gen_pb.GenerateRequest(token_ids=gen_pb.TokenIds(ids=[10_000]), rule="greedy"),
                     metadata=METADATA, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_openai_http_through_serve_equals_the_grpc_api(app, plain_greedy):
    """The OpenAI-compatible API through Serve's HTTP proxy and the Router ingress, beside gRPC."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{HTTP['port']}/specserve/v1", api_key="unused",
                           max_retries=0, timeout=90)
    grpc_reply = app.Generate(greedy_request(), metadata=METADATA, timeout=60)
    body = {"rule": "greedy"}
    unary = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_NEW, seed=11, extra_body=body)
    assert unary.choices[0].text == grpc_reply.text
    assert unary.usage.completion_tokens == len(grpc_reply.token_ids)
    assert unary.model_extra["speculative_decoding"]["num_draft_tokens"] > 0
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_NEW, seed=11, stream=True,
                                            extra_body=body))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == grpc_reply.text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=-1)
    assert err.value.body["param"] == "temperature"


def test_client_deadline_ends_the_call_and_the_app_keeps_serving(app, plain_greedy, cluster):
    from specserve.models.causal_lm import CausalLM

    lm = CausalLM.load(cluster["model_dir"], dtype="float32")
    assert 2 not in lm.plain_generate(LONG_PROMPT, LONG_NEW, stop_ids=()), "the long request would end at eos"
    # Serve's gRPC proxy does not pass the client's deadline on; the client's channel enforces it
    # and the proxy cancels the router call, so the generation stops instead of running on
    long_request = greedy_request()
    long_request.token_ids.ids[:] = LONG_PROMPT
    long_request.max_new_tokens = LONG_NEW
    with pytest.raises(grpc.RpcError) as info:
        stream(app, long_request, timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    reply = app.Generate(greedy_request(), metadata=METADATA, timeout=60)
    assert list(reply.token_ids) == expected(plain_greedy, list(reply.token_ids))


def test_concurrent_streams_share_the_verifier_and_each_equals_plain_greedy(app, plain_greedy):
    # the Verifier replica batches concurrent verify calls into shared passes
    results: dict[int, list[int]] = {}

    def one(i: int) -> None:
        results[i] = [t for c in stream(app, greedy_request()) for t in c.token_ids]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1, 2, 3]
    for tokens in results.values():
        assert tokens == expected(plain_greedy, tokens)


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class SlowBuilder:
    """A drafter replica whose build never ends unless cancelled; counts both."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def draft_ahead(self, payload: bytes) -> bytes:
        self.started += 1
        try:
            await asyncio.sleep(120)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return b""

    def counts(self) -> tuple[int, int]:
        return self.started, self.cancelled


def test_a_cancelled_build_is_cancelled_on_the_drafter_replica(app):
    """The router cancels a build that missed; the replica's build must stop (LocalDrafter then
    stops the forwards at the next step: tests/test_engine_ahead.py), not run on in front of the
    round's synchronous draft."""
    from specserve.serve.router import RemoteDrafter

    handle = serve.run(SlowBuilder.bind(), name="slowbuild", route_prefix=None)
    drafter = RemoteDrafter("small", handle, timeout_s=60.0, grpc_transport=False, affinity=False,
                            can_draft_ahead=True)
    call = AheadCall("s1", [1, 2], chain=[3, 4], fanout=[1, 1, 1], num_tokens=4, sampling=SamplingParams(),
                     seed=1, stamp="s1:2:0")

    async def counts_when(predicate, what: str) -> tuple[int, int]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            counts = await handle.counts.remote()
            if predicate(counts):
                return counts
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what} (started, cancelled = {counts})")

    async def go() -> tuple[int, int]:
        build = asyncio.ensure_future(drafter.draft_ahead(call))
        await counts_when(lambda c: c[0] == 1, "the build to start on the replica")
        build.cancel()
        with pytest.raises(asyncio.CancelledError):
            await build
        return await counts_when(lambda c: c[1] >= 1, "the replica's build to be cancelled")

    try:
        assert asyncio.run(go()) == (1, 1)
    finally:
        serve.delete("slowbuild")


def test_drafter_replica_killed_mid_generation_same_output(app, plain_greedy):
    # the SmallDrafter is the enumerate-and-select builder: it dies mid-build
    before = set(replica_actors("SmallDrafter"))
    killed = []
    chunks = stream(app, greedy_request(), after_first_chunk=lambda: killed.append(kill_replicas("SmallDrafter")))
    tokens = [t for c in chunks for t in c.token_ids]
    assert killed == [1]
    assert tokens == expected(plain_greedy, tokens)
    # a NEW replica (serve.status can still count the killed one as RUNNING for a moment)
    wait_for(lambda: set(replica_actors("SmallDrafter")) - before and running_replicas(APP).get("SmallDrafter", 0) >= 1,
             60, "a new SmallDrafter replica")


def test_all_drafters_gone_falls_back_to_verifier_only(app, plain_greedy):
    assert kill_replicas("SmallDrafter") + kill_replicas("NgramDrafter") == 2
    chunks = stream(app, greedy_request())
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == expected(plain_greedy, tokens)
    rounds = [c.round for c in chunks if c.HasField("round")]
    assert any(r.num_drafted == 0 and len(c.token_ids) == 1 for r, c in zip(rounds, chunks))
    wait_for(lambda: min(running_replicas(APP).get(d, 0) for d in ("SmallDrafter", "NgramDrafter")) >= 1,
             60, "drafters to come back")


def test_verifier_killed_is_retried_or_unavailable(app, plain_greedy):
    killed = []
    try:
        chunks = stream(app, greedy_request(), after_first_chunk=lambda: killed.append(kill_replicas("Verifier")))
        tokens = [t for c in chunks for t in c.token_ids]
        assert tokens == expected(plain_greedy, tokens)  # retried on the restarted replica
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert killed == [1]
    wait_for(lambda: running_replicas(APP).get("Verifier", 0) >= 1, 60, "Verifier to come back")
    # and the app serves again
    reply = app.Generate(greedy_request(), metadata=METADATA, timeout=60)
    assert list(reply.token_ids) == expected(plain_greedy, list(reply.token_ids))


def test_drafters_autoscale_independently_of_the_verifier(cluster):
    # a clean cluster: no replicas from the fault tests competing for the 2 cores
    if serve.context._get_global_client(raise_if_no_controller_running=False) is not None:
        serve.delete(APP)
    fast = {"upscale_delay_s": 1.0, "downscale_delay_s": 2.0, "metrics_interval_s": 0.5,
            "look_back_period_s": 1.0}
    settings = tiny_settings(
        cluster["model_dir"],
        drafters=["ngram"],
        name="autoscale",
        ngram={"max_ongoing_requests": 2,
               "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, **fast}},
        # the verifier may scale too, but only on its own (absent) load
        verifier={"autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, **fast}},
    )
    serve.run(build_app(settings), name="autoscale", route_prefix="/autoscale")
    try:
        from specserve.engine.workers import DraftCall
        from specserve.sampling.params import SamplingParams
        from specserve.serve import convert

        def drafter_replicas_if(wanted):
            counts = running_replicas("autoscale")
            return counts if wanted(counts.get("NgramDrafter", 0)) else None

        def drafter_status():  # what Serve says, for the failure message
            status = serve.status().applications["autoscale"].deployments["NgramDrafter"]
            return (f"{status.status}, {status.replica_states}, {status.message!r}; "
                    f"{calls['done']} calls done, errors: {calls['errors'][-3:]}")

        drafter = serve.get_deployment_handle("NgramDrafter", app_name="autoscale")
        payload = convert.draft_call_to_proto(
            DraftCall("load", PROMPT * 20, 4, SamplingParams(), seed=1)).SerializeToString()
        stop = threading.Event()
        calls = {"done": 0, "errors": []}

        def load():  # keep ~8 drafter calls in flight (queued at the handle) until told to stop
            while not stop.is_set():
                responses = [drafter.draft.remote(payload) for _ in range(8)]
                for r in responses:
                    try:  # a failed call must not end the load (the thread would die silently)
                        r.result(timeout_s=30)
                        calls["done"] += 1
                    except Exception as err:  # noqa: BLE001 - recorded for the failure message
                        calls["errors"].append(repr(err)[:200])

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            counts = wait_for(lambda: drafter_replicas_if(lambda n: n >= 2), 120,
                              "NgramDrafter to scale up", interval_s=1.0, describe=drafter_status)
            assert counts["Verifier"] == 1
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        counts = wait_for(lambda: drafter_replicas_if(lambda n: n == 1), 120,
                          "NgramDrafter to scale back down", interval_s=1.0, describe=drafter_status)
        assert counts["Verifier"] == 1
    finally:
        serve.delete("autoscale")
