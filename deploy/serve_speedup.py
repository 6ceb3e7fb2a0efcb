"""End-to-end speedup through the Ray Serve app: each request once with drafting (the app's drafters,
dynamic draft length) and once with `draft_length: 0` (plain decoding: verifier-only rounds through
the very same router, verifier replica and gRPC proxy), plus the in-process engine and in-process
plain decoding on the same prompts for the round-trip overhead per round.

    .venv/bin/python deploy/serve_speedup.py                      # SmolLM2, 2 prompts per category
    .venv/bin/python deploy/serve_speedup.py --categories summarization,rag --per-category 1

Greedy, fp32: all four setups must produce the same tokens (checked). Prints a Markdown table.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the bench package (prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=8, help="early-exit layers of the small drafter")
    parser.add_argument("--categories", default="summarization,rag,qa")
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--grpc-port", type=int, default=20451)
    args = parser.parse_args()

    import grpc
    import ray
    import torch
    from ray import serve

    from bench.prompts import encode_chat, load_prompts
    from specserve.engine import GenerationRequest, SpeculativeEngine
    from specserve.engine.local import LocalDrafter, LocalVerifier
    from specserve.models.causal_lm import CausalLM
    from specserve.models.drafters import EarlyExitDrafter
    from specserve.models.ngram import PromptLookupDrafter
    from specserve.serve.app import GRPC_SERVICER_FUNCTION, build_app, local_system_config
    from specserve.v1 import generation_pb2 as gen_pb
    from specserve.v1 import generation_pb2_grpc as gen_grpc

    torch.set_num_threads(2)
    lm = CausalLM.load(args.model, dtype="float32")
    prompts = load_prompts(categories=tuple(args.categories.split(",")), per_category=args.per_category)
    batch = [encode_chat(lm.tokenizer, p.text, 512) for p in prompts]
    stops = [lm.tokenizer.eos_token_id] if lm.tokenizer.eos_token_id is not None else []

    # in process: the same drafters as the app (ngram = prompt lookup, small = early exit)
    engine = SpeculativeEngine(LocalVerifier(lm), [
        LocalDrafter(PromptLookupDrafter(1, 4, name="ngram"), name="ngram"),
        LocalDrafter(EarlyExitDrafter(lm, args.layers), name="small"),
    ])

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             _system_config=local_system_config())  # as `specserve serve` starts a local Ray
    serve.start(http_options={"host": "127.0.0.1", "port": args.grpc_port + 1},
                grpc_options={"port": args.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER_FUNCTION]})
    settings = {"models": {"verifier": args.model, "small_drafter": args.model, "small_drafter_layers": args.layers},
                "drafters": ["ngram", "small"]}
    serve.run(build_app(settings), name="speedup", route_prefix="/speedup")
    stub = gen_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{args.grpc_port}"))
    meta = (("application", "speedup"),)

    def served(ids, draft_length=None):
        req = gen_pb.GenerateRequest(token_ids=gen_pb.TokenIds(ids=ids), rule="greedy",
                                     max_new_tokens=args.max_new_tokens, seed=1, stop_token_ids=stops)
        if draft_length is not None:
            req.draft_length = draft_length
        t0 = time.perf_counter()
        reply = stub.Generate(req, metadata=meta, timeout=900)
        return list(reply.token_ids), reply.stats.rounds, time.perf_counter() - t0

    def local(ids, draft_length=4):
        request = GenerationRequest(prompt_ids=ids, max_new_tokens=args.max_new_tokens, rule="greedy", seed=1,
                                    stop_token_ids=tuple(stops), draft_length=draft_length)
        t0 = time.perf_counter()
        tokens, stats = engine.run(request)
        return tokens, stats.rounds, time.perf_counter() - t0

    setups = {"Serve app, speculative": lambda ids: served(ids),
              "Serve app, draft_length 0 (plain)": lambda ids: served(ids, 0),
              "in-process engine, speculative": lambda ids: local(ids),
              "in-process engine, plain": lambda ids: local(ids, 0)}
    served(batch[0][:32]), local(batch[0][:32])  # warm-up: connections, caches, first-shape passes
    totals = {name: [0, 0, 0.0] for name in setups}  # tokens, rounds, seconds
    for i, ids in enumerate(batch):
        names = list(setups)
        names = names[i % len(names):] + names[: i % len(names)]  # rotate the order per prompt
        outputs = {}
        for name in names:
            tokens, rounds, seconds = setups[name](ids)
            outputs[name] = tokens
            t = totals[name]
            t[0], t[1], t[2] = t[0] + len(tokens), t[1] + rounds, t[2] + seconds
        same = len({tuple(v) for v in outputs.values()}) == 1
        print(f"prompt {i} ({prompts[i].category}): same tokens in every setup: {same}", flush=True)
        if not same:
            raise SystemExit("greedy outputs differ between setups: a bug")
    serve.delete("speedup")
    ray.shutdown()

    plain_served = totals["Serve app, draft_length 0 (plain)"]
    print(f"\n{args.model}, fp32, greedy, {len(batch)} prompts ({args.categories}), {args.max_new_tokens} new tokens, "
          f"drafters ngram + early-exit:{args.layers}\n")
    print("| setup | tokens/s | tokens/step | ms/round | speedup vs plain through the app |")
    print("|---|---|---|---|---|")
    for name, (tokens, rounds, seconds) in totals.items():
        print(f"| {name} | {tokens / seconds:.2f} | {tokens / rounds:.2f} | {1e3 * seconds / rounds:.1f} | "
              f"{(tokens / seconds) / (plain_served[0] / plain_served[2]):.2f}x |")


if __name__ == "__main__":
    main()
