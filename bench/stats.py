"""Per-generation records and their aggregation into table rows (pure: no models, no I/O).

Definitions (the names vLLM and the papers use; ALGORITHMS.md 0.3):
* tokens/s            = generated tokens / wall seconds, summed over the prompts of a cell
* speedup             = tokens/s of the method / tokens/s of plain verifier decoding, same category,
                        same temperature, same run (ratios, not absolute times, are what transfer)
* decode speedup      = the same ratio over the time after the first new token (prompt prefill and
                        first token excluded, for every method), i.e. the speed of the decoding phase
* tokens per step     = generated tokens / verifier forward passes (bonus/correction token included)
* mean accepted length = accepted draft tokens / verifier passes (bonus excluded)
* acceptance rate     = accepted draft tokens / drafted tokens (per drafter and per position too)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable


@dataclass
class RunRecord:
    """One generation of one prompt by one method."""

    method: str
    category: str
    question_id: int
    temperature: float
    prompt_tokens: int
    generated: int
    seconds: float
    rounds: int  # verifier forward passes after the prefill (plain decoding: one per token)
    drafted: int | None = None  # None where the method cannot tell (never guessed)
    accepted: int | None = None
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_by_drafter: dict[str, int] = field(default_factory=dict)
    drafted_by_drafter: dict[str, int] = field(default_factory=dict)
    output_ids: list[int] = field(default_factory=list)
    drafter_failures: int = 0  # rounds in which a drafter raised and was dropped (should be 0)
    first_token_seconds: float | None = None  # time to the first new token (prefill included)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "RunRecord":
        return cls(**d)


@dataclass
class CellSummary:
    """One (method, temperature, category) cell of a table; category "all" pools every prompt."""

    method: str
    temperature: float
    category: str
    prompts: int
    generated: int
    seconds: float
    tokens_per_second: float
    tokens_per_step: float
    mean_accepted_length: float | None
    acceptance_rate: float | None
    acceptance_per_position: list[float | None]
    acceptance_by_drafter: dict[str, float]
    decode_tokens_per_second: float | None = None  # tokens after the first / time after the first
    speedup: float | None = None  # filled by `add_speedups`
    decode_speedup: float | None = None


def _add_lists(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


def summarize_cell(records: list[RunRecord]) -> CellSummary:
    if not records:
        raise ValueError("empty cell")
    first = records[0]
    generated = sum(r.generated for r in records)
    seconds = sum(r.seconds for r in records)
    rounds = sum(r.rounds for r in records)
    known = all(r.accepted is not None and r.drafted is not None for r in records)
    timed = all(r.first_token_seconds is not None for r in records)
    decode_seconds = sum(r.seconds - r.first_token_seconds for r in records) if timed else 0.0
    decode_tokens = sum(max(r.generated - 1, 0) for r in records)
    accepted = sum(r.accepted for r in records) if known else None
    drafted = sum(r.drafted for r in records) if known else None
    acc_pos: list[int] = []
    dr_pos: list[int] = []
    acc_by: dict[str, int] = {}
    dr_by: dict[str, int] = {}
    for r in records:
        acc_pos = _add_lists(acc_pos, r.accepted_per_position)
        dr_pos = _add_lists(dr_pos, r.drafted_per_position)
        for k, v in r.accepted_by_drafter.items():
            acc_by[k] = acc_by.get(k, 0) + v
        for k, v in r.drafted_by_drafter.items():
            dr_by[k] = dr_by.get(k, 0) + v
    return CellSummary(
        method=first.method,
        temperature=first.temperature,
        category=first.category if len({r.category for r in records}) == 1 else "all",
        prompts=len(records),
        generated=generated,
        seconds=seconds,
        tokens_per_second=generated / seconds if seconds > 0 else 0.0,
        decode_tokens_per_second=decode_tokens / decode_seconds if decode_seconds > 0 else None,
        tokens_per_step=generated / rounds if rounds else 0.0,
        mean_accepted_length=(accepted / rounds) if (known and rounds) else None,
        acceptance_rate=(accepted / drafted) if (known and drafted) else None,
        acceptance_per_position=[
            ((acc_pos[i] if i < len(acc_pos) else 0) / dr_pos[i]) if dr_pos[i] else None
            for i in range(len(dr_pos))
        ],
        acceptance_by_drafter={k: acc_by.get(k, 0) / v for k, v in dr_by.items() if v},
    )


def summarize(
    records: Iterable[RunRecord], baseline: str = "plain", pooled: bool = True
) -> list[CellSummary]:
    """One summary per (method, temperature, category), plus pooled "all" cells; speedups vs `baseline`."""
    cells: dict[tuple[str, float, str], list[RunRecord]] = {}
    for r in records:
        cells.setdefault((r.method, r.temperature, r.category), []).append(r)
        if pooled:
            cells.setdefault((r.method, r.temperature, "all"), []).append(r)
    out = []
    for (method, temp, cat), recs in cells.items():
        s = summarize_cell(recs)
        s.category = cat
        out.append(s)
    add_speedups(out, baseline)
    return out


def add_speedups(cells: list[CellSummary], baseline: str = "plain") -> None:
    """speedup = tokens/s over the baseline's tokens/s in the same (temperature, category)."""
    base = {
        (c.temperature, c.category): c.tokens_per_second for c in cells if c.method == baseline
    }
    base_decode = {
        (c.temperature, c.category): c.decode_tokens_per_second for c in cells if c.method == baseline
    }
    for c in cells:
        b = base.get((c.temperature, c.category))
        c.speedup = (c.tokens_per_second / b) if b else None
        bd = base_decode.get((c.temperature, c.category))
        c.decode_speedup = (c.decode_tokens_per_second / bd) if (bd and c.decode_tokens_per_second) else None
