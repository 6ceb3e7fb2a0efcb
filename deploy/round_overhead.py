"""Round-trip overhead per draft/verify round: distributed app vs the in-process engine.

Same model, same prompts, same drafters (ngram + small early exit), greedy, so both decode the
same tokens in the same number of rounds; the difference per round is what Serve adds (router ->
drafters and router -> verifier calls, protobuf encoding, the gRPC proxy).

    .venv/bin/python deploy/round_overhead.py                       # tiny random model (transport only)
    .venv/bin/python deploy/round_overhead.py --model smollm2-135m  # the embedded default

Prints one table row per setup: seconds per round (median over prompts) and the overhead over
in-process. Run it on an otherwise idle machine; on a shared 2-core box the numbers are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def prompts(vocab: int, n: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(24)] for _ in range(n)]


def in_process(model: str, layers: int, batch: list[list[int]], max_new: int) -> list[float]:
    from specserve.engine.local import LocalDrafter, LocalVerifier
    from specserve.engine.loop import DecodeLoop
    from specserve.engine.types import GenerationRequest
    from specserve.models.causal_lm import CausalLM
    from specserve.models.drafters import EarlyExitDrafter
    from specserve.models.ngram import PromptLookupDrafter

    lm = CausalLM.load(model, dtype="float32")
    drafters = [LocalDrafter(PromptLookupDrafter(1, 4, name="ngram"), name="ngram"),
                LocalDrafter(EarlyExitDrafter(lm, layers), name="small")]
    loop = DecodeLoop(LocalVerifier(lm), drafters)
    per_round = []
    for ids in batch:
        request = GenerationRequest(prompt_ids=ids, max_new_tokens=max_new, rule="greedy", seed=1)
        start = time.perf_counter()
        _, stats = asyncio.run(loop.generate(request))
        per_round.append((time.perf_counter() - start) / stats.rounds)
    return per_round


class ServeApp:
    """One deployment of the Serve app on the local Ray cluster (started on first use), called
    request by request, so a benchmark can interleave it with other setups. `overrides` are
    AppSettings fields merged over ours. The n-gram deployment runs prompt lookup (1..4), as
    in_process's drafter, so both decode the same rounds."""

    def __init__(self, model: str, layers: int, grpc_transport: bool = True, overrides: dict | None = None,
                 name: str = "overhead") -> None:
        import grpc
        import ray
        from ray import serve

        from specserve.serve.app import GRPC_SERVICER_FUNCTION, build_app, local_system_config
        from specserve.serve.settings import deep_merge
        from specserve.v1 import generation_pb2_grpc as gen_grpc

        if not ray.is_initialized():  # started as `specserve serve` starts one (serve/app.py run_local)
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                     _system_config=local_system_config())
            serve.start(http_options={"host": "127.0.0.1", "port": 20380},
                        grpc_options={"port": 20351, "grpc_servicer_functions": [GRPC_SERVICER_FUNCTION]})
        settings = deep_merge({
            "models": {"verifier": model, "small_drafter": model, "small_drafter_layers": layers,
                       "ngram_method": "prompt-lookup", "ngram_max": 4},
            "drafters": ["ngram", "small"],
            "grpc_transport": grpc_transport,
        }, overrides or {})
        self.name = name
        serve.run(build_app(settings), name=name, route_prefix=f"/{name}")
        self._channel = grpc.insecure_channel("127.0.0.1:20351")
        self._stub = gen_grpc.GenerationStub(self._channel)

    def generate(self, ids: list[int], max_new: int, stop_token_ids: tuple[int, ...] = ()) -> dict:
        """One greedy request: seconds, rounds, token ids, and (draft, verify) seconds as the
        router's loop saw them (handle round trips included)."""
        from specserve.v1 import generation_pb2 as gen_pb

        req = gen_pb.GenerateRequest(token_ids=gen_pb.TokenIds(ids=ids), rule="greedy", max_new_tokens=max_new,
                                     seed=1, stop_token_ids=list(stop_token_ids))
        start = time.perf_counter()
        reply = self._stub.Generate(req, metadata=(("application", self.name),), timeout=600)
        timings = reply.stats.timings
        return {"seconds": time.perf_counter() - start, "rounds": int(reply.stats.rounds),
                "tokens": list(reply.token_ids), "draft_seconds": timings.draft_seconds,
                "verify_seconds": timings.verify_seconds}

    def close(self) -> None:
        from ray import serve

        self._channel.close()
        serve.delete(self.name)


def distributed(model: str, layers: int, batch: list[list[int]], max_new: int, grpc_transport: bool) -> list[float]:
    """Seconds per round of each request through the Serve app."""
    app = ServeApp(model, layers, grpc_transport)
    try:
        app.generate(batch[0], max_new)  # warms caches and connections
        return [r["seconds"] / r["rounds"] for r in (app.generate(ids, max_new) for ids in batch)]
    finally:
        app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="model spec (default: a tiny random Llama)")
    parser.add_argument("--layers", type=int, default=0, help="early-exit layers of the small drafter")
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    model, layers = args.model, args.layers
    if not model:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from test_ray_app import save_tiny_model

        model, layers = save_tiny_model(tempfile.mkdtemp(prefix="tiny-llama-")), layers or 1
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(__import__("specserve.models.weights", fromlist=["x"]).resolve_model(model)).vocab_size
    layers = layers or 4
    batch = prompts(min(vocab, 1000), args.prompts)

    local = statistics.median(in_process(model, layers, batch, args.max_new_tokens))
    rows = [("in-process engine", local)]
    for transport in (True, False):
        label = "Serve, gRPC transport" if transport else "Serve, object-store transport"
        rows.append((label, statistics.median(distributed(model, layers, batch, args.max_new_tokens, transport))))
    print(f"\nmodel: {args.model or 'tiny random Llama (2 layers, hidden 32)'}; {args.prompts} prompts, "
          f"{args.max_new_tokens} new tokens, greedy, drafters ngram + small\n")
    print("| setup | s / round (median) | overhead / round |")
    print("|---|---|---|")
    for label, value in rows:
        print(f"| {label} | {value * 1000:.1f} ms | {(value - local) * 1000:+.1f} ms |")


if __name__ == "__main__":
    main()
