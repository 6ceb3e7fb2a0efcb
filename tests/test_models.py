"""Verifier sessions on tiny random transformers models (fp32): tree scoring, commit, sync, LRU."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from specserve.models.base import VerifierSession
from specserve.models.causal_lm import CausalLM, SessionCache, truncated_copy
from specserve.sampling.params import SamplingParams
from specserve.tree.token_tree import ROOT, TokenTree

VOCAB = 97
ATOL = 1e-5


def tiny_model(arch: str, attn: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation=attn,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    return model.float().eval()


@pytest.fixture(params=[("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("qwen2", "eager")],
                ids=lambda p: "-".join(p))
def lm(request) -> CausalLM:
    arch, attn = request.param
    return CausalLM(tiny_model(arch, attn), tokenizer=None, name=f"tiny-{arch}-{attn}")


@torch.inference_mode()
def reference_next_logits(lm: CausalLM, ids: list[int]) -> torch.Tensor:
    """Law after `ids` from a plain full forward without any cache."""
    return lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def random_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def branching_tree(seed: int) -> TokenTree:
    """Root with 3 children; child 0 has 2 children, one of which has a chain of 2 more."""
    t = random_ids(8, seed)
    tree = TokenTree()
    a = tree.propose(ROOT, t[0], None)
    tree.propose(ROOT, t[1], None)
    c = tree.propose(ROOT, t[2], None)
    a1 = tree.propose(a, t[3], None)
    tree.propose(a, t[4], None)
    a1x = tree.propose(a1, t[5], None)
    tree.propose(a1x, t[6], None)
    tree.propose(c, t[7], None)
    return tree


def check_rows(lm: CausalLM, committed: list[int], tree: TokenTree, logits: torch.Tensor) -> None:
    assert logits.shape == (len(tree) + 1, lm.vocab_size)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits[0], reference_next_logits(lm, committed), atol=ATOL, rtol=0)
    for node in range(len(tree)):
        path_tokens = [tree.tokens[i] for i in tree.path_to(node)]
        expected = reference_next_logits(lm, committed + path_tokens)
        torch.testing.assert_close(logits[1 + node], expected, atol=ATOL, rtol=0)


def test_session_implements_the_verifier_protocol(lm):
    assert isinstance(lm.new_session(), VerifierSession)


def test_score_chain_equals_sequential_forwards(lm):
    committed = random_ids(11, seed=1)
    session = lm.new_session()
    session.sync(committed)
    tree = TokenTree()
    tree.add_sequence(random_ids(5, seed=2))
    check_rows(lm, committed, tree, session.score_tree(tree))


def test_score_branching_tree_equals_sequential_forwards(lm):
    committed = random_ids(9, seed=3)
    session = lm.new_session()
    session.sync(committed)
    tree = branching_tree(seed=4)
    assert not tree.is_chain()
    check_rows(lm, committed, tree, session.score_tree(tree))


def test_score_tree_does_not_commit(lm):
    committed = random_ids(7, seed=5)
    session = lm.new_session()
    session.sync(committed)
    first = session.score_tree(branching_tree(seed=6))
    again = session.score_tree(branching_tree(seed=6))
    torch.testing.assert_close(first, again, atol=ATOL, rtol=0)
    assert session.committed == committed
    torch.testing.assert_close(session.next_logits(), first[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("leaf", [1, 2, 5, 6])
def test_commit_keeps_only_the_accepted_path(lm, leaf):
    committed = random_ids(10, seed=7)
    session = lm.new_session()
    session.sync(committed)
    tree = branching_tree(seed=8)
    session.score_tree(tree)
    path = tree.path_to(leaf)
    session.commit(path, tree, next_token=13)
    expected_text = committed + [tree.tokens[i] for i in path] + [13]
    assert session.committed == expected_text
    # the cache was reused (gathered), not recomputed: one forward for the new pending token
    before = session.forwards
    torch.testing.assert_close(
        session.next_logits(), reference_next_logits(lm, expected_text), atol=ATOL, rtol=0
    )
    assert session.forwards == before + 1
    # and a following round over a fresh tree is still exact
    tree2 = branching_tree(seed=9)
    check_rows(lm, expected_text, tree2, session.score_tree(tree2))


def test_commit_of_empty_path_appends_the_correction_only(lm):
    committed = random_ids(6, seed=10)
    session = lm.new_session()
    session.sync(committed)
    tree = branching_tree(seed=11)
    session.score_tree(tree)
    session.commit([], tree, next_token=3)
    torch.testing.assert_close(
        session.next_logits(), reference_next_logits(lm, committed + [3]), atol=ATOL, rtol=0
    )


def test_many_rounds_of_score_and_commit_stay_exact(lm):
    committed = random_ids(5, seed=12)
    session = lm.new_session()
    session.sync(committed)
    g = torch.Generator().manual_seed(13)
    for round_index in range(4):
        tree = branching_tree(seed=100 + round_index)
        logits = session.score_tree(tree)
        check_rows(lm, session.committed, tree, logits)
        leaf = int(torch.randint(0, len(tree), (1,), generator=g))
        path = tree.path_to(leaf)
        session.commit(path, tree, next_token=int(logits[1 + leaf].argmax()))
    torch.testing.assert_close(
        session.next_logits(), reference_next_logits(lm, session.committed), atol=ATOL, rtol=0
    )


def test_sync_after_rollback_and_after_a_different_text(lm):
    session = lm.new_session()
    text = random_ids(12, seed=14)
    session.sync(text)
    session.next_logits()
    # rollback: a shorter prefix is served from the cache (crop only, one forward for the last row)
    before = session.forwards
    session.sync(text[:7])
    rolled_back = session.next_logits()
    torch.testing.assert_close(rolled_back, reference_next_logits(lm, text[:7]), atol=ATOL, rtol=0)
    assert session.forwards == before + 1
    # diverging text: common prefix kept, the rest re-prefilled
    other = text[:4] + random_ids(6, seed=15)
    session.sync(other)
    torch.testing.assert_close(session.next_logits(), reference_next_logits(lm, other), atol=ATOL, rtol=0)
    # a completely different text (a cache "miss" on a reused session)
    fresh = random_ids(8, seed=16)
    session.sync(fresh)
    tree = branching_tree(seed=17)
    check_rows(lm, fresh, tree, session.score_tree(tree))


def test_commit_without_scoring_recomputes(lm):
    committed = random_ids(6, seed=18)
    session = lm.new_session()
    session.sync(committed)
    tree = branching_tree(seed=19)  # never scored on this session
    session.commit([0, 3], tree, next_token=5)
    expected = committed + [tree.tokens[0], tree.tokens[3], 5]
    torch.testing.assert_close(session.next_logits(), reference_next_logits(lm, expected), atol=ATOL, rtol=0)


def test_sync_rejects_empty_text(lm):
    with pytest.raises(ValueError, match="at least one"):
        lm.new_session().sync([])


def test_plain_generate_greedy_matches_argmax_of_full_forwards(lm):
    prompt = random_ids(5, seed=20)
    out = lm.plain_generate(prompt, max_new_tokens=6, sampling=SamplingParams())
    text = list(prompt)
    for token in out:
        assert token == int(reference_next_logits(lm, text).argmax())
        text.append(token)
    assert len(out) == 6


def test_plain_generate_stops_and_is_seeded(lm):
    prompt = random_ids(5, seed=21)
    params = SamplingParams(temperature=1.0)
    a = lm.plain_generate(prompt, 8, params, seed=3)
    b = lm.plain_generate(prompt, 8, params, seed=3)
    assert a == b
    stop = a[2]
    c = lm.plain_generate(prompt, 8, params, seed=3, stop_ids=[stop])
    assert c == a[: a.index(stop) + 1]


def test_session_cache_is_a_bounded_lru(lm):
    cache = SessionCache(lm, max_sessions=2)
    a = cache.get("a")
    cache.get("b")
    assert cache.get("a") is a  # hit, and "a" becomes most recent
    cache.get("c")  # evicts "b", the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache
    assert len(cache) == 2
    assert cache.get("b") is not None and "a" not in cache


def test_truncated_copy_shares_weights_and_runs_fewer_layers():
    model = tiny_model("llama", "sdpa")
    big = CausalLM(model, tokenizer=None)
    small = truncated_copy(big, 1)
    assert len(small.model.model.layers) == 1
    assert len(big.model.model.layers) == 2  # the original is untouched
    assert small.model.lm_head.weight.data_ptr() == big.model.lm_head.weight.data_ptr()
    assert small.model.model.layers[0] is big.model.model.layers[0]
    ids = random_ids(6, seed=22)
    session = small.new_session()
    session.sync(ids)
    logits = session.next_logits()
    assert logits.shape == (VOCAB,)
    # manual: embed -> layer 0 -> final norm -> lm_head equals the truncated model's row
    with torch.inference_mode():
        inner = big.model.model
        h = inner.embed_tokens(torch.tensor([ids]))
        pos = torch.arange(len(ids))[None]
        rope = inner.rotary_emb(h, pos)
        mask = torch.full((len(ids), len(ids)), float("-inf")).triu(1)[None, None]
        h = inner.layers[0](h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        h = h[0] if isinstance(h, tuple) else h
        manual = big.model.lm_head(inner.norm(h))[0, -1]
    torch.testing.assert_close(logits, manual, atol=ATOL, rtol=0)
    assert not torch.allclose(logits, reference_next_logits(big, ids), atol=1e-3)
    with pytest.raises(ValueError, match="num_layers"):
        truncated_copy(big, 3)


def test_model_facts_for_validation(lm):
    assert lm.vocab_size == VOCAB
    assert lm.max_positions == 256
    assert lm.dtype == torch.float32


def test_sliding_window_models_are_refused_clearly():
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
        max_window_layers=0,
    )
    lm = CausalLM(Qwen2ForCausalLM(config), tokenizer=None, name="tiny-swa")
    with pytest.raises(NotImplementedError, match="tiny-swa.*sliding-window"):
        lm.new_session()


def test_dtype_choice():
    from specserve.models.causal_lm import pick_dtype
    from specserve.models.quantize import cpu_has

    assert pick_dtype("float32", "cpu") is torch.float32
    assert pick_dtype("bfloat16", "cpu") is torch.bfloat16
    assert pick_dtype(torch.float16, "cpu") is torch.float16
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert pick_dtype("auto", "cpu") is (torch.bfloat16 if native else torch.float32)
    assert pick_dtype("auto", "cpu", num_params=2_000_000_000) is (torch.bfloat16 if native else torch.float32)
    # small models: bf16 only with AMX (AVX512-BF16 alone runs their many small ops slower)
    small = torch.bfloat16 if native and cpu_has("amx_bf16") else torch.float32
    assert pick_dtype("auto", "cpu", num_params=135_000_000) is small
    with pytest.raises(ValueError, match="dtype"):
        pick_dtype("fp8", "cpu")


def test_a_one_token_text_scores_with_an_empty_cache(lm):
    session = lm.new_session()
    session.sync([4])
    tree = branching_tree(seed=23)
    check_rows(lm, [4], tree, session.score_tree(tree))
    session.commit(tree.path_to(2), tree, next_token=9)
    expected = [4, tree.tokens[2], 9]
    torch.testing.assert_close(session.next_logits(), reference_next_logits(lm, expected), atol=ATOL, rtol=0)


def test_parameter_count_from_the_config_alone(tmp_path):
    from specserve.models.causal_lm import count_parameters
    from test_ray_app import save_tiny_model

    path = save_tiny_model(str(tmp_path / "tiny"))
    loaded = CausalLM.load(path, dtype="float32", pack_weights=False)
    assert count_parameters(path) == sum(p.numel() for p in loaded.model.parameters())
