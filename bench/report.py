"""Markdown tables from result JSON, and in-place updates of BENCHMARKS.md between markers.

A block in BENCHMARKS.md looks like

    <!-- bench:NAME -->
    ...generated tables...
    <!-- /bench:NAME -->

and `python -m bench report RESULT.json --into BENCHMARKS.md --block NAME` rewrites only it.
"""

from __future__ import annotations

import re
from pathlib import Path

from .overhead import summarize_overhead
from .prompts import CATEGORIES
from .quality import summarize_quality
from .speed import load_records, lossless_agreement, summary_cells
from .stats import CellSummary


MAX_POSITIONS = 8


def _fmt(x, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None else f"{format(x, spec)}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _method_order(result: dict) -> list[str]:
    return [m["name"] for m in result["meta"]["methods"]]


def speed_report(result: dict) -> str:
    cells = summary_cells(result)
    records = load_records(result)
    meta = result["meta"]
    by = {(c.method, c.temperature, c.category): c for c in cells}
    temps = sorted({c.temperature for c in cells})
    cats = [c for c in CATEGORIES if any(k[2] == c for k in by)]
    order = _method_order(result)
    agree = lossless_agreement(records)
    out = []
    for temp in temps:
        label = "greedy" if temp == 0 else f"temperature {temp:g}, top-p 1"
        methods = [m for m in order if (m, temp, "all") in by]
        out.append(f"**Speedup over plain decoding, {label}** (tokens/s ratio, same run)\n")
        rows = []
        for m in methods:
            rows.append([m] + [_fmt(by[(m, temp, c)].speedup, ".2f", "×") if (m, temp, c) in by else "–"
                               for c in cats + ["all"]])
        out.append(_table(["method"] + cats + ["overall"], rows))
        out.append("")
        if any(by[(m, temp, "all")].decode_speedup is not None for m in methods):
            out.append(f"**Decode-phase speedup, {label}** (tokens/s after the first new token: prompt "
                       "prefill and first token left out for every method)\n")
            rows = []
            for m in methods:
                rows.append([m] + [_fmt(by[(m, temp, c)].decode_speedup, ".2f", "×") if (m, temp, c) in by
                                   else "–" for c in cats + ["all"]])
            out.append(_table(["method"] + cats + ["overall"], rows))
            out.append("")
        out.append(f"**Per-method totals, {label}**\n")
        rows = []
        for m in methods:
            c: CellSummary = by[(m, temp, "all")]
            drafters = ", ".join(f"{k} {v:.2f}" for k, v in sorted(c.acceptance_by_drafter.items()))
            rows.append([
                m, _fmt(c.tokens_per_second, ".2f"), _fmt(c.speedup, ".2f", "×"), _fmt(c.tokens_per_step, ".2f"),
                _fmt(c.mean_accepted_length, ".2f"), _fmt(c.acceptance_rate, ".2f"), drafters or "–",
                (_fmt(agree.get(m), ".0%") if temp == 0 else "n/a"),
            ])
        out.append(_table(
            ["method", "tokens/s", "speedup", "tokens/step", "mean accepted length", "acceptance rate",
             "acceptance by drafter", "output == plain"], rows))
        failures = {}
        for r in records:
            if r.temperature == temp and r.drafter_failures:
                failures[r.method] = failures.get(r.method, 0) + r.drafter_failures
        if failures:
            out.append("\nDrafter failures (rounds where a drafter raised and the round ran without it): "
                       + ", ".join(f"{m} {n}" for m, n in failures.items()))
        out.append("")
        # transformers drafts up to 20 tokens at first; positions past 8 are rare and near zero
        depth = min(MAX_POSITIONS, max((len(by[(m, temp, "all")].acceptance_per_position) for m in methods),
                                       default=0))
        if depth:
            out.append(f"**Acceptance per position, {label}** (accepted / drafted at draft position d)\n")
            rows = []
            for m in methods:
                pos = by[(m, temp, "all")].acceptance_per_position
                if pos:
                    rows.append([m] + [_fmt(pos[i], ".2f") if i < len(pos) else "–" for i in range(depth)])
            out.append(_table(["method"] + [f"d={i + 1}" for i in range(depth)], rows))
            out.append("")
    cfg = meta["config"]
    machine = meta["machine"]
    out.append(
        f"_Verifier `{meta['verifier']}`, drafter `{meta['drafter']}`, {meta['dtype']}, "
        f"{len(meta['prompts'])} prompts, max_new_tokens {cfg['max_new_tokens']}, "
        f"dynamic draft length {'on' if meta['dynamic_length'] else 'off'}; "
        f"{machine['cpu']} ({machine.get('isa', 'ISA not recorded')}, {machine['cores']} cores, "
        f"{machine['torch_threads']} torch threads), "
        f"torch {machine['torch']}, transformers {machine['transformers']}; {meta['date']}; "
        f"run took {meta['wall_seconds'] / 60:.1f} min._"
    )
    return "\n".join(out)


def quality_report(result: dict) -> str:
    rows = []
    for q in summarize_quality(result):
        rows.append([
            q["method"], _fmt(q["acceptance_pos1_measured"], ".3f"), _fmt(q["acceptance_pos1_closed_form"], ".3f"),
            _fmt(q["acceptance_z"], "+.1f"), _fmt(q["tokens_per_step"], ".2f"), _fmt(q["mean_step_kl"], ".4f"),
            _fmt(q["p90_step_kl"], ".4f"), _fmt(q["max_step_kl"], ".3f"),
            (f"{q['answer_agreement']:.0%} of {q['answers']}" if q["answer_agreement"] is not None else "–"),
        ])
    meta = result["meta"]
    return "\n".join([
        _table(["rule", "acceptance d=1 (measured)", "acceptance d=1 (closed form)", "z", "tokens/step",
                "mean KL/step (nats)", "p90 KL/step", "max KL/step", "math answer == greedy verifier"], rows),
        "",
        f"_Verifier `{meta['verifier']}`, drafter `{meta['drafter']}`, {meta['dtype']}, {meta['prompts']} prompts, "
        f"temperature 1, top-p 1, max_new_tokens {meta['max_new_tokens']}, draft length {meta['draft_length']}; "
        f"run took {meta['wall_seconds'] / 60:.1f} min._",
    ])


def overhead_report(result: dict) -> str:
    rows = [[o["setup"], _fmt(o["ms_per_round"], ".1f"), _fmt(o["overhead_ms_per_round"], "+.1f"),
             _fmt(o["ratio"], ".2f", "×"), _fmt(o.get("draft_ms"), ".1f"), _fmt(o.get("verify_ms"), ".1f"),
             {True: "yes", False: "NO", None: "–"}[o["same_tokens"]]]
            for o in summarize_overhead(result)]
    meta = result["meta"]
    return "\n".join([
        _table(["setup", "ms / round (median)", "overhead / round", "ratio (paired)", "drafting ms / round (loop's view)",
                "verifying ms / round (loop's view)", "same tokens"], rows),
        "",
        f"_Model `{meta['model']}` ({meta['dtype']}), drafters {', '.join(meta['drafters'])}, greedy, "
        f"{meta['prompts']} prompts x {meta.get('repeats', 1)} repeats (alternating order), "
        f"max_new_tokens {meta['max_new_tokens']}; median over requests of seconds / rounds; ratio (paired) = "
        f"median over requests of (this setup's seconds / round) / (in-process's, same prompt, same rotation)._",
    ])


def render(result: dict) -> str:
    kind = result.get("kind")
    if kind == "speed":
        return speed_report(result)
    if kind == "quality":
        return quality_report(result)
    if kind == "overhead":
        return overhead_report(result)
    if kind == "ahead":
        from .ahead import ahead_report

        return ahead_report(result)
    if kind == "batching":
        from .batching import batching_report

        return batching_report(result)
    if kind == "kernels":
        from .kernels import kernels_report

        return kernels_report(result)
    if kind == "round_cost":
        from .round_cost import round_cost_report

        return round_cost_report(result)
    if kind == "row_cost":
        from .row_cost import row_cost_report

        return row_cost_report(result)
    raise ValueError(f"unknown result kind {kind!r}")


def update_block(path: str | Path, block: str, content: str) -> None:
    """Replace the text between the block's markers (append the block if it is missing)."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    start, end = f"<!-- bench:{block} -->", f"<!-- /bench:{block} -->"
    new = f"{start}\n{content.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: new, text) if pattern.search(text) else text.rstrip() + "\n\n" + new + "\n"
    path.write_text(text)
