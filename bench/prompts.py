"""Spec-Bench prompts: read, group into the six Spec-Bench categories, pick a subset, encode.

Spec-Bench (Xia et al., 2024) reports six categories: the eight MT-Bench categories are pooled as
"mt_bench", next to translation, summarization, qa, math_reasoning and rag. We keep that grouping
so our tables line up with the published ones, and run only the first user turn (single-turn).

The data file lives beside the checkout (../shared/data/spec_bench/dev.jsonl) and is never copied
into the repository; pass --prompts PATH to use another copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = REPO_ROOT.parent / "shared" / "data" / "spec_bench" / "dev.jsonl"

MT_BENCH = frozenset(
    {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
)
# Spec-Bench's own column order.
CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")


@dataclass(frozen=True)
class Prompt:
    question_id: int
    category: str  # one of CATEGORIES
    text: str  # first user turn


def spec_bench_category(raw_category: str) -> str:
    return "mt_bench" if raw_category in MT_BENCH else raw_category


def load_prompts(
    path: str | Path = DEFAULT_PROMPTS,
    per_category: int | None = None,
    categories: tuple[str, ...] | None = None,
) -> list[Prompt]:
    """The first `per_category` prompts of each category, in file order, categories in Spec-Bench order.

    For mt_bench the pick round-robins over its eight sub-categories so a small subset still mixes them.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Spec-Bench prompts not found at {path} (pass --prompts PATH)")
    by_category: dict[str, list[tuple[str, Prompt]]] = {}
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            cat = spec_bench_category(row["category"])
            prompt = Prompt(int(row["question_id"]), cat, row["turns"][0])
            by_category.setdefault(cat, []).append((row["category"], prompt))
    wanted = categories or tuple(c for c in CATEGORIES if c in by_category)
    unknown = [c for c in wanted if c not in by_category]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; the file has {sorted(by_category)}")
    picked: list[Prompt] = []
    for cat in wanted:
        rows = by_category[cat]
        if cat == "mt_bench":
            rows = _round_robin(rows)
        prompts = [p for _, p in rows]
        picked.extend(prompts if per_category is None else prompts[:per_category])
    return picked


def _round_robin(rows: list[tuple[str, Prompt]]) -> list[tuple[str, Prompt]]:
    groups: dict[str, list[tuple[str, Prompt]]] = {}
    for sub, p in rows:
        groups.setdefault(sub, []).append((sub, p))
    out = []
    while any(groups.values()):
        for sub in list(groups):
            if groups[sub]:
                out.append(groups[sub].pop(0))
    return out


def encode_chat(tokenizer, text: str, max_prompt_tokens: int | None = None) -> list[int]:
    """Token ids of `text` as one user turn under the model's chat template (generation prompt added).

    Long prompts (rag, summarization) are cut from the left of the user text, never the template,
    so every method sees the same ids and the generation prompt stays intact.
    """
    ids = _apply_template(tokenizer, text)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        overflow = len(ids) - max_prompt_tokens
        text = tokenizer.decode(body[overflow + 8 :])  # a few spare tokens for re-tokenisation drift
        ids = _apply_template(tokenizer, text)
    return ids


def _apply_template(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
            out = out["input_ids"]
        return [int(t) for t in out]
    return [int(t) for t in tokenizer(text)["input_ids"]]
