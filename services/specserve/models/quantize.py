"""Weight-quantized drafters: `MODEL@int8`, `MODEL@int4` (and `self@int8|int4`, the verifier's own
weights quantized into a separate copy).

Why: a decode step streams every weight from memory once, so a drafter's cost per token is its
weight bytes. Qwen2.5-0.5B in fp32 (its tied lm_head alone is 151936 x 896 = 0.5 GB) costs about
0.35 of a 1.5B verifier step per token: too much to pay at a 3x size ratio. int8 weights cut the
bytes 4x, int4 8x. Only drafters are quantized: a drafter's numbers change speed (acceptance),
never the output, because verification is exact. The verifier is never quantized unless asked.

Kernels, chosen per CPU (all torch's own, eager mode; measured on a 2-core AMD EPYC, AVX2 only,
lm_head 896 -> 151936: fp32 oneDNN-packed 26 ms, int8 dynamic 6.4 ms, int4 10.8 ms, int8
weight-only with fp32 activations 109 ms):
  int8, fp32 model: fbgemm dynamic int8 (`quantized::linear_dynamic`: activations quantized per
        call, int8 x int8 GEMM, per-channel weight scales). Fast on AVX2 and AVX512 alike.
        On AVX2 without VNNI activations use 7 bits (`reduce_range`), as torch does for fbgemm.
  int8, bf16 model (CPUs with AVX512-BF16/AMX): `aten._weight_int8pack_mm`, weight-only int8
        with bf16 activations.
  int4: `aten._weight_int4pack_mm_for_cpu`, groupwise (32) asymmetric int4 weights with bf16
        activations (the kernel's fast path; an fp32 model casts in and out per layer).
A quantized CPU drafter computes in fp32 whatever the verifier's dtype (`drafter_dtype`): its
attention, norms and activations are the part the weights do not shrink, and eager bf16 makes
them slower, not faster. Measured (Qwen2.5-0.5B, one token at context 300, 2 cores): AMD EPYC
with AVX512-BF16 (no AMX): fp32 model int8 22.9 ms, int4 21.9 ms; bf16 model int8 34.4 ms, int4
29.6 ms, unquantized bf16 78.9 ms; AVX2-only EPYC: int8 fp32 41.6 ms is the fastest there too.
q/k/v and gate/up are stacked into one quantized layer each (models/fused_projections.py: the
same numbers in 2 kernel calls instead of 5; 15-17 % off a Qwen2.5-0.5B drafter token, int8 and
int4, on the AVX512-BF16 EPYC). The lm_head is quantized too (for tied embeddings only the output
projection: the input embedding stays a dense lookup).
Wide calls: the weight-only kernels' time grows with the rows of a call (they dequantize and FMA per
row; measured on an Intel Xeon with AMX, a 9728 x 896 int4 layer: 0.37 ms at 1 row, 1.0 ms at 8, 60
ms at 504, while a dense bf16 GEMM is flat at 0.8-1.0 ms to 32 rows and 5 ms at 504). A Qwen2.5-0.5B
int4 drafter read a 504-token prompt in 2.8 s there, twice the 1.5B verifier's own prefill (1.4 s).
So where the CPU runs bf16 natively each weight-only layer but the lm_head also keeps its dequantized
weight as a dense bf16 matrix and calls of `WIDE_ROWS` rows or more (prefills, tree builds) use it;
decode steps keep streaming the 4-bit (8-bit) weights. The cost is memory: 2 bytes a parameter
(about 0.7 GB for Qwen2.5-0.5B without its lm_head). The same numbers either way up to bf16 rounding
of the dequantized weight (the kernels dequantize to bf16 too). torchao's int8 weight-only tensor dequantizes the whole weight
per call in eager mode, so it is not used here.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .fused_projections import fuse_projections

SCHEMES = ("int8", "int4")
INT4_GROUP = 32


def cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return flag in line.split()
    except OSError:
        pass
    return False


def split_spec(spec: str) -> tuple[str, str | None]:
    """"qwen2.5-coder-0.5b@int4" -> ("qwen2.5-coder-0.5b", "int4"); no suffix -> (spec, None)."""
    if "@" not in spec:
        return spec, None
    model, scheme = spec.rsplit("@", 1)
    if scheme not in SCHEMES:
        raise ValueError(f"drafter {spec!r}: unknown quantization {scheme!r}; expected one of {SCHEMES}")
    if not model:
        raise ValueError(f"drafter {spec!r}: a model must come before '@{scheme}'")
    return model, scheme


class DynamicInt8Linear(nn.Module):
    """fbgemm dynamic int8 linear on fp32 activations (module doc)."""

    kernel = "int8 dynamic (fbgemm)"

    def __init__(self, linear: nn.Module | None, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).double()
        with warnings.catch_warnings():  # quantized tensors are deprecated, the kernels are not
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())
        self.reduce_range = not cpu_has("avx512_vnni")  # 7-bit activations keep AVX2's int16 sums exact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, self.reduce_range).to(x.dtype)


# Rows from which a weight-only layer runs its dense bf16 copy instead of its kernel (module doc:
# the measured crossover on an AMX Xeon is 8 rows for the MLP shapes, 8-16 for attention's).
WIDE_ROWS = 8


def wide_copies_pay() -> bool:
    """Dense bf16 copies for wide calls pay only where bf16 GEMMs run natively (AVX512-BF16/AMX);
    emulated bf16 (AVX2) is slower than the kernels at any width."""
    from .causal_lm import native_bf16  # causal_lm imports this module

    return native_bf16("cpu")


class _Bf16PackedLinear(nn.Module):
    """Shared by the packed weight-only kernels: they take 2-D bf16 activations, so inputs are
    flattened and cast in, the bias added in bf16, and the result shaped and cast back. With a
    `wide_weight` (module doc) calls of WIDE_ROWS rows or more run it as a dense bf16 GEMM."""

    out_features: int
    wide_weight: torch.Tensor | None

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _keep_wide_copy(self, dequantized: torch.Tensor | None) -> None:
        self.register_buffer("wide_weight", None if dequantized is None else dequantized.to(torch.bfloat16),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.wide_weight is not None and x2d.shape[0] >= WIDE_ROWS:
            y = torch.nn.functional.linear(x2d, self.wide_weight)
        else:
            y = self._matmul(x2d)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class Int8WeightOnlyLinear(_Bf16PackedLinear):
    """Weight-only int8 with bf16 activations (`aten._weight_int8pack_mm`)."""

    kernel = "int8 weight-only (aten._weight_int8pack_mm, bf16)"

    def __init__(self, linear: nn.Module | None, weight: torch.Tensor, bias: torch.Tensor | None,
                 wide: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        self.register_buffer("qweight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self._keep_wide_copy(self.qweight.float() * self.scales.float()[:, None] if wide else None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x2d, self.qweight, self.scales)


class Int4Linear(_Bf16PackedLinear):
    """Groupwise asymmetric int4 weights, bf16 activations (`aten._weight_int4pack_mm_for_cpu`)."""

    kernel = "int4 weight-only (aten._weight_int4pack_mm_for_cpu, bf16)"

    def __init__(self, linear: nn.Module | None, weight: torch.Tensor, bias: torch.Tensor | None,
                 wide: bool = False) -> None:
        super().__init__()
        n, k = weight.shape
        if k % INT4_GROUP:
            raise ValueError(f"int4 needs in_features divisible by {INT4_GROUP}, got {k}")
        self.in_features, self.out_features = k, n
        w = weight.detach().float().reshape(n, k // INT4_GROUP, INT4_GROUP)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = torch.clamp(torch.round((w - low) / scale), 0, 15).to(torch.int32).reshape(n, k)
        # the kernel dequantizes (q - 8) * scale + zero, so zero is the value of code 8
        zero = low + 8 * scale
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous()
        self.register_buffer("scales_zeros", sz.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        # what the kernel computes: (q - 8) * scale + zero, from the bf16 scale and zero
        scale_b, zero_b = (t.to(torch.bfloat16).float() for t in (scale, zero))
        self._keep_wide_copy(((q.reshape(n, -1, INT4_GROUP) - 8) * scale_b + zero_b).reshape(n, k) if wide else None)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.packed, INT4_GROUP, self.scales_zeros)


def drafter_dtype(verifier_dtype: torch.dtype, device: str, scheme: str | None) -> torch.dtype:
    """The dtype a drafter model computes in: fp32 for a quantized drafter on the CPU (module
    doc: faster there on every CPU measured), the verifier's dtype otherwise. Verification reads
    the drafter's token ids and probabilities only, so the two dtypes never meet in a kernel."""
    if scheme is not None and str(device).split(":", 1)[0] == "cpu":
        return torch.float32
    return verifier_dtype


def layer_class(scheme: str, model_dtype: torch.dtype) -> type[nn.Module]:
    if scheme == "int4":
        return Int4Linear
    if scheme == "int8":
        return Int8WeightOnlyLinear if model_dtype == torch.bfloat16 else DynamicInt8Linear
    raise ValueError(f"unknown quantization {scheme!r}; expected one of {SCHEMES}")


def quantize_model(model: nn.Module, scheme: str) -> str:
    """Replace every dense linear layer of a CPU model (lm_head included) by the `scheme` kernel
    for this CPU and the model's dtype, in place, sibling projections stacked into one layer.
    Returns the kernel's name (for summaries)."""
    param = next(model.parameters())
    if param.device.type != "cpu":
        raise ValueError(f"quantized drafters run on the CPU only (model is on {param.device})")
    cls = layer_class(scheme, param.dtype)
    # dense bf16 copies for wide calls (module doc), not for the lm_head: a prefill keeps one row of it
    wide = issubclass(cls, _Bf16PackedLinear) and wide_copies_pay()
    lm_head = model.get_output_embeddings()

    def layer(linear: nn.Module | None, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        return cls(linear, weight, bias, wide=True) if wide and linear is not lm_head else cls(linear, weight, bias)

    # q/k/v and gate/up as one call each (models/fused_projections.py): same numbers, fewer calls
    fuse_projections(model, lambda weight, bias: layer(None, weight, bias))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, layer(child, child.weight, child.bias))
    return cls.kernel + (f"; {WIDE_ROWS}+ rows: dense bf16" if wide else "")
