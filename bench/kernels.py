"""What a drafter token costs per weight kernel, against one verifier step (`python -m bench kernels`).

The speed model (shared notes): a round pays k drafter tokens at c verifier steps each, so the
drafter's cost ratio c decides whether speculation pays. This measures, on this CPU, one decode
step of the drafter model with every kernel models/quantize.py offers (fp32 oneDNN-packed, int8,
int4), and one step of the verifier, at the same context length; median over `steps` steps.
"""

from __future__ import annotations

import statistics
import time

from specserve.models.causal_lm import CausalLM
from specserve.models.compute import run_sync


def step_ms(lm: CausalLM, context: int, steps: int) -> float:
    def run() -> float:
        vocab = lm.vocab_size
        session = lm.new_session()
        session.sync([(1000 + i) % vocab for i in range(context)])
        session.next_logits()
        for _ in range(2):  # warm-up of the one-row shapes
            session.append(7)
            session.next_logits()
        times = []
        for _ in range(steps):
            session.append(7)
            t = time.perf_counter()
            session.next_logits()
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)

    return run_sync(run)


def run_kernels(verifier: str, drafter: str, context: int = 300, steps: int = 10, progress=print) -> dict:
    v = CausalLM.load(verifier, dtype="float32")
    verifier_ms = step_ms(v, context, steps)
    progress(f"verifier {verifier} ({v.kernels}): {verifier_ms:.1f} ms")
    del v
    rows = []
    for scheme in (None, "int8", "int4"):
        d = CausalLM.load(drafter, dtype="float32", quantize=scheme)
        ms = step_ms(d, context, steps)
        rows.append({"scheme": scheme or "fp32", "kernels": d.kernels, "ms": ms, "ratio": ms / verifier_ms})
        progress(f"drafter {drafter} {rows[-1]}")
        del d
    return {"kind": "kernels", "verifier": verifier, "drafter": drafter, "context": context, "steps": steps,
            "verifier_ms": verifier_ms, "rows": rows}


def kernels_report(result: dict) -> str:
    lines = [
        f"| {result['drafter']} weights | kernel | ms per token | cost ratio c (÷ verifier step) |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['scheme']} | {r['kernels']} | {r['ms']:.1f} | {r['ratio']:.3f} |")
    lines += ["", f"_Verifier `{result['verifier']}` step: {result['verifier_ms']:.1f} ms (fp32 oneDNN-packed); "
              f"context {result['context']} tokens, median of {result['steps']} steps._"]
    return "\n".join(lines)
