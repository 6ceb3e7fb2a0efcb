"""oneDNN-prepacked linear layers: same function as nn.Linear, tied weights kept, exactness of
speculative greedy decoding on a packed model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from specserve.engine import GenerationRequest, SpeculativeEngine
from specserve.engine.local import LocalDrafter, LocalVerifier
from specserve.models.causal_lm import CausalLM
from specserve.models.drafters import LMDrafter
from specserve.models.packed_linear import PackedLinear, pack_linear_layers, packing_supported
from specserve.sampling.params import SamplingParams
from specserve.tree.token_tree import TokenTree

from test_engine import PROMPT, tiny_lm

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


@pytest.mark.parametrize("rows", [1, 2, 5, 33])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_computes_the_same_function(rows, bias):
    torch.manual_seed(rows)
    dense = nn.Linear(48, 80, bias=bias)
    packed = PackedLinear(dense, keep_weight=False)
    x = torch.randn(3, rows, 48)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), dense(x), rtol=1e-5, atol=1e-5)
    assert not hasattr(packed, "weight")  # the dense copy is released


def test_tied_output_embedding_stays_dense_and_others_are_packed():
    lm = tiny_lm(3)
    lm.model.config.tie_word_embeddings = True
    lm.model.tie_weights()
    assert lm.model.lm_head.weight is lm.model.get_input_embeddings().weight
    n_linear = sum(type(m) is nn.Linear for m in lm.model.modules())
    assert pack_linear_layers(lm.model) == n_linear
    assert not any(type(m) is nn.Linear for m in lm.model.modules())
    head = lm.model.get_output_embeddings()
    assert isinstance(head, PackedLinear)
    assert head.weight is lm.model.get_input_embeddings().weight  # still shared
    assert lm.vocab_size == head.out_features


def test_packing_is_skipped_off_fp32():
    lm = tiny_lm(4)
    lm.model.to(torch.bfloat16)
    assert not packing_supported(lm.model)
    assert pack_linear_layers(lm.model) == 0


def test_packed_tree_rows_match_dense_rows():
    dense = tiny_lm(5)
    packed = CausalLM(copy.deepcopy(dense.model), tokenizer=None, name="packed")
    assert pack_linear_layers(packed.model) > 0
    tree = TokenTree()
    nodes = tree.add_sequence([11, 12, 13], None, drafter="x")
    tree.propose(nodes[0], 40, None, "y")  # a sibling branch under the first node
    rows = []
    for lm in (dense, packed):
        session = lm.new_session()
        session.sync(PROMPT)
        rows.append(session.score_tree(tree))
    torch.testing.assert_close(rows[1], rows[0], rtol=1e-4, atol=1e-4)


def test_greedy_speculation_on_packed_models_equals_plain_greedy():
    verifier = tiny_lm(0)
    twin = copy.deepcopy(verifier.model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.003 * torch.randn_like(p))
    for model in (verifier.model, twin):
        assert pack_linear_layers(model) > 0
    drafter = CausalLM(twin, tokenizer=None, name="twin")
    expected = verifier.plain_generate(PROMPT, 40, SamplingParams())
    engine = SpeculativeEngine(LocalVerifier(verifier), [LocalDrafter(LMDrafter(drafter, name="twin"))],
                               dynamic_length=False)
    tokens, stats = engine.run(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=40, rule="greedy",
                                                 draft_length=4))
    assert tokens == expected
    assert stats.accepted > 0  # the draft path, not only correction tokens, was exercised
