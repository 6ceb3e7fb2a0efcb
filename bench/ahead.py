"""Drafting ahead on separate compute (`python -m bench ahead`): two nodes emulated on one machine.

The verifier runs on compute lane 0 pinned to CPU 0, the LM drafter on lane 1 pinned to CPU 1,
one torch thread each (models/compute.py lanes), so drafting can really run while the verifier
verifies. Same pinning, same prompts, one run, methods in rotating order per prompt:
  plain             plain greedy decoding on the verifier's core alone;
  sync              speculative decoding, drafting then verifying (LM drafter + suffix);
  full-acceptance   drafting ahead, betting on full acceptance (engine/ahead.py);
  enumerate-select  drafting ahead for every likely outcome, selecting the one that happened.
Reports tokens/s, tokens per verifier step (tokens / rounds) and the drafting-ahead hit rate
(builds whose outcome happened / builds). Greedy outputs must equal plain's. Each method keeps one
engine for the whole run (warm-up included), as a server keeps its decode loop.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from specserve.engine import GenerationRequest, SpeculativeEngine
from specserve.engine.ahead import make_strategy
from specserve.engine.factory import load_drafter_lm
from specserve.engine.local import LocalDrafter, LocalVerifier
from specserve.models.causal_lm import CausalLM
from specserve.models.compute import pin_lane
from specserve.models.drafters import LMDrafter
from specserve.models.suffix import SuffixDrafter

from .prompts import Prompt, encode_chat
from .systems import stop_token_ids

METHODS = ("plain", "sync", "full-acceptance", "enumerate-select")


def run_ahead(verifier_name: str, drafter_spec: str, prompts: list[Prompt], max_new_tokens: int,
              max_prompt_tokens: int = 512, pin: bool = True, units: int = 8, progress=print) -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    if pin:
        if len(cpus) < 2:
            raise RuntimeError("pinning needs two CPUs")
        pin_lane(0, {cpus[0]})
        pin_lane(1, {cpus[1]})
    torch.set_num_threads(1)  # one thread per lane: each lane is one core
    verifier = CausalLM.load(verifier_name, dtype="float32")
    drafter_lm = load_drafter_lm(drafter_spec, verifier)
    drafter_lm.compute_lane = 1
    stops = tuple(stop_token_ids(verifier))
    local_verifier = LocalVerifier(verifier, max_sessions=4)

    def engine(method: str) -> SpeculativeEngine:
        options = {"units": units} if method == "enumerate-select" else {}
        strategy = make_strategy(method if method in ("full-acceptance", "enumerate-select") else None, **options)
        drafters = [LocalDrafter(LMDrafter(drafter_lm, name="lm", max_sessions=2, target_vocab_size=verifier.vocab_size)),
                    LocalDrafter(SuffixDrafter(name="suffix"))]
        return SpeculativeEngine(local_verifier, drafters, ahead=strategy)

    # one engine per method for the whole run, as a server keeps its loop: the build budget, the
    # measured costs and the suffix drafter's global trie carry from request to request
    engines = {m: engine(m) for m in METHODS if m != "plain"}

    def run(method: str, ids: list[int], max_new: int) -> dict:
        started = time.perf_counter()
        if method == "plain":
            tokens = verifier.plain_generate(ids, max_new, stop_ids=stops)
            seconds = time.perf_counter() - started
            return {"tokens": tokens, "seconds": seconds, "rounds": len(tokens), "outcomes": {}}
        tokens, stats = engines[method].run(GenerationRequest(prompt_ids=ids, max_new_tokens=max_new, rule="greedy",
                                                             stop_token_ids=stops))
        return {"tokens": tokens, "seconds": time.perf_counter() - started, "rounds": stats.rounds,
                "outcomes": dict(stats.ahead_outcomes)}

    warm = encode_chat(verifier.tokenizer, prompts[0].text, 64)
    for method in METHODS:
        run(method, warm, 8)
    rows = []
    for n, prompt in enumerate(prompts):
        ids = encode_chat(verifier.tokenizer, prompt.text, max_prompt_tokens)
        order = METHODS[n % len(METHODS):] + METHODS[: n % len(METHODS)]
        results = {m: run(m, ids, max_new_tokens) for m in order}
        row = {"category": prompt.category, "prompt_tokens": len(ids), "order": list(order)}
        for m, r in results.items():
            row[m] = {"tokens": len(r["tokens"]), "seconds": r["seconds"], "rounds": r["rounds"],
                      "outcomes": r["outcomes"], "same_as_plain": r["tokens"] == results["plain"]["tokens"]}
        rows.append(row)
        progress(f"{prompt.category}: " + ", ".join(
            f"{m} {row[m]['tokens'] / row[m]['seconds']:.2f} tok/s" for m in METHODS))
    return {"kind": "ahead", "meta": {"verifier": verifier_name, "drafter": drafter_spec, "pinned": pin,
                                      "cpus": cpus[:2] if pin else cpus, "units": units,
                                      "max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens,
                                      "verifier_kernels": verifier.kernels, "drafter_kernels": drafter_lm.kernels},
            "rows": rows}


def summarize(result: dict) -> dict:
    out = {}
    for m in METHODS:
        tokens = sum(r[m]["tokens"] for r in result["rows"])
        seconds = sum(r[m]["seconds"] for r in result["rows"])
        rounds = sum(r[m]["rounds"] for r in result["rows"])
        outcomes: dict[str, int] = {}
        for r in result["rows"]:
            for k, v in r[m]["outcomes"].items():
                outcomes[k] = outcomes.get(k, 0) + v
        builds = sum(outcomes.values())
        out[m] = {"tokens_per_s": tokens / seconds, "tokens_per_step": tokens / max(rounds, 1),
                  "hit_rate": outcomes.get("hit", 0) / builds if builds else None, "outcomes": outcomes,
                  "same": all(r[m]["same_as_plain"] for r in result["rows"])}
    return out


def ahead_report(result: dict) -> str:
    meta, s = result["meta"], summarize(result)
    head = ["method", "tokens/s", "vs plain", "vs sync", "tokens / verifier step", "ahead hit rate", "outcomes",
            "same tokens as plain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METHODS:
        r = s[m]
        lines.append("| " + " | ".join([
            m, f"{r['tokens_per_s']:.2f}", f"{r['tokens_per_s'] / s['plain']['tokens_per_s']:.2f}×",
            f"{r['tokens_per_s'] / s['sync']['tokens_per_s']:.2f}×", f"{r['tokens_per_step']:.2f}",
            "-" if r["hit_rate"] is None else f"{r['hit_rate']:.2f}",
            ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items())) or "-",
            "yes" if r["same"] else "NO"]) + " |")
    cats = sorted({r["category"] for r in result["rows"]})
    lines.append("")
    lines.append(f"_verifier `{meta['verifier']}` ({meta['verifier_kernels']}) on CPU {meta['cpus'][0]}, drafter "
                 f"`{meta['drafter']}` ({meta['drafter_kernels']}) + suffix on CPU {meta['cpus'][-1]}"
                 f"{' (pinned lanes, 1 torch thread each)' if meta['pinned'] else ' (not pinned)'}; greedy; "
                 f"{len(result['rows'])} prompts ({', '.join(cats)}), {meta['max_new_tokens']} new tokens, prompts cut "
                 f"to {meta['max_prompt_tokens']}; enumerate-select builds {meta['units']} units per round; method "
                 f"order rotated per prompt; totals over all prompts._")
    return "\n".join(lines)
