"""Quantized drafters (models/quantize.py): spec parsing, every kernel against the fp32 layer it
replaces, the lm_head included, and exactness: a quantized drafter changes speed, never the output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specserve.engine import GenerationRequest, SpeculativeEngine
from specserve.engine.factory import load_drafter_lm, make_local_drafters
from specserve.engine.local import LocalVerifier
from specserve.models.causal_lm import CausalLM
from specserve.models.fused_projections import fuse_projections, ProjectionPart
from specserve.models.quantize import (
    drafter_dtype,
    DynamicInt8Linear,
    Int4Linear,
    Int8WeightOnlyLinear,
    quantize_model,
    split_spec,
    WIDE_ROWS,
)
from specserve.sampling.params import SamplingParams

from test_ray_app import save_tiny_model


def test_split_spec():
    assert split_spec("qwen2.5-coder-0.5b@int4") == ("qwen2.5-coder-0.5b", "int4")
    assert split_spec("self@int8") == ("self", "int8")
    assert split_spec("/models/x") == ("/models/x", None)
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        split_spec("m@int3")
    with pytest.raises(ValueError, match="a model must come before"):
        split_spec("@int8")


@pytest.mark.parametrize("cls,dtype,tol", [
    (DynamicInt8Linear, torch.float32, 0.08),  # 7/8-bit activations x 8-bit weights
    (Int8WeightOnlyLinear, torch.bfloat16, 0.03),
    (Int4Linear, torch.float32, 0.15),  # 4-bit groupwise weights
])
def test_each_kernel_approximates_its_layer(cls, dtype, tol):
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=True).to(dtype)
    x = torch.randn(5, 3, 128, dtype=dtype)
    q = cls(linear, linear.weight, linear.bias)
    with torch.inference_mode():
        want, got = linear(x).float(), q(x)
    assert got.shape == want.shape and got.dtype == dtype
    rel = (got.float() - want).norm() / want.norm()
    assert rel < tol, rel
    # a different weight gives a different answer (the layer really uses its own weights)
    other = cls(linear, torch.randn_like(linear.weight), linear.bias)
    with torch.inference_mode():
        assert ((other(x).float() - want).norm() / want.norm()) > 0.5


def test_int4_needs_whole_groups():
    with pytest.raises(ValueError, match="divisible by 32"):
        Int4Linear(nn.Linear(40, 8), torch.randn(8, 40), None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_keeps_its_predictions_and_lm_head(model_dir, scheme):
    full = CausalLM.load(model_dir, dtype="float32", pack_weights=False)
    quant = CausalLM.load(model_dir, dtype="float32", quantize=scheme)
    assert scheme in quant.kernels
    assert not any(type(m) is nn.Linear for m in quant.model.modules())  # lm_head included
    assert quant.vocab_size == full.vocab_size
    ids = [5, 17, 23, 42, 8, 5, 17, 23]
    a, b = full.new_session(), quant.new_session()
    a.sync(ids), b.sync(ids)
    la, lb = a.next_logits(), b.next_logits()
    assert torch.corrcoef(torch.stack([la, lb]))[0, 1] > 0.95


def test_quantize_refuses_accelerators_and_unknown_schemes(model_dir):
    lm = CausalLM.load(model_dir, dtype="float32", pack_weights=False)
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(lm.model, "int2")


@pytest.mark.parametrize("spec", ["self@int8", "self@int4"])
def test_quantized_self_drafter_changes_speed_not_output(model_dir, spec):
    verifier = CausalLM.load(model_dir, dtype="float32")
    drafter_lm = load_drafter_lm(spec, verifier)
    assert drafter_lm.model is not verifier.model and drafter_lm.name == spec
    engine = SpeculativeEngine(LocalVerifier(verifier), make_local_drafters([spec], verifier))
    prompt = [5, 17, 23, 42, 8, 5, 17, 23, 61, 3]
    tokens, stats = engine.run(GenerationRequest(prompt_ids=prompt, max_new_tokens=32, rule="greedy",
                                                 draft_length=4))
    assert tokens == verifier.plain_generate(prompt, 32, SamplingParams(), stop_ids=())[: len(tokens)]
    assert stats.drafted > 0 and stats.accepted > 0  # a quantized copy of the verifier agrees often
    with pytest.raises(ValueError, match="needs a quantization"):
        load_drafter_lm("self", verifier)


def test_quantized_cpu_drafter_computes_in_fp32_beside_a_bf16_verifier(model_dir):
    verifier = CausalLM.load(model_dir, dtype="bfloat16")
    drafter_lm = load_drafter_lm("self@int8", verifier)
    assert drafter_lm.dtype == torch.float32 and "fbgemm" in drafter_lm.kernels  # module doc: faster on CPU
    assert load_drafter_lm("self@int4", verifier).dtype == torch.float32
    assert drafter_dtype(torch.bfloat16, "cuda:0", "int8") == torch.bfloat16  # accelerators keep theirs
    assert drafter_dtype(torch.bfloat16, "cpu", None) == torch.bfloat16  # unquantized drafters too
    engine = SpeculativeEngine(LocalVerifier(verifier), make_local_drafters(["self@int8"], verifier))
    prompt = [5, 17, 23, 42, 8, 5, 17, 23, 61, 3]
    tokens, stats = engine.run(GenerationRequest(prompt_ids=prompt, max_new_tokens=16, rule="greedy",
                                                 draft_length=4))
    assert len(tokens) == 16 and stats.drafted > 0  # the mixed pair runs rounds end to end


def _stacked_linear(weight, bias):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def test_fused_projections_are_the_separate_projections():
    """q/k/v (biases on some only) and gate/up stacked into one layer each give what the separate
    layers gave, whatever order the parts are asked in, and hold no activation afterwards."""
    torch.manual_seed(0)
    block = nn.Module()
    block.q_proj, block.k_proj, block.v_proj = nn.Linear(16, 12), nn.Linear(16, 4, bias=False), nn.Linear(16, 4)
    block.gate_proj, block.up_proj = nn.Linear(16, 24, bias=False), nn.Linear(16, 24, bias=False)
    block.o_proj = nn.Linear(12, 16)  # not part of a group: left alone
    separate = {name: getattr(block, name) for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}
    x, y = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        want = {name: layer(x) for name, layer in separate.items()}
        want_y = separate["k_proj"](y)
    assert fuse_projections(block, _stacked_linear) == 2
    assert isinstance(block.q_proj, ProjectionPart) and type(block.o_proj) is nn.Linear
    with torch.no_grad():
        for order in (["q_proj", "k_proj", "v_proj"], ["v_proj", "q_proj", "k_proj"], ["gate_proj", "up_proj"]):
            for name in order:
                assert torch.allclose(getattr(block, name)(x), want[name], atol=1e-6), name
            assert getattr(block, order[0]).shared._last.output is None  # dropped once every part was served
        assert torch.allclose(block.k_proj(y), want_y)  # a new input runs the stacked layer again
        assert torch.allclose(block.q_proj(x), want["q_proj"]) and torch.allclose(block.q_proj(x), want["q_proj"])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_stacks_projections_without_changing_logits(model_dir, scheme, monkeypatch):
    fused = CausalLM.load(model_dir, dtype="float32", quantize=scheme)
    parts = [m for m in fused.model.modules() if isinstance(m, ProjectionPart)]
    assert len(parts) == 5 * fused.model.config.num_hidden_layers
    monkeypatch.setattr("specserve.models.quantize.fuse_projections", lambda model, make_layer: 0)
    separate = CausalLM.load(model_dir, dtype="float32", quantize=scheme)
    assert not any(isinstance(m, ProjectionPart) for m in separate.model.modules())
    a, b = fused.new_session(), separate.new_session()
    ids = [5, 17, 23, 42, 8, 5, 17, 23]
    a.sync(ids), b.sync(ids)
    assert torch.allclose(a.next_logits(), b.next_logits(), atol=1e-5)  # prefill: many rows
    for token in (9, 31, 4):
        a.append(token), b.append(token)
        assert torch.allclose(a.next_logits(), b.next_logits(), atol=1e-5)  # decode: one row


@pytest.mark.parametrize("cls", [Int4Linear, Int8WeightOnlyLinear])
def test_wide_calls_run_the_dense_copy_of_the_same_dequantized_weight(cls, monkeypatch):
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=True)
    narrow, wide = cls(linear, linear.weight, linear.bias), cls(linear, linear.weight, linear.bias, wide=True)
    assert narrow.wide_weight is None and wide.wide_weight.dtype == torch.bfloat16
    few, many = torch.randn(WIDE_ROWS - 1, 128), torch.randn(WIDE_ROWS, 128)
    with torch.inference_mode():
        assert torch.equal(wide(few), narrow(few))  # under WIDE_ROWS rows: the kernel, bit for bit
        want, got = narrow(many), wide(many)
        dense = (torch.nn.functional.linear(many.to(torch.bfloat16), wide.wide_weight) + wide.bias).float()
    assert torch.equal(got, dense)  # from WIDE_ROWS rows: the dense copy
    assert ((got - want).norm() / want.norm()) < 0.02  # of the very weight the kernel dequantizes
    calls = []
    monkeypatch.setattr(cls, "_matmul", lambda self, x: calls.append(x.shape[0]) or torch.zeros(x.shape[0], 96, dtype=x.dtype))
    with torch.inference_mode():
        wide(many), wide(few)
    assert calls == [WIDE_ROWS - 1]


@pytest.mark.parametrize("native", [True, False])
def test_wide_copies_only_where_bf16_is_native_and_never_for_the_lm_head(model_dir, native, monkeypatch):
    monkeypatch.setattr("specserve.models.quantize.wide_copies_pay", lambda: native)
    lm = CausalLM.load(model_dir, dtype="float32", quantize="int4")
    layers = [m for m in lm.model.modules() if isinstance(m, Int4Linear)]
    head = lm.model.get_output_embeddings()
    assert isinstance(head, Int4Linear) and head.wide_weight is None
    others = [m for m in layers if m is not head]
    assert others and all((m.wide_weight is not None) == native for m in others)
    assert ("dense bf16" in lm.kernels) == native
