"""The forward pass of a Llama-family decoder (Llama, Qwen2, Mistral, SmolLM2) without transformers'
per-call machinery: the same weights, the same ops in the same order, fewer Python layers.

Why: a drafter token is a forward over ONE row, and on a CPU its arithmetic is small (an int8
Qwen2.5-0.5B token: ~21 ms of linear kernels on 2 cores). transformers' model call wraps that in
work that does not depend on the model size: output capturing hooks, kwargs merging and
deprecation wrappers on every module, mask construction, a dataclass per layer output, nn.Module
`__call__` on ~300 submodules. Profiled on an AMD EPYC (AVX512-BF16, 2 cores, compute thread),
one int8 Qwen2.5-0.5B decode step at context 300 spent ~29 ms in torch ops and ~42 ms in all.
Here the step is the decoder's arithmetic and nothing else; the numbers are those of
transformers' own forward (same kernels, same op order: tests/test_lean_forward.py compares them).

What it reads from the model: the embedding, each layer's norms, projections (plain, packed,
quantized or stacked by models/fused_projections.py: whatever module stands there is called),
activation and rotary embedding, the final norm and lm_head. What it refuses (`LeanForward.build`
returns None, and the session keeps transformers' forward): other architectures, sliding-window
or hybrid attention, q/k norms, attention biases on o_proj, non-sdpa attention.

Cache: the session's transformers DynamicCache, updated per layer exactly as transformers does
(`DynamicLayer.update`), so crops, row moves and batched verification (models/batched.py) read
the same tensors either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import NAME as ATTENTION
from .fused_projections import ProjectionPart

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, S, D] -> [B, H_kv * n_rep, S, D], as transformers' repeat_kv."""
    batch, heads, length, dim = x.shape
    return x[:, :, None].expand(batch, heads, n_rep, length, dim).reshape(batch, heads * n_rep, length, dim)


class _Norm:
    """An RMSNorm's arithmetic, as transformers' LlamaRMSNorm / Qwen2RMSNorm compute it."""

    __slots__ = ("weight", "eps")

    def __init__(self, module: nn.Module) -> None:
        self.weight = module.weight
        self.eps = float(module.variance_epsilon)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _projections(parent: nn.Module, names: tuple[str, ...]):
    """A callable x -> tuple of the named projections' outputs: ONE call when they are parts of
    one stacked layer (models/fused_projections.py), one call each otherwise."""
    modules = [getattr(parent, name) for name in names]
    if all(isinstance(m, ProjectionPart) for m in modules) and len({id(m.shared) for m in modules}) == 1:
        shared = modules[0].shared
        bounds = [shared.bounds[m.index] for m in modules]
        layer = shared.layer

        def stacked(x: torch.Tensor):
            y = layer(x)
            return tuple(y[..., low:high] for low, high in bounds)

        return stacked
    return lambda x: tuple(m(x) for m in modules)


class _Layer:
    __slots__ = ("input_norm", "post_norm", "qkv", "o_proj", "gate_up", "down_proj", "act")

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = _Norm(layer.input_layernorm)
        self.post_norm = _Norm(layer.post_attention_layernorm)
        self.qkv = _projections(attn, ("q_proj", "k_proj", "v_proj"))
        self.o_proj = attn.o_proj
        self.gate_up = _projections(mlp, ("gate_proj", "up_proj"))
        self.down_proj = mlp.down_proj
        self.act = mlp.act_fn


class LeanForward:
    """`forward(ids, positions, mask, cache, ...)` for a supported model (module doc)."""

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        decoder = model.get_decoder()
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.norm = _Norm(decoder.norm)
        self.lm_head = model.get_output_embeddings()
        self.layers = [_Layer(layer) for layer in decoder.layers]
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.scaling = float(decoder.layers[0].self_attn.scaling)
        # masked multi-row attention with GQA: packed query heads (models/attention.py, what
        # CausalLM.load asks for) or transformers' plain sdpa, which repeats the KV heads
        self.pack_gqa = config._attn_implementation == ATTENTION

    @classmethod
    def build(cls, model: nn.Module) -> "LeanForward | None":
        """A LeanForward for `model`, or None where it would not compute what transformers does."""
        config = model.config
        if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            return None
        if getattr(config, "_attn_implementation", "") not in ("sdpa", ATTENTION):
            return None
        if getattr(config, "use_sliding_window", False):
            return None
        if config.model_type == "mistral" and getattr(config, "sliding_window", None):
            return None
        if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
            return None
        decoder = model.get_decoder()
        for layer in decoder.layers:
            attn = layer.self_attn
            if any(hasattr(attn, name) for name in ("q_norm", "k_norm")) or getattr(attn.o_proj, "bias", None) is not None:
                return None
            if getattr(attn, "sliding_window", None):
                return None
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if any(not hasattr(n, "variance_epsilon") for n in norms):
                return None
        if getattr(getattr(decoder, "rotary_emb", None), "rope_type", "default") not in ("default", "linear", "llama3"):
            return None  # dynamic rope types recompute frequencies per call (transformers' wrapper)
        return cls(model)

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache,
        logits_to_keep: int,
        want_hidden: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids, positions [B, T]; mask: additive [B, 1, T, past + T] or None (causal); returns
        logits [B, T or logits_to_keep, V] and, when asked, the final normed hidden [B, T, H]."""
        batch, rows = ids.shape
        h = self.embed(ids)
        cos, sin = self.rotary(h, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        past = cache.get_seq_length()
        attn_mask = mask
        if attn_mask is None and rows > 1 and past:
            # causal over (cached rows, fed rows): what transformers' sdpa mask is for this case
            attn_mask = torch.ones(rows, past + rows, dtype=torch.bool, device=h.device).tril(past)[None, None]
        n_rep = self.heads // self.kv_heads
        packed_mask = None
        if attn_mask is not None and n_rep > 1 and self.pack_gqa:
            # query heads sharing a KV head become its rows (models/attention.py): no KV copies
            packed_mask = attn_mask.repeat(1, 1, n_rep, 1)
        for index, layer in enumerate(self.layers):
            residual = h
            x = layer.input_norm(h)
            q, k, v = layer.qkv(x)
            q = q.view(batch, rows, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(batch, rows, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(batch, rows, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k, v = cache.layers[index].update(k, v)
            if attn_mask is None:  # one row, or a prefill on an empty cache (is_causal)
                out = F.scaled_dot_product_attention(
                    q, k, v, scale=self.scaling, is_causal=rows > 1, enable_gqa=n_rep > 1
                )
            elif n_rep > 1 and self.pack_gqa:
                packed = q.reshape(batch, self.kv_heads, n_rep * rows, self.head_dim)
                out = F.scaled_dot_product_attention(packed, k, v, attn_mask=packed_mask, scale=self.scaling)
                out = out.reshape(batch, self.heads, rows, self.head_dim)
            elif n_rep > 1:
                out = F.scaled_dot_product_attention(
                    q, _repeat_kv(k, n_rep), _repeat_kv(v, n_rep), attn_mask=attn_mask, scale=self.scaling
                )
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scaling)
            out = out.transpose(1, 2).reshape(batch, rows, -1)
            h = residual + layer.o_proj(out)
            residual = h
            gate, up = layer.gate_up(layer.post_norm(h))
            h = residual + layer.down_proj(layer.act(gate) * up)
        h = self.norm(h)
        kept = h if logits_to_keep == 0 else h[:, -logits_to_keep:]
        return self.lm_head(kept), (h if want_hidden else None)
