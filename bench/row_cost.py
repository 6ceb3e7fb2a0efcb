"""What a verification pass over several rows costs, relative to one plain decoding step.

Speculation pays only if scoring 1 + k rows (the pending token + k draft nodes) costs far less
than k + 1 single-row steps. On CPU this depends on how the linear layers run: plain
`F.linear` (MKL on [out, in] weights) versus oneDNN on prepacked weights (models/packed_linear.py,
what CausalLM.load does by default on fp32 CPU models), and, where the CPU runs bf16 natively
(AVX512-BF16/AMX: what `--dtype auto` then picks), the bf16 model. All at the same context length,
median of `repeats` passes each; the bf16 row is a separate load of the same weights.
"""

from __future__ import annotations

import statistics
import time

import torch

from specserve.models.causal_lm import CausalLM, pick_dtype
from specserve.models.compute import run_sync
from specserve.models.packed_linear import pack_linear_layers
from specserve.tree.token_tree import TokenTree

from .speed import cpu_summary


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(lm: CausalLM, context: int, nodes: tuple[int, ...], repeats: int) -> dict:
    vocab = lm.vocab_size
    session = lm.new_session()
    session.sync([(1000 + i) % vocab for i in range(context)])  # any ids: only the shapes matter
    session.next_logits()  # prefill, not timed

    def step():
        session.append(7)
        session.next_logits()

    out = {"step_ms": _median_ms(step, repeats), "tree_ms": {}}
    for k in nodes:
        tree = TokenTree()
        tree.add_sequence([(2000 + i) % vocab for i in range(k)], None, drafter="x")

        def score():
            session.score_tree(tree)
            session.sync(session.committed)  # drop the scored rows again

        score()  # first pass of a new shape
        out["tree_ms"][k] = _median_ms(score, repeats)
    return out


def run_row_cost(model: str, context: int = 300, nodes=(1, 2, 4, 8), repeats: int = 5, progress=print,
                 bf16: bool | None = None) -> dict:
    """bf16=None: measure the bf16 model too where the CPU runs bf16 natively."""
    lm = CausalLM.load(model, dtype="float32", pack_weights=False)
    rows = {}
    for label in ("dense F.linear", "oneDNN packed"):
        if label == "oneDNN packed" and pack_linear_layers(lm.model) == 0:
            progress("packing not supported here (needs fp32 on CPU with oneDNN)")
            break
        rows[label] = run_sync(measure, lm, context, tuple(nodes), repeats)
        progress(f"{label}: step {rows[label]['step_ms']:.0f} ms, trees {rows[label]['tree_ms']}")
    del lm
    if bf16 is None:
        bf16 = pick_dtype("auto", "cpu") == torch.bfloat16
    if bf16:
        lm = CausalLM.load(model, dtype="bfloat16")
        rows["bf16"] = run_sync(measure, lm, context, tuple(nodes), repeats)
        progress(f"bf16: step {rows['bf16']['step_ms']:.0f} ms, trees {rows['bf16']['tree_ms']}")
    return {"kind": "row_cost", "meta": {"model": model, "context": context, "repeats": repeats,
                                          "threads": torch.get_num_threads(), "cpu": cpu_summary()}, "rows": rows}


def row_cost_report(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    nodes = sorted({int(k) for r in rows.values() for k in r["tree_ms"]})
    head = ["linear layers", "1 row (plain step)"] + [f"1 + {k} rows" for k in nodes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        step = r["step_ms"]
        cells = [label, f"{step:.0f} ms"] + [
            f"{r['tree_ms'][k] if k in r['tree_ms'] else r['tree_ms'][str(k)]:.0f} ms "
            f"({(r['tree_ms'][k] if k in r['tree_ms'] else r['tree_ms'][str(k)]) / step:.2f} steps)" for k in nodes]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"_`{meta['model']}`, fp32 unless the row says bf16, context {meta['context']} tokens, "
                 f"{meta['threads']} torch threads, median of {meta['repeats']} passes; CPU: {meta.get('cpu', '?')}._")
    return "\n".join(lines)
