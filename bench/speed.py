"""The speed benchmark: every method on every prompt, per Spec-Bench category, in one process.

Order matters on a shared CPU: for each prompt the methods run back to back, in an order that
rotates from prompt to prompt, so slow drift of the machine's load spreads over all methods
instead of biasing whichever ran last. Each method is warmed up once (on a short prompt) before
anything is timed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .methods import Method
from .prompts import Prompt, encode_chat
from .stats import RunRecord, summarize
from .systems import Systems


@dataclass
class SpeedConfig:
    max_new_tokens: int = 64
    temperatures: tuple[float, ...] = (0.0, 1.0)
    seed: int = 1234
    max_prompt_tokens: int | None = 1024
    warmup_tokens: int = 8


def cpu_isa() -> str:
    """The vector ISA class that decides the kernels (BENCHMARKS.md names it beside every figure)."""
    from specserve.models.quantize import cpu_has

    if cpu_has("amx_bf16"):
        return "AVX512-BF16 + AMX"
    if cpu_has("avx512_bf16"):
        return "AVX512-BF16, no AMX"
    if cpu_has("avx512f"):
        return "AVX512, no BF16"
    return "AVX2 only" if cpu_has("avx2") else "no AVX2"


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "isa": cpu_isa(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "platform": platform.platform(),
    }


def cpu_summary() -> str:
    """'AMD EPYC (AVX512-BF16, no AMX)': the CPU and the ISA class that picks its kernels."""
    return f"{machine_info()['cpu']} ({cpu_isa()})"


def run_speed(
    systems: Systems,
    prompts: list[Prompt],
    methods: list[Method],
    config: SpeedConfig,
    progress=print,
) -> dict:
    encoded = [(p, encode_chat(systems.tokenizer, p.text, config.max_prompt_tokens)) for p in prompts]
    records: list[RunRecord] = []
    started = time.time()
    for temperature in config.temperatures:
        active = [m for m in methods if temperature > 0 or not m.only_sampled]
        engines = {m.name: systems.engine_for(m) for m in active if m.system == "ours"}
        warm = encoded[0][1][:64]
        for m in active:  # warm-up: lazy inits, allocator, thread pools
            systems.run(m, warm, config.warmup_tokens, temperature, config.seed, engine=engines.get(m.name))
        for i, (prompt, ids) in enumerate(encoded):
            order = active[i % len(active):] + active[: i % len(active)]
            for m in order:
                rec = systems.run(
                    m, ids, config.max_new_tokens, temperature, config.seed + prompt.question_id,
                    category=prompt.category, question_id=prompt.question_id, engine=engines.get(m.name),
                )
                records.append(rec)
            progress(
                f"[{time.time() - started:7.1f}s] T={temperature:g} {prompt.category}/{prompt.question_id} "
                f"({len(ids)} prompt tokens) done: "
                + " ".join(f"{r.method}={r.generated / r.seconds:.1f}t/s" for r in records[-len(order):])
            )
    return {
        "kind": "speed",
        "meta": {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "verifier": systems.setup.verifier_spec,
            "drafter": systems.drafter_label,
            "dtype": str(systems.verifier.dtype).replace("torch.", ""),
            "verifier_kernels": systems.verifier.kernels,
            "drafter_kernels": getattr(systems.drafter, "kernels", ""),
            "dynamic_length": systems.setup.dynamic_length,
            "cascade_lenience": systems.setup.cascade_lenience,
            "config": asdict(config),
            "methods": [asdict(m) for m in methods],
            "prompts": [asdict(p) | {"text": p.text[:80]} for p, _ in encoded],
            "wall_seconds": time.time() - started,
        },
        "records": [r.to_json() for r in records],
    }


def lossless_agreement(records: list[RunRecord], baseline: str = "plain") -> dict[str, float]:
    """Greedy only: fraction of prompts whose output equals plain decoding's, per method.

    Lossless methods must reach 1.0 in fp32; in bf16 a verifier pass over a block can round
    differently from a one-token pass, so an occasional late divergence is numerics, not a bug.
    """
    base = {(r.question_id): r.output_ids for r in records if r.method == baseline and r.temperature == 0}
    same: dict[str, list[bool]] = {}
    for r in records:
        if r.temperature == 0 and r.question_id in base:
            same.setdefault(r.method, []).append(r.output_ids == base[r.question_id])
    return {m: sum(v) / len(v) for m, v in same.items()}


def save(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


def load_records(result: dict) -> list[RunRecord]:
    return [RunRecord.from_json(r) for r in result["records"]]


def summary_cells(result: dict):
    return summarize(load_records(result), baseline="plain")
