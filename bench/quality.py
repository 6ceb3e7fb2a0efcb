"""Quality of the lossy rules: Cactus at several deltas and TAS against lossless SpS, same prompts.

For every rule we decode each prompt with the LM-drafter chain at temperature 1 (top-p 1), then
re-run the verifier and the drafter once over prompt + output (teacher forcing) to get the real
processed rows t_i and d_i at every prefix the run visited. At each position the one-step law the
rule emits when that position is drafted is known in closed form (bench/divergence.py), so

* per-step KL(emitted || verifier) is exact on real rows (no sampling noise beyond which prefixes
  the run visited); bonus/correction steps after a full acceptance are exact draws from t and are
  not counted, so the mean is per *drafted* step;
* at position 1 of every drafting round (the prefixes are known from the round boundaries) the
  closed-form acceptance probability is summed next to the acceptance the engine measured there:
  a consistency check between the running code and the math (z-score; |z| > 3 means a bug).

Answer agreement on math_reasoning: Spec-Bench ships no reference answers, so the reference is the
verifier's own plain greedy answer (last number in the text); we report how often each rule's
sampled answer matches it, next to SpS's rate (the lossless baseline's own sampling noise).
"""

from __future__ import annotations

import re
import time

import torch

from specserve.engine import RoundResult
from specserve.sampling.params import SamplingParams, process_logits

from .divergence import emitted_law, kl
from .methods import Method
from .prompts import Prompt, encode_chat
from .systems import Systems

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def rule_methods(deltas: tuple[float, ...], draft_length: int) -> list[Method]:
    methods = [Method("sps", "ours", ("lm",), rule="sps", draft_length=draft_length)]
    methods += [
        Method(f"cactus-{d:g}", "ours", ("lm",), rule="cactus", delta=d, draft_length=draft_length)
        for d in deltas
    ]
    methods.append(Method("tas", "ours", ("lm",), rule="tas", draft_length=draft_length))
    return methods


def final_number(text: str) -> str | None:
    found = NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


@torch.inference_mode()
def teacher_forced_rows(lm, ids: list[int], num_new: int, vocab: int, params: SamplingParams) -> torch.Tensor:
    """Processed laws [num_new, vocab] for the last num_new tokens of `ids` (law before each)."""
    x = torch.tensor([ids[:-1]], dtype=torch.long, device=lm.device)
    out = lm.model(input_ids=x, logits_to_keep=num_new)
    logits = out.logits[0, -num_new:].float().cpu()
    if logits.shape[-1] < vocab:  # drafter embedding may be smaller: those tokens get no mass
        logits = torch.nn.functional.pad(logits, (0, vocab - logits.shape[-1]), value=float("-inf"))
    return process_logits(logits[:, :vocab], params)


def drafted_positions(rounds: list[RoundResult]) -> tuple[list[int], list[int]]:
    """Offsets (into the generated text) of every drafted step, and of every round's first step.

    A round commits its accepted drafts plus one token; that last token is a drafted step (the
    rejection's correction) unless the round accepted its whole draft (then it is the bonus,
    an exact draw from t) or drafted nothing (a verifier-only round)."""
    drafted, firsts = [], []
    offset = 0
    for r in rounds:
        n = len(r.tokens)
        tested = min(n, r.num_accepted + (1 if r.num_accepted < r.drafted_depth else 0))
        if r.drafted_depth > 0:
            firsts.append(offset)
        drafted.extend(range(offset, offset + tested))
        offset += n
    return drafted, firsts


def step_divergences(method: Method, t_rows: torch.Tensor, d_rows: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per position: KL(emitted || t) and closed-form acceptance of `method`'s rule."""
    kls, accs = [], []
    params = {"delta": method.delta} if method.rule == "cactus" else {}
    for t, d in zip(t_rows, d_rows):
        law, acc = emitted_law(method.rule, t, d, **params)
        kls.append(kl(law, t))
        accs.append(acc)
    return kls, accs


def run_quality(
    systems: Systems,
    prompts: list[Prompt],
    deltas: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0),
    max_new_tokens: int = 48,
    draft_length: int = 4,
    seed: int = 1234,
    max_prompt_tokens: int | None = 1024,
    progress=print,
) -> dict:
    methods = rule_methods(deltas, draft_length)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    vocab = systems.verifier.vocab_size
    rows = []
    started = time.time()
    for prompt in prompts:
        ids = encode_chat(systems.tokenizer, prompt.text, max_prompt_tokens)
        reference = None
        if prompt.category == "math_reasoning":
            greedy = systems.verifier.plain_generate(ids, max_new_tokens, SamplingParams(), None, systems.stop_ids)
            reference = final_number(systems.tokenizer.decode(greedy, skip_special_tokens=True))
        for m in methods:
            engine = systems.engine_for(m)
            request = systems.request_for(m, ids, max_new_tokens, 1.0, seed + prompt.question_id)
            rounds = list(engine.generate(request))
            out = [tok for r in rounds for tok in r.tokens]
            drafted, firsts = drafted_positions(rounds)
            full = ids + out
            t_rows = teacher_forced_rows(systems.verifier, full, len(out), vocab, params)
            d_rows = teacher_forced_rows(systems.drafter, full, len(out), vocab, params)
            kls, accs = step_divergences(m, t_rows, d_rows)
            answer = final_number(systems.tokenizer.decode(out, skip_special_tokens=True))
            rows.append({
                "method": m.name, "rule": m.rule, "delta": m.delta if m.rule == "cactus" else None,
                "category": prompt.category, "question_id": prompt.question_id,
                "generated": len(out), "rounds": len(rounds),
                "drafted": sum(r.num_drafted for r in rounds), "accepted": sum(r.num_accepted for r in rounds),
                # position 1 of each drafting round: measured outcome and closed-form probability
                "first_accepted": [int(r.num_accepted > 0) for r in rounds if r.drafted_depth > 0],
                "first_closed_form": [accs[i] for i in firsts],
                "step_kl": [kls[i] for i in drafted],
                "step_acceptance": [accs[i] for i in drafted],
                "answer": answer, "reference_answer": reference,
            })
        progress(f"[{time.time() - started:7.1f}s] {prompt.category}/{prompt.question_id} done")
    return {
        "kind": "quality",
        "meta": {
            "verifier": systems.setup.verifier_spec, "drafter": systems.drafter_label,
            "dtype": str(systems.verifier.dtype).replace("torch.", ""),
            "max_new_tokens": max_new_tokens, "draft_length": draft_length, "seed": seed,
            "deltas": list(deltas), "prompts": len(prompts), "wall_seconds": time.time() - started,
        },
        "rows": rows,
    }


def summarize_quality(result: dict) -> list[dict]:
    """One line per rule: measured acceptance, closed-form acceptance, per-step KL, answer agreement."""
    by: dict[str, list[dict]] = {}
    for r in result["rows"]:
        by.setdefault(r["method"], []).append(r)
    out = []
    for name, rows in by.items():
        kls = [k for r in rows for k in r["step_kl"]]
        first = [a for r in rows for a in r["first_accepted"]]
        first_cf = [a for r in rows for a in r["first_closed_form"]]
        with_ref = [r for r in rows if r["reference_answer"] is not None]
        # measured vs closed-form acceptance at position 1: same prefixes, so they differ only by
        # Bernoulli noise; z = (measured - expected) / sqrt(sum p(1 - p))
        var = sum(p * (1 - p) for p in first_cf)
        out.append({
            "method": name,
            "rule": rows[0]["rule"],
            "delta": rows[0]["delta"],
            "rounds": sum(r["rounds"] for r in rows),
            "acceptance_pos1_measured": sum(first) / len(first) if first else None,
            "acceptance_pos1_closed_form": sum(first_cf) / len(first_cf) if first_cf else None,
            "acceptance_z": (sum(first) - sum(first_cf)) / var**0.5 if var > 0 else None,
            "tokens_per_step": sum(r["generated"] for r in rows) / max(1, sum(r["rounds"] for r in rows)),
            "mean_accepted_length": sum(r["accepted"] for r in rows) / max(1, sum(r["rounds"] for r in rows)),
            "mean_step_kl": sum(kls) / len(kls) if kls else None,
            "p90_step_kl": sorted(kls)[int(0.9 * (len(kls) - 1))] if kls else None,
            "max_step_kl": max(kls) if kls else None,
            "answers": len(with_ref),
            "answer_agreement": (
                sum(r["answer"] == r["reference_answer"] for r in with_ref) / len(with_ref) if with_ref else None
            ),
        })
    return out
