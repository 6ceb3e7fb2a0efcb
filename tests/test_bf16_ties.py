"""bf16 and exactness: greedy speculative output may leave plain greedy output only at near ties.

In bf16 a one-row decode step and a multi-row verification pass sum in different orders, so their
logits differ by a few bf16 roundings, and where the top two logits are that close the argmax can
flip (transformers' assisted generation shows the same). That is the only divergence allowed: at
the first position where a bf16 speculative run leaves the plain bf16 run, the plain run's top-2
logits must lie within TIE_ULPS bf16 units in the last place of the top logit. Anything wider is
a real bug (a wrong cache row, a wrong mask), and fp32 runs stay token for token equal
(tests/test_engine*.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from specserve.cli import encode_prompt
from specserve.engine import GenerationRequest, SpeculativeEngine
from specserve.engine.factory import make_local_drafters
from specserve.engine.local import LocalVerifier
from specserve.models.causal_lm import CausalLM

from test_engine_smollm2 import spec_bench_prompts

TIE_ULPS = 4  # bf16 ulps of the top logit: a few roundings of a deep bf16 network


def bf16_ulp(x: float) -> float:
    """Spacing of bf16 numbers at |x| (8 significant bits)."""
    x = abs(x)
    return 2.0 ** (math.floor(math.log2(x)) - 7) if x > 0 else 2.0**-133


def top2_gap_ulps(row: torch.Tensor) -> float:
    top = torch.topk(row.float(), 2).values
    return float(top[0] - top[1]) / bf16_ulp(float(top[0]))


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_divergence_is_a_tie(lm: CausalLM, prompt: list[int], plain: list[int], spec: list[int]) -> float | None:
    """None when the runs agree; else the plain run's top-2 gap (in ulps) where they part, after
    asserting it is a near tie."""
    i = first_divergence(plain, spec)
    if i is None or i >= min(len(plain), len(spec)):
        return None
    session = lm.new_session()
    session.sync(list(prompt) + list(plain[:i]))
    gap = top2_gap_ulps(session.next_logits())
    assert gap <= TIE_ULPS, (
        f"speculative output left plain greedy output at token {i} ({plain[i]} vs {spec[i]}) where the "
        f"top-2 logits are {gap:.1f} bf16 ulps apart (> {TIE_ULPS}): not a rounding tie"
    )
    return gap


def test_ulp_and_gap_arithmetic():
    assert bf16_ulp(1.0) == 2.0**-7 and bf16_ulp(17.0) == 2.0**-3 and bf16_ulp(-0.75) == 2.0**-8
    row = torch.tensor([16.0, 16.125, 3.0])
    assert top2_gap_ulps(row) == pytest.approx(1.0)  # 16.125 - 16 = one ulp at 16
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1


class _FixedRows:
    """A stand-in model whose next-token row is fixed: a clear winner, or a near tie."""

    def __init__(self, row):
        self.row = torch.tensor(row)

    def new_session(self):
        row = self.row

        class S:
            def sync(self, ids):
                pass

            def next_logits(self):
                return row

        return S()


def test_the_check_fails_on_a_real_divergence():
    clear = _FixedRows([20.0, 12.0, 1.0])  # 64 ulps apart: a flip there is a bug
    with pytest.raises(AssertionError, match="not a rounding tie"):
        check_divergence_is_a_tie(clear, [0], [0, 1], [0, 2])
    tie = _FixedRows([20.0, 19.875, 1.0])  # one ulp apart: a flip is allowed
    assert check_divergence_is_a_tie(tie, [0], [0, 1], [0, 2]) == pytest.approx(1.0)
    assert check_divergence_is_a_tie(clear, [0], [0, 1], [0, 1]) is None


@pytest.mark.slow
def test_bf16_speculative_divergences_are_near_ties():
    lm = CausalLM.load("smollm2-135m", dtype="bfloat16")
    engine = SpeculativeEngine(LocalVerifier(lm), make_local_drafters(["early-exit:20", "suffix", "prompt-lookup"], lm))
    texts = spec_bench_prompts(("summarization", "writing", "math_reasoning", "coding"))
    for text in texts:
        prompt = encode_prompt(lm.tokenizer, text, chat=True)[:160]
        plain = lm.plain_generate(prompt, 24)
        spec, stats = engine.run(GenerationRequest(prompt_ids=prompt, max_new_tokens=24, rule="greedy", draft_length=4))
        assert stats.drafted > 0
        check_divergence_is_a_tie(lm, prompt, plain, spec)
