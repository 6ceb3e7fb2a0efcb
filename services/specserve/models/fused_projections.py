"""One kernel call for sibling projections that read the same input: q/k/v of an attention block,
gate/up of a gated MLP.

Why: a quantized drafter's decode step is ~170 small matrix-vector calls, and each call has a
fixed cost (dispatch, quantizing the activation, waking the OpenMP team, a kernel too narrow to
reach memory bandwidth: k_proj and v_proj are 128 x 896 on Qwen2.5-0.5B). Stacking the rows of
q, k and v (and of gate and up) into one weight does the same arithmetic in 2 calls instead of 5.
Measured on 24 Qwen2.5-0.5B layers, one token, 2 cores (AMD EPYC, AVX512-BF16, compute thread):
int8 fbgemm 16.6 -> 13.2 ms, int4 13.2 -> 10.3 ms per token (`python -m bench kernels` shows the
whole drafter). The numbers do not change: every kernel here quantizes weights per output row
(or per row group) and activations per call, so the stacked layer computes the same dot products.

How: transformers' attention and MLP modules call `self.q_proj(x)`, `self.k_proj(x)`, ... one
after another on the same tensor. Each of those names becomes a `ProjectionPart` of one
`SharedProjection`; the first part asked for an input runs the stacked layer, the others slice
its output. The output is dropped once every part has been served, so a long prefill does not
keep [tokens, 9728] activations per layer alive.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# sibling projections fused into one call, by the attribute names transformers' Llama-family
# (Llama, Qwen2, Mistral, SmolLM2) modules use
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedProjection(nn.Module):
    """The stacked layer of a group, and the last input it ran on (module doc)."""

    def __init__(self, layer: nn.Module, widths: list[int]) -> None:
        super().__init__()
        self.layer = layer
        self.bounds = [(sum(widths[:i]), sum(widths[: i + 1])) for i in range(len(widths))]
        # plain attributes in a plain object: nn.Module.__setattr__ costs ~9 us a call, and a
        # decode step would set them ~240 times
        self._last = _LastInput()

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        last = self._last
        if x is not last.input or index in last.served:
            last.input, last.output, last.served = x, self.layer(x), set()
        last.served.add(index)
        low, high = self.bounds[index]
        y = last.output[..., low:high]
        if len(last.served) == len(self.bounds):
            last.input = last.output = None
        return y


class _LastInput:
    __slots__ = ("input", "output", "served")

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None  # held, so `is` cannot match a new tensor
        self.output: torch.Tensor | None = None
        self.served: set[int] = set()


class ProjectionPart(nn.Module):
    """Stands where one projection of a group was: its slice of the shared output."""

    def __init__(self, shared: SharedProjection, index: int, in_features: int, out_features: int) -> None:
        super().__init__()
        object.__setattr__(self, "shared", shared)  # not a submodule: the parent registers it once
        self.index = index
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.part(x, self.index)


def fuse_projections(
    model: nn.Module, make_layer: Callable[[torch.Tensor, torch.Tensor | None], nn.Module]
) -> int:
    """Replace each group of sibling `nn.Linear` projections (GROUPS) by one stacked layer built by
    `make_layer(weight, bias)` (a quantized kernel, say), in place. Returns how many groups were
    fused; modules without a complete group of plain linears are left alone."""
    fused = 0
    for parent in list(model.modules()):
        for names in GROUPS:
            linears = [getattr(parent, name, None) for name in names]
            if not all(type(linear) is nn.Linear for linear in linears):
                continue
            if len({linear.in_features for linear in linears}) != 1:
                continue
            weight = torch.cat([linear.weight.detach() for linear in linears])
            bias = None
            if any(linear.bias is not None for linear in linears):
                bias = torch.cat([
                    linear.bias.detach() if linear.bias is not None
                    else linear.weight.new_zeros(linear.out_features)
                    for linear in linears
                ])
            shared = SharedProjection(make_layer(weight, bias), [linear.out_features for linear in linears])
            parent.add_module("_".join(name.removesuffix("_proj") for name in names) + "_fused", shared)
            for index, (name, linear) in enumerate(zip(names, linears)):
                setattr(parent, name, ProjectionPart(shared, index, linear.in_features, linear.out_features))
            fused += 1
    return fused
