"""oneDNN weight-prepacked linear layers for CPU inference.

Why: verifying a draft feeds the verifier a handful of rows (pending token + tree nodes) at
once. On CPU, `torch.nn.functional.linear` (MKL sgemm on a [out, in] weight) costs about 2-4x
a single row already at 2-5 rows on a 2-core box, so a verification pass of 5 rows cost ~3
plain steps and speculation could never pay. oneDNN's linear on a weight reordered once into its
blocked layout (the same prepacking torch.compile's CPU backend does) runs 1-9 rows in about
the time of one: the weights are streamed from memory once either way, which is what a decode
step is bound by. Numerically it is the same fp32 matmul with a different summation order.
"""

from __future__ import annotations

import torch
from torch import nn


def packing_supported(model: nn.Module) -> bool:
    """fp32 weights on CPU with oneDNN available (the only combination this targets)."""
    try:
        param = next(model.parameters())
    except StopIteration:
        return False
    return param.device.type == "cpu" and param.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """Drop-in for an inference-only fp32 nn.Linear with its weight prepacked for oneDNN.

    The dense weight is released unless something else shares it (tied input embeddings), in
    which case `weight` stays so `get_output_embeddings().weight` keeps working."""

    def __init__(self, linear: nn.Linear, keep_weight: bool, batch_hint: int = 8) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = linear.bias
        if keep_weight:
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def pack_linear_layers(model: nn.Module) -> int:
    """Replace every nn.Linear of an fp32 CPU model by a PackedLinear, in place. Returns how many
    were replaced (0 when packing is not supported here)."""
    if not packing_supported(model):
        return 0
    # weights that are also used elsewhere (tied embeddings) must stay dense
    uses: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            uses[id(param)] = uses.get(id(param), 0) + 1
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                keep = uses.get(id(child.weight), 0) > 1
                setattr(parent, child_name, PackedLinear(child, keep_weight=keep))
                replaced += 1
    return replaced
