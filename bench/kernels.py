"""What a drafter token costs per weight kernel, against one verifier step (`python -m bench kernels`).

The speed model (shared notes): a round pays k drafter tokens at c verifier steps each, so the
drafter's cost ratio c decides whether speculation pays. This measures, on this CPU, one decode
step of the drafter model with every kernel models/quantize.py offers (fp32 oneDNN-packed, int8,
int4), and one step of the verifier, at the same context length; median over `steps` steps. Where
the CPU runs bf16 natively, the same again on a bf16 model (other kernels: int8 weight-only with
bf16 activations), so the table shows which activation dtype a quantized drafter should run in.
"""

from __future__ import annotations

import statistics
import time

import torch

from specserve.models.causal_lm import CausalLM, pick_dtype
from specserve.models.compute import run_sync

from .speed import cpu_summary


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


def run_kernels(verifier: str, drafter: str, context: int = 300, steps: int = 10, progress=print,
                bf16: bool | None = None) -> dict:
    """Every drafter kernel against the fp32 verifier step; where the CPU runs bf16 natively
    (bf16=None: as `--dtype auto` decides) also the bf16 verifier step and the drafter's kernels
    on a bf16 model (c is then against the bf16 step)."""
    if bf16 is None:
        bf16 = pick_dtype("auto", "cpu") == torch.bfloat16
    dtypes = ("float32", "bfloat16") if bf16 else ("float32",)
    verifier_ms = {}
    for dtype in dtypes:
        v = CausalLM.load(verifier, dtype=dtype)
        verifier_ms[dtype] = step_ms(v, context, steps)
        progress(f"verifier {verifier} ({v.kernels}): {verifier_ms[dtype]:.1f} ms")
        del v
    rows = []
    for dtype in dtypes:
        for scheme in (None, "int8", "int4"):
            d = CausalLM.load(drafter, dtype=dtype, quantize=scheme)
            ms = step_ms(d, context, steps)
            rows.append({"model_dtype": dtype, "scheme": scheme or ("fp32" if dtype == "float32" else "bf16"),
                         "kernels": d.kernels, "ms": ms, "ratio": ms / verifier_ms[dtype],
                         "ratio_fp32": ms / verifier_ms["float32"]})
            progress(f"drafter {drafter} {rows[-1]}")
            del d
    return {"kind": "kernels", "verifier": verifier, "drafter": drafter, "context": context, "steps": steps,
            "verifier_ms": verifier_ms["float32"], "verifier_ms_by_dtype": verifier_ms, "cpu": cpu_summary(),
            "rows": rows}


def kernels_report(result: dict) -> str:
    by_dtype = result.get("verifier_ms_by_dtype", {"float32": result["verifier_ms"]})
    both = len(by_dtype) > 1
    lines = [
        f"| {result['drafter']} weights | model dtype | kernel | ms per token | c (÷ fp32 verifier step) |"
        + (" c (÷ bf16 verifier step) |" if both else ""),
        "|---|---|---|---|---|" + ("---|" if both else ""),
    ]
    for r in result["rows"]:
        dtype = r.get("model_dtype", "float32")
        cells = [r["scheme"], dtype, r["kernels"], f"{r['ms']:.1f}", f"{r.get('ratio_fp32', r['ratio']):.3f}"]
        if both:
            cells.append(f"{r['ms'] / by_dtype['bfloat16']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    steps = ", ".join(f"{ms:.1f} ms ({'fp32 oneDNN-packed' if d == 'float32' else 'bf16'})" for d, ms in by_dtype.items())
    lines += ["", f"_Verifier `{result['verifier']}` step: {steps}; context {result['context']} tokens, median of "
              f"{result['steps']} steps; CPU: {result.get('cpu', '?')}._"]
    return "\n".join(lines)
