"""SDPA for grouped-query attention that never copies the KV cache: `attn_implementation="sdpa_packed_gqa"`.

Why: transformers' sdpa integration handles GQA (Qwen2.5-1.5B: 12 query heads on 2 KV heads) with
a masked multi-row query by `repeat_kv`, which materialises the whole cache n_rep times, every
layer, every pass. A verification pass is exactly that case (several rows, a tree mask): on a
2-core CPU the copies took 95 ms of a 371 ms 1 + 3-row pass of Qwen2.5-1.5B at a 300-token
context, against a 254 ms one-row step. Here the query heads that share a KV head are packed
into its rows instead ([B, H, q, D] -> [B, H_kv, n_rep * q, D], the mask repeated to match), so
attention reads the cache as it is. transformers already does this for one-row queries
(`pack_gqa`); this extends it to every masked query. The result is the same attention, summed
in the same order per row. Prefill without a mask, and models without GQA, take transformers'
own sdpa path unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "sdpa_packed_gqa"


def packed_gqa_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                    is_causal=None, **kwargs):
    n_rep = int(getattr(module, "num_key_value_groups", 1) or 1)
    q_len = query.shape[2]
    plain = (
        n_rep == 1 or q_len == 1 or attention_mask is None or attention_mask.dim() != 4
        or attention_mask.shape[1] != 1 or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None or dropout
    )
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads = heads // n_rep
    # head h = kv * n_rep + r (repeat_kv's order): row r * q_len + i of KV head kv is query (h, i)
    packed = query.reshape(batch, kv_heads, n_rep * q_len, dim)
    mask = _repeated_mask(attention_mask, n_rep)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, q_len, value.shape[-1]).transpose(1, 2).contiguous(), None


# Every layer of one forward gets the same mask object: repeat it once, not once per layer. The
# cache keeps the source tensor itself, so a later mask can never be mistaken for it (identity;
# masks are built per forward and never written in place).
_last_mask: list = [None, 0, None]  # [source mask, n_rep, repeated]


def _repeated_mask(mask: torch.Tensor, n_rep: int) -> torch.Tensor:
    source, reps, repeated = _last_mask
    if source is mask and reps == n_rep:
        return repeated
    repeated = mask.repeat(1, 1, n_rep, 1)
    _last_mask[:] = [mask, n_rep, repeated]
    return repeated


AttentionInterface.register(NAME, packed_gqa_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks transformers builds are sdpa's
