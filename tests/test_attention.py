"""models/attention.py: the GQA-packing sdpa equals transformers' sdpa (repeat_kv) row for row."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from specserve.models.attention import packed_gqa_sdpa


class _Module:
    def __init__(self, n_rep):
        self.num_key_value_groups = n_rep
        self.is_causal = True


@pytest.mark.parametrize("n_rep,batch,q_len", [(2, 1, 5), (3, 2, 4), (6, 1, 9), (1, 1, 3), (3, 1, 1)])
def test_packed_gqa_equals_repeat_kv(n_rep, batch, q_len):
    g = torch.Generator().manual_seed(n_rep * 10 + q_len)
    kv_heads, dim, past = 2, 16, 11
    heads = kv_heads * n_rep
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k = torch.randn(batch, kv_heads, past + q_len, dim, generator=g)
    v = torch.randn(batch, kv_heads, past + q_len, dim, generator=g)
    visible = torch.rand(batch, 1, q_len, past + q_len, generator=g) < 0.7
    visible[..., 0] = True  # every row sees something
    mask = torch.zeros(visible.shape).masked_fill_(~visible, torch.finfo(torch.float32).min)
    want, _ = sdpa_attention_forward(_Module(n_rep), q, k, v, mask, scaling=dim**-0.5)
    got, _ = packed_gqa_sdpa(_Module(n_rep), q, k, v, mask, scaling=dim**-0.5)
    assert got.shape == want.shape == (batch, q_len, heads, dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a different mask object of the same shape is not served the cached repetition
    other = torch.zeros_like(mask)
    want2, _ = sdpa_attention_forward(_Module(n_rep), q, k, v, other, scaling=dim**-0.5)
    got2, _ = packed_gqa_sdpa(_Module(n_rep), q, k, v, other, scaling=dim**-0.5)
    torch.testing.assert_close(got2, want2, atol=1e-5, rtol=1e-5)
