"""CS Drafting: greedy invariance, lenience sanity, K conventions, horizontal block layout."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specserve.cascade.csd import (
    CascadeDrafter,
    LMReviewer,
    default_k_matrix,
    greedy_review,
    increments_from_cumulative,
)
from specserve.engine import GenerationRequest, SpeculativeEngine
from specserve.engine.local import LocalDrafter, LocalVerifier
from specserve.models.base import DraftProposal
from specserve.models.causal_lm import CausalLM
from specserve.models.ngram import MaxGramDrafter
from specserve.sampling.params import SamplingParams

VOCAB = 61
PROMPT = [3, 14, 15, 9, 26, 5, 3, 14, 15, 35, 8, 9, 7, 3, 14]


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval().float()


def perturbed(model, scale: float, seed: int, name: str) -> CausalLM:
    """Drafters of decreasing quality: the verifier plus noise (more noise = 'smaller')."""
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return CausalLM(twin, tokenizer=None, name=name)


@pytest.fixture(scope="module")
def models():
    target = CausalLM(tiny_llama(0), tokenizer=None, name="target")
    d1 = perturbed(target.model, 0.002, 1, "d1")
    d2 = perturbed(target.model, 0.006, 2, "d2")
    return target, d1, d2


def bottom() -> MaxGramDrafter:
    rng = random.Random(5)
    return MaxGramDrafter({v: rng.randrange(VOCAB) for v in range(VOCAB)})


def random_k(rng: random.Random, n: int) -> list[list[int]]:
    k = [[0] * n for _ in range(n)]
    for r in range(n):
        for c in range(r, n):
            k[r][c] = rng.randint(0, 3)
        k[r][r] = max(k[r][r], 1) if r == 0 else k[r][r]
    return k


def plain(target: CausalLM, n: int) -> list[int]:
    return target.plain_generate(PROMPT, n, SamplingParams())


# ---- greedy invariance: any K, any lenience, output == the verifier's greedy output --------
@pytest.mark.parametrize("lenience", [1, 2, 5])
@pytest.mark.parametrize("case", range(3))
def test_greedy_invariance(models, lenience, case):
    target, d1, d2 = models
    rng = random.Random(100 * lenience + case)
    levels = [[d1, d2], [d1], [d2]][case]
    k = random_k(rng, len(levels) + 1)
    cascade = CascadeDrafter(
        [LMReviewer(m) for m in levels], bottom(), k, lenience=lenience, bottom_tokens=rng.randint(1, 10)
    )
    engine = SpeculativeEngine(LocalVerifier(target), [LocalDrafter(cascade)], dynamic_length=False)
    tokens, stats = engine.run(
        GenerationRequest(prompt_ids=PROMPT, max_new_tokens=30, rule="greedy", draft_length=sum(k[0]) + 2)
    )
    assert tokens == plain(target, 30), f"K={k}, l={lenience}"
    assert stats.drafted > 0
    assert sum(cascade.stats.reviews) > 0  # neural drafters only ever reviewed


def test_lenience_one_counts_exact_matches(models):
    """l = 1: every intermediate acceptance is an exact argmax match, recomputed here with a
    cache-free full forward of the reviewer."""
    target, d1, d2 = models
    reviewers = [LMReviewer(d1), LMReviewer(d2)]
    cascade = CascadeDrafter(reviewers, bottom(), [[3, 2, 2], [0, 2, 3], [0, 0, 4]], keep_log=True)
    engine = SpeculativeEngine(LocalVerifier(target), [LocalDrafter(cascade)], dynamic_length=False)
    engine.run(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=20, rule="greedy", draft_length=8))
    assert cascade.log
    for review in cascade.log:
        model = [d1, d2][review.level - 1].model
        with torch.no_grad():
            logits = model(torch.tensor([review.context + review.draft])).logits[0]
        best = logits[len(review.context) - 1 :].argmax(-1).tolist()
        exact = 0
        while exact < len(review.draft) and review.draft[exact] == best[exact]:
            exact += 1
        assert review.accepted == exact
    assert cascade.stats.accepted == [
        sum(r.accepted for r in cascade.log if r.level == level) for level in (1, 2)
    ]


def test_lenient_review_accepts_at_least_the_exact_matches():
    torch.manual_seed(0)
    for _ in range(200):
        logits = torch.randn(6, 8) * 2
        draft = torch.randint(0, 8, (5,)).tolist()
        draft_p = torch.rand(5).tolist()
        strict = greedy_review(logits, draft, draft_p, 1)[2]
        assert greedy_review(logits, draft, draft_p, 2)[2] >= strict
        assert greedy_review(logits, draft, draft_p, 5)[2] >= greedy_review(logits, draft, draft_p, 2)[2]


def test_review_outputs_correction_or_bonus():
    logits = torch.full((3, 5), -5.0)
    logits[0, 1] = logits[1, 2] = logits[2, 4] = 5.0  # argmax: 1, 2, 4
    assert greedy_review(logits, [1, 2], [1.0, 1.0], 1)[0] == [1, 2, 4]  # full accept + bonus
    assert greedy_review(logits, [1, 3], [1.0, 1.0], 1)[:3:2] == ([1, 2], 1)  # correction at 1
    # lenient: token 3 passes when the reviewer gives it more than p_draft / l
    soft = torch.zeros(3, 5)
    soft[1, 2] = 1.0
    p3 = float(torch.softmax(soft[1], -1)[3])
    assert greedy_review(soft, [0, 3], [1.0, p3 * 4], 5)[2] == 2
    assert greedy_review(soft, [0, 3], [1.0, p3 * 6], 5)[2] == 1


# ---- K conventions and the horizontal layout ----------------------------------------------
def test_cumulative_k_converts_to_increments():
    paper = [[5, 19, 29], [0, 1, 11], [0, 0, 10]]
    assert increments_from_cumulative(paper) == [[5, 14, 10], [0, 1, 10], [0, 0, 10]]
    with pytest.raises(ValueError, match="decreases"):
        increments_from_cumulative([[5, 3]])


@pytest.mark.parametrize(
    "k", [[[1, 1]], [[1, 1], [0, 1], [0, 0]], [[1, 0], [1, 1]], [[-1, 1], [0, 1]]]
)
def test_bad_k_is_refused(k):
    with pytest.raises(ValueError, match="k_matrix"):
        CascadeDrafter([object()], bottom(), k)


class ScriptedReviewer:
    """argmax after any context is always `token` (so it refuses every other draft token)."""

    def __init__(self, name: str, token: int):
        self.name, self.token, self.reviewed = name, token, []

    def review_logits(self, context, draft):
        self.reviewed.append(list(draft))
        logits = torch.zeros(len(draft) + 1, VOCAB)
        logits[:, self.token] = 10.0
        return logits


class ConstantBottom:
    name = "bottom"

    def propose(self, context, num_tokens, params=None, generator=None):
        return DraftProposal([50] * num_tokens, None, self.name)


def test_horizontal_blocks_fill_positions_largest_first():
    """Top row K[0] = [2, 3]: D_1's block comes first (2 positions), the bottom fills 3 more."""
    d1 = ScriptedReviewer("d1", token=7)
    cascade = CascadeDrafter([d1], ConstantBottom(), [[2, 3], [0, 4]], bottom_tokens=4)
    draft = cascade.propose(PROMPT, 10).tokens
    # D_1 reviews the bottom's 4-token draft, refuses its first token, corrects to 7 (one
    # token per review), twice; then the bottom itself adds 4 tokens (overshoot is cut at 10)
    assert draft == [7, 7, 50, 50, 50, 50]
    assert d1.reviewed == [[50] * 4, [50] * 4]
    assert cascade.propose(PROMPT, 3).tokens == [7, 7, 50]  # the loop's length limit


def test_default_k_is_upper_triangular_and_sized():
    k = default_k_matrix(3, 5)
    assert k == [[5, 0, 0], [0, 4, 0], [0, 0, 4]]
