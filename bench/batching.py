"""Speculation under load: aggregate throughput of C concurrent streams, speculative vs plain.

The same requests (distinct Spec-Bench prompts, greedy) run through one decode loop and one
batching verifier (calls that arrive while a pass runs share the next one, models/batched.py) by
C concurrent streams (a closed loop: each stream takes the next prompt when its request ends, so
every level decodes the same prompts), three ways:
  plain        draft length 0: batched plain decoding, the baseline;
  spec-nocap   speculative, each request's own draft-length policy only;
  spec         speculative with the verifier's per-pass goodput cap (engine/goodput.py).
Every run must decode the same tokens (greedy); the ratios are aggregate tokens/s over plain's.

Each mode runs `repeats` times per level, in a mirrored order (A B C, then C B A, ...: the order
also rotates from level to level). One closed-loop run of a mode takes minutes, and this kind of VM
drifts by several % over that time: with one run each, the mode that ran last in a slow stretch lost
by the drift. Mirroring cancels a drift that is linear in time; the figures are totals over the
repeats, and each repeat's own ratio is kept to show the spread.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import torch

from specserve.engine import GenerationRequest
from specserve.engine.factory import is_statistical, make_local_drafters
from specserve.engine.local import LocalVerifier
from specserve.engine.loop import DecodeLoop
from specserve.models.causal_lm import CausalLM

from .prompts import Prompt, encode_chat
from .systems import stop_token_ids

MODES = ("plain", "spec-nocap", "spec")  # the default set; "spec-noaudit": the cap without its audit
ALL_MODES = ("plain", "spec-nocap", "spec-noaudit", "spec")
# Each run first serves one request through its own decode loop, untimed, as a server has served
# one before: a fresh loop knows no catch-up cost of its LM drafters and no pass costs, and every
# stream of the timed run would pay for learning them. Not a Spec-Bench prompt: the suffix
# drafter's global trie must not hold the start of a timed answer.
WARM_TEXT = ("Rewrite this sentence in plain words: The committee has resolved to postpone the deliberations "
             "until such time as a quorum can be convened.")
WARM_TOKENS = 32


def _run(lm, drafters, prompt_ids: list[list[int]], streams: int, max_new: int, mode: str, draft_length: int,
         stops, tag: str, warm_ids: list[int] | None = None):
    verifier = LocalVerifier(lm, max_sessions=len(prompt_ids) + 1, max_batch_size=streams,
                             goodput_caps=mode in ("spec", "spec-noaudit"))
    if mode == "spec-noaudit":
        verifier.planner.audit = None
    loop = DecodeLoop(verifier, drafters() if mode != "plain" else [])

    async def all_streams():
        requests = [
            GenerationRequest(prompt_ids=ids, max_new_tokens=max_new, rule="greedy", draft_length=draft_length,
                              session_id=f"stream-{i}-{mode}-{tag}", stop_token_ids=stops)
            for i, ids in enumerate(prompt_ids)
        ]
        slots = asyncio.Semaphore(streams)

        async def one(request):
            async with slots:
                return await loop.generate(request)

        if warm_ids:
            await loop.generate(GenerationRequest(prompt_ids=warm_ids, max_new_tokens=WARM_TOKENS, rule="greedy",
                                                  draft_length=draft_length, session_id=f"warm-{mode}-{tag}",
                                                  stop_token_ids=stops))
        verifier.shared_pass_sizes.clear()
        verifier.shared_pass_caps.clear()
        started = time.perf_counter()
        results = await asyncio.gather(*(one(r) for r in requests))
        return results, time.perf_counter() - started

    results, seconds = asyncio.run(all_streams())
    tokens = [t for t, _ in results]
    caps = [c for c in verifier.shared_pass_caps if c >= 0]
    return {
        "seconds": seconds,
        "tokens": sum(len(t) for t in tokens),
        "tokens_per_s": sum(len(t) for t in tokens) / seconds,
        "rounds": sum(s.rounds for _, s in results),
        "tokens_per_step": sum(len(t) for t in tokens) / max(sum(s.rounds for _, s in results), 1),
        "mean_batch": statistics.mean(verifier.shared_pass_sizes) if verifier.shared_pass_sizes else 1.0,
        "mean_cap": statistics.mean(caps) if caps else None,
        "vetoes": verifier.planner.vetoes,
        "outputs": tokens,
    }


def mirrored_orders(level: int, repeats: int, modes: tuple[str, ...] = MODES) -> list[tuple[str, ...]]:
    """The mode order of each repeat at one level: the rotated order, then its mirror, and so on."""
    first = modes[level % len(modes):] + modes[: level % len(modes)]
    return [first if r % 2 == 0 else first[::-1] for r in range(repeats)]


def _pooled(runs: list[dict]) -> dict:
    """Totals over the repeats of one mode (tokens/s = all tokens over all seconds)."""
    seconds, tokens, rounds = (sum(r[k] for r in runs) for k in ("seconds", "tokens", "rounds"))
    caps = [r["mean_cap"] for r in runs if r["mean_cap"] is not None]
    return {
        "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "rounds": rounds,
        "tokens_per_step": tokens / max(rounds, 1),
        "mean_batch": statistics.mean(r["mean_batch"] for r in runs),
        "mean_cap": statistics.mean(caps) if caps else None,
        "vetoes": sum(r.get("vetoes", 0) for r in runs),
        "runs_tokens_per_s": [r["tokens_per_s"] for r in runs],
    }


def run_batching(model: str, prompts: list[Prompt], streams: tuple[int, ...], max_new_tokens: int,
                 drafters: tuple[str, ...] = ("ngram", "suffix", "prompt-lookup"), draft_length: int = 16,
                 max_prompt_tokens: int = 512, dtype: str = "float32", repeats: int = 2,
                 modes: tuple[str, ...] = MODES, progress=print) -> dict:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if "plain" not in modes or any(m not in ALL_MODES for m in modes):
        raise ValueError(f"modes must include plain and be among {ALL_MODES}, got {modes}")
    lm = CausalLM.load(model, dtype=dtype)
    stops = tuple(stop_token_ids(lm))
    # LM drafters load once (their caches are per session id); model-free ones are made anew per
    # run, so a suffix drafter's global trie never holds another run's answer to the same prompt
    loaded = {spec: make_local_drafters([spec], lm)[0] for spec in drafters if not is_statistical(spec)}

    def local_drafters():
        return [loaded[spec] if spec in loaded else make_local_drafters([spec], lm)[0] for spec in drafters]
    warm = encode_chat(lm.tokenizer, prompts[0].text, max_prompt_tokens)
    for mode in modes:  # first-pass costs of every shape, not timed
        _run(lm, local_drafters, [warm, warm[:-1]], 2, 8, mode, draft_length, stops, "warm")
    ids = [encode_chat(lm.tokenizer, p.text, max_prompt_tokens) for p in prompts]
    warm_loop = encode_chat(lm.tokenizer, WARM_TEXT, max_prompt_tokens)
    if len(ids) < max(streams):
        raise ValueError(f"{max(streams)} streams need {max(streams)} prompts, got {len(ids)} (raise --per-category)")
    rows = []
    for n, count in enumerate(streams):
        orders = mirrored_orders(n, repeats, modes)
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for r, order in enumerate(orders):
            for mode in order:
                runs[mode].append(_run(lm, local_drafters, ids, count, max_new_tokens, mode, draft_length, stops,
                                       f"{count}-{r}", warm_ids=warm_loop))
        plain = _pooled(runs["plain"])
        row = {"streams": count, "orders": [list(o) for o in orders]}
        for mode in modes:
            row[mode] = _pooled(runs[mode])
            row[mode]["ratio"] = row[mode]["tokens_per_s"] / plain["tokens_per_s"]
            row[mode]["runs_ratio"] = [a / b for a, b in zip(row[mode]["runs_tokens_per_s"], plain["runs_tokens_per_s"])]
        outputs = [run["outputs"] for mode in modes for run in runs[mode]]
        row["same_tokens"] = all(o == outputs[0] for o in outputs)
        rows.append(row)
        progress(f"{count} streams: plain {plain['tokens_per_s']:.1f} tok/s, " + ", ".join(
            f"{m} {row[m]['ratio']:.2f}x (per repeat {', '.join(f'{x:.2f}' for x in row[m]['runs_ratio'])}; "
            f"mean cap {row[m]['mean_cap']}, vetoes {row[m]['vetoes']})" for m in modes if m != "plain")
            + f", same tokens {row['same_tokens']}")
    resolved = str(lm.dtype).removeprefix("torch.")
    return {"kind": "batching", "meta": {"model": model, "dtype": dtype if dtype != "auto" else f"auto: {resolved}", "drafters": list(drafters),
                                         "draft_length": draft_length, "max_new_tokens": max_new_tokens,
                                         "max_prompt_tokens": max_prompt_tokens, "kernels": lm.kernels, "prompts": len(ids),
                                         "repeats": repeats, "modes": list(modes),
                                         "threads": torch.get_num_threads()}, "rows": rows}


MODE_HEADS = {"spec-nocap": "speculative, no cap (tok/s)", "spec-noaudit": "speculative, cap without audit (tok/s)",
              "spec": "speculative, goodput cap (tok/s)"}


def batching_report(result: dict) -> str:
    meta = result["meta"]
    modes = [m for m in meta.get("modes", MODES) if m != "plain"]
    head = (["streams", "plain batched (tok/s)"] + [MODE_HEADS[m] for m in modes]
            + ["cap ratio per repeat", "tokens/step (cap)", "mean cap", "audit vetoes", "same tokens"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cap = r["spec"]["mean_cap"]
        lines.append("| " + " | ".join(
            [str(r["streams"]), f"{r['plain']['tokens_per_s']:.1f}"]
            + [f"{r[m]['tokens_per_s']:.1f} (**{r[m]['ratio']:.2f}×**)" if m == "spec"
               else f"{r[m]['tokens_per_s']:.1f} ({r[m]['ratio']:.2f}×)" for m in modes]
            + [" / ".join(f"{x:.2f}" for x in r["spec"].get("runs_ratio", [r["spec"]["ratio"]])),
               f"{r['spec']['tokens_per_step']:.2f}", "-" if cap is None else f"{cap:.1f}",
               str(r["spec"].get("vetoes", "-")), "yes" if r["same_tokens"] else "NO"]) + " |")
    lines.append("")
    lines.append(f"_`{meta['model']}` ({meta['dtype']}, kernels {meta.get('kernels', '?')}), drafters "
                 f"{', '.join(meta['drafters'])}, greedy, max draft length {meta['draft_length']}, max_new_tokens "
                 f"{meta['max_new_tokens']}, prompts cut to {meta.get('max_prompt_tokens', '?')} tokens, "
                 f"{meta['threads']} torch threads; {meta.get('prompts', '?')} prompts decoded by C concurrent streams "
                 f"(closed loop), one batching verifier; aggregate tokens/s over "
                 f"{meta.get('repeats', 1)} repeat(s) of each mode in mirrored order; ratios over plain batched decoding of the same streams; mean cap = mean depth "
                 f"cap of the shared passes (1 stream: never shared)._")
    return "\n".join(lines)
