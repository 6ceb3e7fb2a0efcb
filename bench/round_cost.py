"""What a decode-loop round costs beyond its forward passes (`python -m bench round`).

Two ratios per context length, the bar of the speed work:
* a verifier-only round of the DecodeLoop (`draft_length 0`) against one `plain_generate` step
  (the same forward; anything above 1 is the loop's own cost);
* a speculative round (an early-exit LM drafter, fixed depth) against the time its model forwards
  took (drafter + verifier, measured by a hook around every model forward): the difference is
  what the loop, the thread hops, the tree bookkeeping and acceptance cost per round, in ms.
Per-round times are the gaps between consecutive rounds (the first round, with the prefill, is
left out); medians over the rounds.
"""

from __future__ import annotations

import statistics
import time

from specserve.engine import GenerationRequest, SpeculativeEngine
from specserve.engine.local import LocalDrafter, LocalVerifier
from specserve.models.causal_lm import CausalLM, truncated_copy
from specserve.models.drafters import LMDrafter


class ForwardTimer:
    """Accumulates wall time spent inside model forwards (hooks on the top module; a truncated
    copy of the model shares the hook table, so its forwards count too)."""

    def __init__(self, model) -> None:
        self.total = 0.0
        self._started = 0.0
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _pre(self, *_):
        self._started = time.perf_counter()

    def _post(self, *_):
        self.total += time.perf_counter() - self._started


def context_ids(lm: CausalLM, texts: list[str], length: int) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids += lm.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= length:
            break
    while len(ids) < length:
        ids += ids or [1]
    return ids[:length]


def _plain_step_ms(lm: CausalLM, prompt: list[int], steps: int) -> float:
    stamps: list[float] = []
    lm.plain_generate(prompt, steps + 1, on_token=lambda _t: stamps.append(time.perf_counter()))
    return 1e3 * statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def _loop_rounds(engine: SpeculativeEngine, request: GenerationRequest, timer: ForwardTimer) -> list[tuple[float, float]]:
    """(wall seconds, forward seconds) of every round after the first."""
    out = []
    last_t, last_f = None, None
    for _ in engine.generate(request):
        now, fwd = time.perf_counter(), timer.total
        if last_t is not None:
            out.append((now - last_t, fwd - last_f))
        last_t, last_f = now, fwd
    return out


def run_round_cost(model: str, texts: list[str], contexts=(300, 1000), rounds: int = 24, depth: int = 3,
                   early_exit: int = 8, dtype: str = "float32", progress=print) -> dict:
    lm = CausalLM.load(model, dtype=dtype)
    drafter_lm = truncated_copy(lm, early_exit)
    timer = ForwardTimer(lm.model)
    verifier = LocalVerifier(lm, max_sessions=2)
    plain_engine = SpeculativeEngine(verifier, [])
    spec_engine = SpeculativeEngine(
        verifier, [LocalDrafter(LMDrafter(drafter_lm, name="early-exit", max_sessions=2))], dynamic_length=False
    )
    rows = []
    for context in contexts:
        prompt = context_ids(lm, texts, context)
        _plain_step_ms(lm, prompt[:64], 4)  # warm-up of every shape
        plain_before = _plain_step_ms(lm, prompt, rounds)
        verifier_only = _loop_rounds(plain_engine, GenerationRequest(prompt_ids=prompt, max_new_tokens=rounds + 1,
                                                                      rule="greedy", draft_length=0), timer)
        spec = _loop_rounds(spec_engine, GenerationRequest(prompt_ids=prompt, max_new_tokens=(depth + 1) * rounds,
                                                           rule="greedy", draft_length=depth), timer)
        plain_ms = min(plain_before, _plain_step_ms(lm, prompt, rounds))  # before and after: the faster
        round_ms = 1e3 * statistics.median(w for w, _ in verifier_only)
        spec_wall = 1e3 * statistics.median(w for w, _ in spec)
        spec_overhead = 1e3 * statistics.median(w - f for w, f in spec)
        row = {
            "context": context,
            "plain_step_ms": plain_ms,
            "verifier_only_round_ms": round_ms,
            "verifier_only_ratio": round_ms / plain_ms,
            "spec_round_ms": spec_wall,
            "spec_forwards_ms": spec_wall - spec_overhead,
            "spec_overhead_ms": spec_overhead,
        }
        progress(f"context {context}: {row}")
        rows.append(row)
    return {"kind": "round_cost", "model": model, "kernels": lm.kernels, "depth": depth,
            "drafter": f"early-exit:{early_exit}", "rounds": rounds, "rows": rows}


def round_cost_report(result: dict) -> str:
    lines = [
        f"{result['model']} ({result['kernels']}), drafter {result['drafter']} at depth {result['depth']}, "
        f"medians over {result['rounds']} rounds",
        "",
        "| context | plain step (ms) | verifier-only round (ms) | ratio | spec round (ms) | its forwards (ms) | loop overhead (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['context']} | {r['plain_step_ms']:.1f} | {r['verifier_only_round_ms']:.1f} | "
            f"{r['verifier_only_ratio']:.3f} | {r['spec_round_ms']:.1f} | {r['spec_forwards_ms']:.1f} | "
            f"{r['spec_overhead_ms']:.2f} |"
        )
    return "\n".join(lines)

