"""The lean forward (models/lean_forward.py) computes exactly what transformers' forward computes:
every session operation gives bit-identical logits, hidden states and cache rows either way, fp32,
on plain, GQA, biased (Qwen2) and quantized + stacked-projection models; models it does not cover
keep transformers' forward."""

from __future__ import annotations

import pytest
import torch
from test_models import VOCAB, branching_tree, random_ids, tiny_model
from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

from specserve.models.attention import NAME as ATTENTION
from specserve.models.batched import score_trees
from specserve.models.causal_lm import CausalLM
from specserve.models.lean_forward import LeanForward
from specserve.models.quantize import quantize_model
from specserve.tree.token_tree import ROOT, TokenTree


def pair(model) -> tuple[CausalLM, CausalLM]:
    """The same weights behind the lean forward and behind transformers' own."""
    lean, reference = CausalLM(model, None, name="lean"), CausalLM(model, None, name="hf")
    reference.use_lean_forward(False)
    assert lean.lean is not None and reference.lean is None
    return lean, reference


def assert_same_cache(a, b) -> None:
    assert a.cache.get_seq_length() == b.cache.get_seq_length()
    for la, lb in zip(a.cache.layers, b.cache.layers):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def run_script(lm: CausalLM) -> tuple[list[torch.Tensor], object]:
    """Every way a session runs a forward: prefill, decode steps, hidden states, a tree pass, its
    extension, a commit, a rollback that re-prefills several rows on a non-empty cache."""
    out = []
    session = lm.new_session()
    prompt = random_ids(12, seed=1)
    session.sync(prompt)
    out += [session.next_logits().clone(), session.next_hidden().clone()]
    for token in random_ids(3, seed=2):
        session.append(token)
        out.append(session.next_logits().clone())
    tree = branching_tree(seed=3)
    out.append(session.score_tree(tree).clone())
    grown = tree.propose(ROOT, 7, None)
    tree.propose(grown, 9, None)
    out.append(session.extend_scored(tree).clone())
    session.commit([0, 3], tree, next_token=11)
    out.append(session.next_logits().clone())
    session.sync(session.committed[:8] + random_ids(6, seed=4))  # crop, then 6 rows after 7 cached
    out += [session.next_logits().clone(), session.next_hidden().clone()]
    return out, session


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", ATTENTION])
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8-stacked"])
def test_every_session_operation_is_bit_identical(arch, attn, quantized):
    model = tiny_model(arch, attn)
    if quantized:
        quantize_model(model, "int8")  # fbgemm int8 with q/k/v and gate/up stacked
    lean, reference = pair(model)
    got, got_session = run_script(lean)
    want, want_session = run_script(reference)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.equal(a, b)
    assert_same_cache(got_session, want_session)


def test_batched_verification_is_bit_identical():
    lean, reference = pair(tiny_model("qwen2", ATTENTION, seed=5))
    results = []
    for lm in (lean, reference):
        sessions = [lm.new_session() for _ in range(3)]
        for i, session in enumerate(sessions):
            session.sync(random_ids(5 + 4 * i, seed=10 + i))
        trees = [branching_tree(seed=20), TokenTree(), branching_tree(seed=21)]
        results.append((score_trees(sessions, trees), sessions))
    (got, got_sessions), (want, want_sessions) = results
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for a, b in zip(got_sessions, want_sessions):
        assert_same_cache(a, b)


def test_lean_forward_calls_only_the_leaf_modules():
    """The lean forward calls no transformers block (model, layer, attention, MLP, norm): a hook on
    every submodule sees only the embedding, rotary embedding, projections and activation."""
    model = tiny_model("llama", "sdpa")
    lean, _ = pair(model)
    called = []
    hooks = [m.register_forward_hook(lambda mod, *_: called.append(type(mod).__name__)) for m in model.modules()]
    try:
        session = lean.new_session()
        session.sync(random_ids(6, seed=0))
        session.next_logits()
    finally:
        for hook in hooks:
            hook.remove()
    assert called and set(called) <= {"Linear", "Embedding", "LlamaRotaryEmbedding", "SiLUActivation", "SiLU"}


def _qwen3():
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_implementation="sdpa")
    return Qwen3ForCausalLM(config).eval()


def _mistral_sliding():
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4, attn_implementation="sdpa")
    return MistralForCausalLM(config).eval()


@pytest.mark.parametrize("make", [lambda: tiny_model("llama", "eager"), _qwen3, _mistral_sliding],
                         ids=["eager-attention", "qwen3-qk-norm", "mistral-sliding-window"])
def test_models_it_does_not_cover_keep_transformers_forward(make):
    model = make()
    assert LeanForward.build(model) is None
    lm = CausalLM(model, None)
    assert lm.lean is None


def test_mistral_without_a_window_is_covered():
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=None, attn_implementation="sdpa")
    lean, reference = pair(MistralForCausalLM(config).eval())
    got, _ = run_script(lean)
    want, _ = run_script(reference)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
