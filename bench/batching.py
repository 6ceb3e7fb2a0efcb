"""Cross-request verification batching: aggregate throughput of C concurrent streams.

The same C requests (distinct Spec-Bench prompts, greedy) run concurrently through one decode
loop and one verifier, twice: with batching off (each verify call is its own forward, calls
queue on the model) and on (calls that arrive while a pass runs share the next one,
models/batched.py). Both runs must decode the same tokens; the ratio is aggregate tokens/s.
Plain decoding (draft_length 0) is measured the same way, because batching is what makes
plain decoding of concurrent streams cheap too.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import torch

from specserve.engine import GenerationRequest
from specserve.engine.factory import make_local_drafters
from specserve.engine.local import LocalVerifier
from specserve.engine.loop import DecodeLoop
from specserve.models.causal_lm import CausalLM

from .prompts import Prompt, encode_chat
from .systems import stop_token_ids


def _run(lm, drafters, prompt_ids: list[list[int]], max_new: int, draft_length: int, batch: int, stops):
    verifier = LocalVerifier(lm, max_sessions=len(prompt_ids) + 1, max_batch_size=batch)
    loop = DecodeLoop(verifier, drafters)

    async def all_streams():
        requests = [
            GenerationRequest(prompt_ids=ids, max_new_tokens=max_new, rule="greedy", draft_length=draft_length,
                              session_id=f"stream-{i}-{batch}-{draft_length}", stop_token_ids=stops)
            for i, ids in enumerate(prompt_ids)
        ]
        return await asyncio.gather(*(loop.generate(r) for r in requests))

    started = time.perf_counter()
    results = asyncio.run(all_streams())
    seconds = time.perf_counter() - started
    tokens = [t for t, _ in results]
    passes = verifier.shared_pass_sizes
    return {
        "seconds": seconds,
        "tokens": sum(len(t) for t in tokens),
        "tokens_per_s": sum(len(t) for t in tokens) / seconds,
        "rounds": sum(s.rounds for _, s in results),
        "mean_batch": statistics.mean(passes) if passes else 1.0,
        "outputs": tokens,
    }


def run_batching(model: str, prompts: list[Prompt], streams: tuple[int, ...], max_new_tokens: int,
                 drafters: tuple[str, ...] = ("ngram", "prompt-lookup"), draft_length: int = 4,
                 max_prompt_tokens: int = 1024, dtype: str = "float32", progress=print) -> dict:
    lm = CausalLM.load(model, dtype=dtype)
    stops = tuple(stop_token_ids(lm))
    local_drafters = make_local_drafters(list(drafters), lm)
    warm = encode_chat(lm.tokenizer, prompts[0].text, max_prompt_tokens)
    _run(lm, local_drafters, [warm, warm[:-1]], 8, draft_length, 2, stops)  # first-pass costs, not timed
    rows = []
    for count in streams:
        ids = [encode_chat(lm.tokenizer, p.text, max_prompt_tokens) for p in prompts[:count]]
        if len(ids) < count:
            raise ValueError(f"{count} streams need {count} prompts, got {len(ids)} (raise --per-category)")
        for mode, length in (("speculative", draft_length), ("plain", 0)):
            off = _run(lm, local_drafters, ids, max_new_tokens, length, 1, stops)
            on = _run(lm, local_drafters, ids, max_new_tokens, length, count, stops)
            row = {
                "streams": count, "mode": mode,
                "off_tokens_per_s": off["tokens_per_s"], "on_tokens_per_s": on["tokens_per_s"],
                "ratio": on["tokens_per_s"] / off["tokens_per_s"], "mean_batch": on["mean_batch"],
                "rounds": on["rounds"], "tokens": on["tokens"], "same_tokens": off["outputs"] == on["outputs"],
            }
            rows.append(row)
            progress(f"{count} streams, {mode}: off {row['off_tokens_per_s']:.1f} tok/s, on "
                     f"{row['on_tokens_per_s']:.1f} tok/s ({row['ratio']:.2f}x, calls per shared pass {row['mean_batch']:.1f}, "
                     f"same tokens {row['same_tokens']})")
    return {"kind": "batching", "meta": {"model": model, "dtype": dtype, "drafters": list(drafters),
                                         "draft_length": draft_length, "max_new_tokens": max_new_tokens,
                                         "threads": torch.get_num_threads()}, "rows": rows}


def batching_report(result: dict) -> str:
    meta = result["meta"]
    head = ["streams", "decoding", "batching off (tok/s)", "batching on (tok/s)", "ratio", "calls per shared pass", "same tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        lines.append("| " + " | ".join([
            str(r["streams"]), r["mode"], f"{r['off_tokens_per_s']:.1f}", f"{r['on_tokens_per_s']:.1f}",
            f"{r['ratio']:.2f}×", f"{r['mean_batch']:.1f}", "yes" if r["same_tokens"] else "NO"]) + " |")
    lines.append("")
    lines.append(f"_`{meta['model']}` ({meta['dtype']}), drafters {', '.join(meta['drafters'])}, greedy, draft length "
                 f"{meta['draft_length']} (plain = draft length 0), max_new_tokens {meta['max_new_tokens']}, "
                 f"{meta['threads']} torch threads; aggregate tokens/s of all streams, one prompt per stream; calls per "
                 f"shared pass leaves out passes that ran one call alone (1.0 = none was shared)._")
    return "\n".join(lines)
