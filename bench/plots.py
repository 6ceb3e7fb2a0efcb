"""PNG plots from result JSON (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .prompts import CATEGORIES  # noqa: E402
from .quality import summarize_quality  # noqa: E402
from .speed import summary_cells  # noqa: E402


def speedup_by_category(result: dict, path: str | Path, temperature: float = 0.0) -> Path:
    """Grouped bars: one group per Spec-Bench category (+ overall), one bar per method."""
    cells = [c for c in summary_cells(result) if c.temperature == temperature and c.method != "plain"]
    order = [m["name"] for m in result["meta"]["methods"]]
    methods = [m for m in order if any(c.method == m for c in cells)]
    cats = [c for c in CATEGORIES if any(x.category == c for x in cells)] + ["all"]
    by = {(c.method, c.category): c.speedup for c in cells}
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(cats)), 4.5))
    width = 0.8 / max(1, len(methods))
    colors = plt.get_cmap("tab20").colors
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(cats))]
        ax.bar(xs, [by.get((m, c)) or 0.0 for c in cats], width, label=m, color=colors[i % len(colors)])
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(cats)), ["overall" if c == "all" else c for c in cats], rotation=20)
    ax.set_ylabel("speedup over plain decoding (×)")
    label = "greedy" if temperature == 0 else f"T={temperature:g}"
    meta = result["meta"]
    ax.set_title(f"{meta['verifier']} ← {meta['drafter']}, {label}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def acceptance_per_position(result: dict, path: str | Path, temperature: float = 0.0) -> Path:
    cells = [c for c in summary_cells(result)
             if c.temperature == temperature and c.category == "all" and c.acceptance_per_position]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for c in cells:
        ys = c.acceptance_per_position
        ax.plot(range(1, len(ys) + 1), [y if y is not None else float("nan") for y in ys], marker="o", label=c.method)
    ax.set_xlabel("draft position d")
    ax.set_ylabel("acceptance rate at d")
    ax.set_ylim(0, 1)
    label = "greedy" if temperature == 0 else f"T={temperature:g}"
    ax.set_title(f"acceptance per position ({result['meta']['verifier']}, {label})")
    ax.legend(fontsize=7)
    return _save(fig, path)


def cactus_tradeoff(result: dict, path: str | Path) -> Path:
    """Acceptance (left axis) and per-step KL (right axis) against Cactus delta; SpS at delta 0, TAS marked."""
    rows = summarize_quality(result)
    cactus = sorted((r for r in rows if r["rule"] == "cactus"), key=lambda r: r["delta"])
    sps = [r for r in rows if r["rule"] == "sps"]
    tas = [r for r in rows if r["rule"] == "tas"]
    line = sps + cactus
    deltas = [0.0] * len(sps) + [r["delta"] for r in cactus]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(deltas, [r["acceptance_pos1_measured"] for r in line], "o-", color="tab:blue", label="acceptance (measured)")
    ax.plot(deltas, [r["acceptance_pos1_closed_form"] for r in line], "x--", color="tab:blue", alpha=0.6,
            label="acceptance (closed form)")
    ax.set_xlabel("Cactus δ (0 = SpS)")
    ax.set_ylabel("acceptance at draft position 1", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(deltas, [r["mean_step_kl"] for r in line], "s-", color="tab:red", label="mean KL/step")
    ax2.set_ylabel("KL(emitted ‖ verifier) per drafted step (nats)", color="tab:red")
    for r in tas:
        ax.axhline(r["acceptance_pos1_measured"], color="tab:blue", linestyle=":", linewidth=1)
        ax2.axhline(r["mean_step_kl"], color="tab:red", linestyle=":", linewidth=1)
        ax.text(0.99, r["acceptance_pos1_measured"], "TAS", ha="right", va="bottom",
                transform=ax.get_yaxis_transform(), color="tab:blue", fontsize=8)
        ax2.text(0.99, r["mean_step_kl"], "TAS", ha="right", va="bottom",
                 transform=ax2.get_yaxis_transform(), color="tab:red", fontsize=8)
    ax.set_title(f"Cactus: acceptance vs divergence ({result['meta']['verifier']})")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center right")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_result(result: dict, out_dir: str | Path, tag: str) -> list[Path]:
    out_dir = Path(out_dir)
    kind = result.get("kind")
    if kind == "speed":
        temps = sorted({r["temperature"] for r in result["records"]})
        paths = []
        for t in temps:
            suffix = "greedy" if t == 0 else f"t{t:g}"
            paths.append(speedup_by_category(result, out_dir / f"{tag}_speedup_{suffix}.png", t))
            paths.append(acceptance_per_position(result, out_dir / f"{tag}_acceptance_{suffix}.png", t))
        return paths
    if kind == "quality":
        return [cactus_tradeoff(result, out_dir / f"{tag}_cactus_tradeoff.png")]
    return []
