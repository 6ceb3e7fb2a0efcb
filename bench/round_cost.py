"""What a decode-loop round costs beyond its forward passes (`python -m bench round`).

Two ratios per context length, the bar of the speed work:
* a verifier-only round of the DecodeLoop (`draft_length 0`) against one `plain_generate` step
  (the same forward; anything above 1 is the loop's own cost);
* a speculative round (an early-exit LM drafter, fixed depth) against the time its model forwards
  took (drafter + verifier, timed around every CausalLM.forward): the difference is
  what the loop, the thread hops, the tree bookkeeping and acceptance cost per round, in ms;
  and, as the speed issue words its bar, against its drafter calls (their whole time on the
  compute thread, the drafter's own bookkeeping included) + its verification forward.
Per-round times are the gaps between consecutive rounds (the first round, with the prefill, is
left out); the three measurements alternate `repeats` times, medians over all of it.
"""

from __future__ import annotations

import statistics
import time

from specserve.engine import GenerationRequest, SpeculativeEngine
from specserve.engine.local import LocalDrafter, LocalVerifier
from specserve.models.causal_lm import CausalLM, truncated_copy
from specserve.models.drafters import LMDrafter


class CallTimer:
    """Accumulates wall time spent inside `method` of each object given (wrapped on the instance)."""

    def __init__(self, method: str, *objs) -> None:
        self.total = 0.0
        for obj in objs:
            setattr(obj, method, self._timed(getattr(obj, method)))

    def _timed(self, inner):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - started
        return timed


class ForwardTimer(CallTimer):
    """Wall time inside model forwards: CausalLM.forward of every model given. (Module hooks no
    longer see them: the lean forward of models/lean_forward.py runs the layers without calling
    the top module.)"""

    def __init__(self, *lms: CausalLM) -> None:
        super().__init__("forward", *lms)


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


def _loop_rounds(engine: SpeculativeEngine, request: GenerationRequest, *timers) -> list[tuple[float, ...]]:
    """(wall seconds, then each timer's seconds) of every round after the first."""
    out = []
    last = None
    for _ in engine.generate(request):
        now = (time.perf_counter(), *(t.total for t in timers))
        if last is not None:
            out.append(tuple(a - b for a, b in zip(now, last)))
        last = now
    return out


def run_round_cost(model: str, texts: list[str], contexts=(300, 1000), rounds: int = 24, depth: int = 3,
                   early_exit: int = 8, dtype: str = "float32", repeats: int = 3, progress=print) -> dict:
    lm = CausalLM.load(model, dtype=dtype)
    drafter_lm = truncated_copy(lm, early_exit)
    timer = ForwardTimer(lm, drafter_lm)
    verifier_forwards = ForwardTimer(lm)
    verifier = LocalVerifier(lm, max_sessions=2)
    plain_engine = SpeculativeEngine(verifier, [])
    drafter = LocalDrafter(LMDrafter(drafter_lm, name="early-exit", max_sessions=2))
    drafter_calls = CallTimer("draft_sync", drafter)  # the whole call, on the compute thread
    spec_engine = SpeculativeEngine(verifier, [drafter], dynamic_length=False)
    rows = []
    for context in contexts:
        prompt = context_ids(lm, texts, context)
        _plain_step_ms(lm, prompt[:64], 4)  # warm-up of every shape
        # the three measurements alternate, `repeats` times: this kind of VM drifts by 10-30 %
        # within a minute, and plain measured only before and after the loop read that as loop cost
        plain, verifier_only, spec = [], [], []
        for _ in range(repeats):
            plain.append(_plain_step_ms(lm, prompt, rounds))
            verifier_only += _loop_rounds(plain_engine, GenerationRequest(
                prompt_ids=prompt, max_new_tokens=rounds + 1, rule="greedy", draft_length=0), timer)
            spec += _loop_rounds(spec_engine, GenerationRequest(
                prompt_ids=prompt, max_new_tokens=(depth + 1) * rounds, rule="greedy", draft_length=depth),
                timer, drafter_calls, verifier_forwards)
        plain_ms = statistics.median(plain)
        round_ms = 1e3 * statistics.median(w for w, _ in verifier_only)
        # what the round costs beyond its own forward, measured inside the same rounds: unlike the
        # ratio against plain_generate it does not move with the VM's drift between measurements
        round_own_ms = 1e3 * statistics.median(w - f for w, f in verifier_only)
        round_forward_ms = 1e3 * statistics.median(f for _, f in verifier_only)
        spec_wall = 1e3 * statistics.median(r[0] for r in spec)
        spec_overhead = 1e3 * statistics.median(w - f for w, f, _, _ in spec)
        # the speed issue's wording: beyond (the drafter calls + the verification forward)
        spec_beyond_calls = 1e3 * statistics.median(w - calls - vf for w, _, calls, vf in spec)
        row = {
            "context": context,
            "plain_step_ms": plain_ms,
            "verifier_only_round_ms": round_ms,
            "verifier_only_ratio": round_ms / plain_ms,
            "verifier_only_own_ms": round_own_ms,
            "verifier_only_own_share": round_own_ms / round_forward_ms,
            "spec_round_ms": spec_wall,
            "spec_forwards_ms": spec_wall - spec_overhead,
            "spec_overhead_ms": spec_overhead,
            "spec_beyond_calls_ms": spec_beyond_calls,
        }
        progress(f"context {context}: {row}")
        rows.append(row)
    return {"kind": "round_cost", "model": model, "kernels": lm.kernels, "depth": depth,
            "drafter": f"early-exit:{early_exit}", "rounds": rounds, "repeats": repeats, "rows": rows}


def round_cost_report(result: dict) -> str:
    lines = [
        f"{result['model']} ({result['kernels']}), drafter {result['drafter']} at depth {result['depth']}, "
        f"medians over {result.get('repeats', 1)} x {result['rounds']} rounds, the three measurements alternating",
        "",
        "| context | plain step (ms) | verifier-only round (ms) | ratio | verifier-only round beyond its forward | spec round (ms) | its forwards (ms) | beyond its forwards (ms) | beyond its drafter calls + verification forward (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        beyond_calls = f"{r['spec_beyond_calls_ms']:.2f}" if "spec_beyond_calls_ms" in r else "-"  # older runs
        own = (f"{r['verifier_only_own_ms']:.2f} ms ({100 * r['verifier_only_own_share']:.1f} %)"
               if "verifier_only_own_ms" in r else "-")
        lines.append(
            f"| {r['context']} | {r['plain_step_ms']:.1f} | {r['verifier_only_round_ms']:.1f} | "
            f"{r['verifier_only_ratio']:.3f} | {own} | {r['spec_round_ms']:.1f} | {r['spec_forwards_ms']:.1f} | "
            f"{r['spec_overhead_ms']:.2f} | {beyond_calls} |"
        )
    return "\n".join(lines)

