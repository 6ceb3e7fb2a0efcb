"""LM drafters (chain and k-config tree), early exit, tokenizer check, on tiny random models (fp32)."""

from __future__ import annotations

import pytest
import torch

from specserve.models.base import Drafter
from specserve.models.causal_lm import CausalLM
from specserve.models.drafters import (
    EarlyExitDrafter,
    LMDrafter,
    TokenizerMismatchError,
    check_same_tokenizer,
)
from specserve.sampling.params import SamplingParams, process_logits
from specserve.tree.token_tree import ROOT

from test_models import VOCAB, random_ids, reference_next_logits, tiny_model

ATOL = 1e-5


class VocabTokenizer:
    def __init__(self, vocab: dict[str, int]) -> None:
        self._vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)


@pytest.fixture(params=["llama", "qwen2"])
def lm(request) -> CausalLM:
    return CausalLM(tiny_model(request.param, "sdpa", seed=1), tokenizer=None, name=f"tiny-{request.param}")


def expected_row(lm: CausalLM, ids: list[int], params: SamplingParams) -> torch.Tensor:
    return process_logits(reference_next_logits(lm, ids), params)


def test_lm_drafter_is_a_drafter(lm):
    assert isinstance(LMDrafter(lm), Drafter)


def test_greedy_chain_equals_sequential_argmax_and_rolls_back(lm):
    drafter = LMDrafter(lm)
    context = random_ids(8, seed=30)
    for ctx in (context, context[:5] + [7, 8], context + [1, 2, 3], context):  # rollback + miss
        proposal = drafter.propose(ctx, 4, SamplingParams(), session_id="s")
        text = list(ctx)
        # greedy drafts are deterministic proposals: no rows travel (one-hot rows are implied)
        assert len(proposal.tokens) == 4 and proposal.probs is None
        for token in proposal.tokens:
            expected = expected_row(lm, text, SamplingParams())
            assert token == int(expected.argmax())
            text.append(token)


def test_sampled_chain_rows_are_the_processed_laws_and_seeded(lm):
    params = SamplingParams(temperature=0.8, top_k=20)
    drafter = LMDrafter(lm)
    context = random_ids(6, seed=31)
    a = drafter.propose(context, 5, params, torch.Generator().manual_seed(4))
    b = drafter.propose(context, 5, params, torch.Generator().manual_seed(4))
    assert a.tokens == b.tokens
    text = list(context)
    for token, row in zip(a.tokens, a.probs):
        torch.testing.assert_close(row, expected_row(lm, text, params), atol=ATOL, rtol=0)
        assert row[token] > 0
        text.append(token)


def test_hidden_states_come_with_the_chain_when_asked(lm):
    proposal = LMDrafter(lm, with_hidden=True).propose(random_ids(5, seed=32), 3, SamplingParams())
    assert proposal.hidden.shape == (3, lm.model.config.hidden_size)


def test_probs_are_fitted_to_the_verifier_vocabulary(lm):
    wider = LMDrafter(lm, target_vocab_size=VOCAB + 7).propose(random_ids(4, 33), 2, SamplingParams(temperature=1.0))
    assert wider.probs.shape == (2, VOCAB + 7)
    assert torch.all(wider.probs[:, VOCAB:] == 0)
    torch.testing.assert_close(wider.probs.sum(-1), torch.ones(2))


@pytest.mark.parametrize("coupling,config", [("independent", (3, 2)), ("without_replacement", (3, 2, 1)), ("hub", (2, 2))])
def test_tree_draft_rows_are_the_laws_after_each_path(lm, coupling, config):
    params = SamplingParams(temperature=1.0)
    drafter = LMDrafter(lm)
    context = random_ids(7, seed=34)
    session = drafter.sessions.get("t")
    tree = drafter.draft_tree(context, config, params, coupling, torch.Generator().manual_seed(5), session_id="t")
    assert session.forwards <= 1 + len(config)  # prefill + one forward per level
    assert tree.max_depth == len(config)
    for parent in [ROOT, *range(len(tree))]:
        proposals = tree.proposals.get(parent, [])
        depth = 0 if parent == ROOT else tree.depths[parent]
        if depth == len(config):
            assert not proposals
            continue
        assert len(proposals) <= config[depth] and proposals
        assert tree.coupling[parent] == coupling
        path = [] if parent == ROOT else [tree.tokens[i] for i in tree.path_to(parent)]
        law = expected_row(lm, context + path, params)
        for p in proposals:
            torch.testing.assert_close(p.draft_probs, law, atol=ATOL, rtol=0)
            assert p.drafter == drafter.name
        tokens = [tree.tokens[p.child] for p in proposals]
        if coupling == "without_replacement":
            assert len(set(tokens)) == len(tokens)
        if coupling == "hub":
            assert tree.hub_token[parent] in tokens
    # the drafter's session was rolled back: a chain afterwards is still exact
    chain = drafter.propose(context, 2, SamplingParams(), session_id="t")
    assert chain.tokens[0] == int(reference_next_logits(lm, context).argmax())


def test_greedy_tree_merges_duplicate_children(lm):
    tree = LMDrafter(lm).draft_tree(random_ids(5, seed=35), (3, 3), SamplingParams(), "independent")
    assert tree.is_chain() and len(tree) == 2  # every sibling is the argmax: merged into one node
    assert len(tree.proposals[ROOT]) == 3  # but all three proposals are kept (RRS needs them)


def test_early_exit_drafter_shapes_and_name():
    verifier = CausalLM(tiny_model("llama", "sdpa", seed=2), tokenizer=None, name="tiny")
    drafter = EarlyExitDrafter(verifier, num_layers=1)
    proposal = drafter.propose(random_ids(6, seed=36), 3, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    assert drafter.name == "early-exit:1"
    assert len(proposal.tokens) == 3 and proposal.probs.shape == (3, VOCAB)
    assert len(verifier.model.model.layers) == 2


def test_tokenizer_check_names_both_models():
    a = CausalLM(tiny_model("llama", "sdpa"), VocabTokenizer({"x": 0, "y": 1}), name="model-A")
    same = CausalLM(tiny_model("llama", "sdpa"), VocabTokenizer({"x": 0, "y": 1}), name="model-B")
    moved = CausalLM(tiny_model("llama", "sdpa"), VocabTokenizer({"x": 1, "y": 0}), name="model-C")
    check_same_tokenizer(a, same)
    with pytest.raises(TokenizerMismatchError, match="model-A.*model-C"):
        check_same_tokenizer(a, moved)


def test_drafted_tokens_follow_the_processed_law_chi_square(lm):
    """2000 first-token draws vs the processed row: chi-square goodness of fit at alpha = 0.001
    (fixed seed). Cells with expected count < 5 are pooled."""
    from scipy.stats import chisquare

    params = SamplingParams(temperature=1.5, top_k=12)
    drafter = LMDrafter(lm)
    context = random_ids(6, seed=37)
    generator = torch.Generator().manual_seed(11)
    draws = 2000
    counts = torch.zeros(VOCAB)
    for _ in range(draws):
        counts[drafter.propose(context, 1, params, generator).tokens[0]] += 1
    law = expected_row(lm, context, params)
    assert counts[law == 0].sum() == 0  # top-k: nothing outside the support
    expected = law * draws
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().unsqueeze(0)])
    expect = torch.cat([expected[big], expected[~big].sum().unsqueeze(0)])
    keep = expect > 0
    result = chisquare(observed[keep].numpy(), expect[keep].numpy())
    assert result.pvalue > 1e-3, result
    # and the cache made the repeated drafts cheap: the context was prefilled once
    assert drafter.sessions.get("").forwards == 1


# ---- MCSD early-stop decision model in LM drafters ------------------------------------------
def _constant_decision_model(hidden_size: int, keep_probability: float):
    from specserve.sampling.mcsd import DecisionModel

    model = DecisionModel(hidden_size, width=4)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.net[2].bias.fill_(float(torch.logit(torch.tensor(keep_probability))))
    return model.eval()


@pytest.mark.parametrize("keep, expected_len", [(0.9, 5), (0.1, 1)])
def test_decision_model_stops_chains_early(keep, expected_len):
    from specserve.models.drafters import LMDrafter
    from specserve.sampling.params import SamplingParams

    lm = _tiny_decision_lm()
    drafter = LMDrafter(lm, name="d", decision_model=_constant_decision_model(lm.model.config.hidden_size, keep))
    proposal = drafter.propose([5, 6, 7, 8], 5, SamplingParams())
    assert len(proposal.tokens) == expected_len and proposal.probs is None  # greedy: no rows
    assert drafter.early_stops == (1 if expected_len < 5 else 0)


def _tiny_decision_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    from specserve.models.causal_lm import CausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return CausalLM(LlamaForCausalLM(config).eval().float(), tokenizer=None, name="tiny")


# ---- confidence stop: a chain ends after a token the drafter itself doubted ----------------------
def _confidences(lm: CausalLM, context: list[int], n: int, params: SamplingParams) -> tuple[list[int], list[float]]:
    """The full n-token chain (greedy) and the drafter's probability of each of its tokens."""
    text, tokens, probs = list(context), [], []
    for _ in range(n):
        logits = reference_next_logits(lm, text)
        token = int(logits.argmax())
        tokens.append(token)
        probs.append(float(torch.softmax(logits.float(), -1)[token]))
        text.append(token)
    return tokens, probs


def test_confidence_stop_ends_the_chain_after_the_first_doubted_token(lm):
    context = random_ids(8, seed=31)
    full, probs = _confidences(lm, context, 6, SamplingParams())
    # a threshold just above the k-th token's confidence stops right after it (k kept: its
    # forward is already paid); thresholds taken from the chain itself, so the test cannot pass
    # by a chain that never stops
    k = min(range(5), key=lambda i: probs[i])
    threshold = min(0.999, probs[k] + 1e-6)
    expected_len = next(i for i in range(6) if probs[i] < threshold) + 1
    drafter = LMDrafter(lm)
    proposal = drafter.propose(context, 6, SamplingParams(), session_id="c", min_confidence=threshold)
    assert proposal.tokens == full[:expected_len] and expected_len < 6
    assert drafter.confidence_stops == 1
    # off (0) drafts the whole chain; the next call of the stopped session still continues right
    assert LMDrafter(lm).propose(context, 6, SamplingParams()).tokens == full
    again = drafter.propose(context + full[:expected_len], 6 - expected_len, SamplingParams(), session_id="c",
                           min_confidence=threshold)
    assert again.tokens == full[expected_len:expected_len + len(again.tokens)]


def test_confidence_stop_when_sampling_uses_the_processed_law(lm):
    params = SamplingParams(temperature=0.9)
    context = random_ids(8, seed=32)
    drafter = LMDrafter(lm)  # tiny random models never reach 0.999
    proposal = drafter.propose(context, 5, params, torch.Generator().manual_seed(3), min_confidence=0.999)
    assert len(proposal.tokens) == 1 and proposal.probs.shape[0] == 1
    assert float(proposal.probs[0, proposal.tokens[0]]) < 0.999
    with pytest.raises(ValueError, match="min_confidence"):
        drafter.propose(context, 5, params, min_confidence=1.0)


def test_the_loop_sends_its_confidence_stop_to_lm_drafters_and_stays_exact(lm):
    """DecodeLoop(min_draft_confidence=...) reaches the drafter through DraftCall (and the wire
    format), lets the policy draft past position 1 (deep prior floor), and greedy output is
    plain greedy's."""
    from specserve.engine import GenerationRequest, SpeculativeEngine
    from specserve.engine.local import LocalDrafter, LocalVerifier
    from specserve.engine.workers import DraftCall
    from specserve.serve.convert import draft_call_from_proto, draft_call_to_proto

    call = DraftCall("s", [1, 2], 4, SamplingParams(), 7, min_confidence=0.35)
    assert draft_call_from_proto(draft_call_to_proto(call)).min_confidence == 0.35
    drafter = LMDrafter(lm, name="lm")
    engine = SpeculativeEngine(LocalVerifier(lm), [LocalDrafter(drafter)], min_draft_confidence=0.999)
    prompt = random_ids(10, seed=33)
    tokens, stats = engine.run(GenerationRequest(prompt_ids=prompt, max_new_tokens=24, rule="greedy", draft_length=6))
    assert tokens == lm.plain_generate(prompt, 24, SamplingParams())
    assert drafter.confidence_stops > 0  # the threshold arrived: every multi-token chain stopped at 1
    assert all(d == 0 for d in stats.drafted_per_position[1:])
    with pytest.raises(ValueError, match="min_draft_confidence"):
        SpeculativeEngine(LocalVerifier(lm), [], min_draft_confidence=1.5)
