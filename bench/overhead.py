"""Distributed overhead: the same requests in-process and through the gRPC front ends.

* in-process:  the engine's decode loop called directly (SpeculativeEngine over local backends);
* standalone:  the same loop object behind specserve's standalone grpc.aio server
               (GenerationService), called by the Python client over loopback: adds protobuf,
               gRPC and the service's validation/streaming bookkeeping per request and per round;
* http:        the same server's OpenAI-compatible HTTP API (`/v1/completions`, unary), called with
               httpx over loopback: FastAPI/uvicorn and JSON instead of gRPC;
* ray-serve:   the Serve app (router, drafter and verifier deployments, Serve's gRPC proxy),
               driven by deploy/round_overhead.py's `ServeApp`, interleaved request by request with
               the other setups on the same Spec-Bench prompt ids.

Greedy, same seed and drafters, so every setup decodes the same tokens in the same rounds and
the difference per round is pure transport/orchestration cost.
"""

from __future__ import annotations

import asyncio
import importlib.util
import statistics
import threading
import time
from pathlib import Path

from specserve.engine import GenerationRequest, SpeculativeEngine
from specserve.engine.local import LocalDrafter, LocalVerifier
from specserve.models.causal_lm import CausalLM
from specserve.models.drafters import EarlyExitDrafter
from specserve.models.ngram import PromptLookupDrafter
from specserve.serve.settings import deep_merge

from .prompts import Prompt, encode_chat
from .systems import stop_token_ids

REPO = Path(__file__).resolve().parent.parent

# The Serve app as shipped (the verifier replica runs the rounds: one handle hop a round), with the
# router running the rounds (two hops: drafters, then the verifier), and that with Ray's own torch
# threading (OMP_NUM_THREADS = a replica's whole num_cpus: one thread for the cpu profile's
# fractional replicas), which the app now overrides: the app as it was before both changes.
_RAYS_THREADS = {role: {"torch_threads": None} for role in ("verifier", "small", "medium")}
RAY_SETUPS = {
    "ray-serve": {},
    "ray-serve/router-drives": {"round_driver": "router"},
    "ray-serve/router-drives/1-thread": {"round_driver": "router", **_RAYS_THREADS},
}


class _ServerThread:
    """The standalone server on its own event loop in a background thread."""

    def __init__(self, service, port: int) -> None:
        from specserve.serve.grpc_server import ServerConfig, StandaloneServer

        self.loop = asyncio.new_event_loop()
        self.server = StandaloneServer(service, ServerConfig(port=port, http_port=0, grace_seconds=0))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(60)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _serve_app():
    path = REPO / "deploy" / "round_overhead.py"
    spec = importlib.util.spec_from_file_location("specserve_round_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ServeApp


def run_overhead(
    model: str,
    prompts: list[Prompt],
    max_new_tokens: int = 32,
    early_exit_layers: int = 8,
    port: int = 20461,
    with_ray: bool = False,
    dtype: str = "float32",
    max_prompt_tokens: int | None = 512,
    repeats: int = 2,
    progress=print,
    ray_setups: tuple[str, ...] | None = None,
    drafter: str | None = None,
) -> dict:
    from specserve.client.client import SpecServeClient
    from specserve.serve.grpc_server import model_info_for
    from specserve.serve.service import GenerationService

    lm = CausalLM.load(model, dtype=dtype)
    if drafter:  # an LM drafter of its own (MODEL@int8 ...): the app's `medium` deployment
        from specserve.models.drafters import LMDrafter
        from specserve.models.quantize import split_spec

        base, scheme = split_spec(drafter)
        drafter_lm = CausalLM.load(base, dtype=dtype, quantize=scheme, name=drafter)
        lm_drafter = LocalDrafter(LMDrafter(drafter_lm, name="medium", target_vocab_size=lm.vocab_size), name="medium")
        app_drafters = {"drafters": ["ngram", "medium"], "models": {"medium_drafter": drafter}}
    else:  # the verifier's own early exit: the app's `small` deployment
        lm_drafter = LocalDrafter(EarlyExitDrafter(lm, early_exit_layers), name="small")
        app_drafters = {}
    drafters = [LocalDrafter(PromptLookupDrafter(1, 4, name="ngram"), name="ngram"), lm_drafter]
    engine = SpeculativeEngine(LocalVerifier(lm), drafters)
    batch = [encode_chat(lm.tokenizer, p.text, max_prompt_tokens) for p in prompts]

    stops = tuple(stop_token_ids(lm))

    def request(ids):
        return GenerationRequest(prompt_ids=ids, max_new_tokens=max_new_tokens, rule="greedy", seed=1,
                                 stop_token_ids=stops)

    engine.run(request(batch[0][:32]))  # warm-up
    service = GenerationService(engine.loop, lm.tokenizer, model_info_for(lm, ("ngram", "small")))
    server = _ServerThread(service, port)
    # the Serve apps are deployed first, so their requests interleave with the others' below (this
    # VM's speed drifts by tens of % over minutes: setups run one after another would measure that)
    ray_apps = {setup: _serve_app()(model, early_exit_layers, overrides=deep_merge(app_drafters, overrides), name=f"overhead{n}")
                for n, (setup, overrides) in enumerate(RAY_SETUPS.items())
                if ray_setups is None or setup in ray_setups} if with_ray else {}
    import httpx2 as httpx

    url = f"http://127.0.0.1:{server.server.http_port}/v1/completions"
    try:
        with SpecServeClient(f"127.0.0.1:{server.port}", timeout=600) as client, httpx.Client(timeout=600) as http:

            def in_process(ids):
                t0 = time.perf_counter()
                tokens, stats = engine.run(request(ids))
                return {"seconds": time.perf_counter() - t0, "rounds": stats.rounds, "tokens": tokens,
                        "draft_per_round": stats.draft_seconds / stats.rounds,
                        "verify_per_round": stats.verify_seconds / stats.rounds}

            def grpc(ids):
                t0 = time.perf_counter()
                reply = client.generate(ids, rule="greedy", max_new_tokens=max_new_tokens, seed=1, stop_token_ids=stops)
                return {"seconds": time.perf_counter() - t0, "rounds": int(reply.stats.rounds),
                        "tokens": list(reply.token_ids), "text": reply.text}

            def http_(ids):
                t0 = time.perf_counter()
                body = http.post(url, json={"prompt": ids, "max_tokens": max_new_tokens, "rule": "greedy",
                                            "seed": 1, "stop_token_ids": list(stops)}).json()
                return {"seconds": time.perf_counter() - t0, "rounds": int(body["speculative_decoding"]["num_drafts"]),
                        "text": body["choices"][0]["text"]}

            def through(app):
                def call(ids):
                    r = app.generate(ids, max_new_tokens, stops)
                    return {**r, "draft_per_round": r["draft_seconds"] / r["rounds"],
                            "verify_per_round": r["verify_seconds"] / r["rounds"]}
                return call

            setups = {"in-process": in_process, "standalone-grpc": grpc, "standalone-http": http_,
                      **{setup: through(app) for setup, app in ray_apps.items()}}
            client.generate(batch[0][:32], rule="greedy", max_new_tokens=4, seed=1)  # warm the channel
            http.post(url, json={"prompt": batch[0][:32], "max_tokens": 4, "rule": "greedy", "seed": 1})
            for app in ray_apps.values():
                app.generate(batch[0], max_new_tokens, stops)  # warm caches and connections
            rows: dict[str, list[dict]] = {setup: [] for setup in setups}
            names = list(setups)
            for i, ids in enumerate(batch):
                for rep in range(repeats):
                    # rotate which setup goes first, so none always meets a warmer machine
                    k = (i + rep) % len(names)
                    for setup in names[k:] + names[:k]:
                        rows[setup].append(setups[setup](ids))
                    progress(f"overhead prompt {i}.{rep}: " + ", ".join(
                        f"{setup} {rows[setup][-1]['seconds'] / max(1, rows[setup][-1]['rounds']) * 1e3:.1f}"
                        for setup in names) + " ms/round")
    finally:
        server.close()
        for app in ray_apps.values():
            app.close()
    return {"kind": "overhead", "meta": {"model": model, "dtype": dtype, "max_new_tokens": max_new_tokens,
                                          "prompts": len(batch), "repeats": repeats,
                                          "drafters": ["ngram", drafter or f"early-exit:{early_exit_layers}"]},
            "rows": rows}


def summarize_overhead(result: dict) -> list[dict]:
    rows = result["rows"]

    def per_round(r):
        return r["seconds_per_round"] if "seconds_per_round" in r else r["seconds"] / max(1, r["rounds"])

    local = statistics.median(per_round(r) for r in rows["in-process"])
    out = []
    for setup, runs in rows.items():
        med = statistics.median(per_round(r) for r in runs)
        same = None
        if "tokens" in runs[0] and setup != "in-process":
            same = all(a["tokens"] == b["tokens"] for a, b in zip(runs, rows["in-process"]))
        if setup == "standalone-http":  # the same text as gRPC's for the same greedy request
            same = all(a["text"] == b["text"] for a, b in zip(runs, rows.get("standalone-grpc", [])))
        split = [(r["draft_per_round"], r["verify_per_round"]) for r in runs if "draft_per_round" in r]
        # each request against the in-process run of the same prompt in the same rotation (seconds
        # apart): the machine's drift over minutes cancels, which a ratio of medians leaves in
        paired = statistics.median(per_round(r) / per_round(b) for r, b in zip(runs, rows["in-process"]))
        out.append({"setup": setup, "ms_per_round": med * 1e3, "overhead_ms_per_round": (med - local) * 1e3,
                    "ratio": paired, "same_tokens": same,
                    "draft_ms": 1e3 * statistics.median(d for d, _ in split) if split else None,
                    "verify_ms": 1e3 * statistics.median(v for _, v in split) if split else None})
    return out
