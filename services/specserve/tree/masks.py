"""What a verifier backend needs to score a tree in one forward pass on top of its KV cache,
and which cache rows to keep afterwards.

Layout (models/base.py): the cache holds `past_len` committed rows; the forward feeds
[pending] + tree nodes, i.e. query row 0 = the pending last committed token and query row
1 + i = tree node i; keys are the past rows followed by those n + 1 new rows.
"""

from __future__ import annotations

import torch


def verifier_tree_mask(tree_mask: torch.Tensor, past_len: int) -> torch.Tensor:
    """bool [n + 1, past_len + n + 1]: every row sees the past and the pending token; node
    rows additionally see their ancestors and themselves (`tree_mask` = ancestor mask [n, n])."""
    n = tree_mask.shape[0]
    mask = torch.zeros(n + 1, past_len + n + 1, dtype=torch.bool)
    mask[:, : past_len + 1] = True
    mask[1:, past_len + 1 :] = tree_mask
    return mask


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """bool [q, k] -> additive [1, 1, q, k] (0 where allowed, dtype min elsewhere), the 4-D form
    transformers' attention takes."""
    out = torch.zeros(mask.shape, dtype=dtype)
    out = out.masked_fill(~mask, torch.finfo(dtype).min)
    return out[None, None]


def tree_position_ids(past_len: int, depths: list[int] | tuple[int, ...]) -> torch.Tensor:
    """[n + 1]: the pending token sits at past_len, node i at past_len + depth(i)."""
    return past_len + torch.tensor([0, *depths], dtype=torch.long)


def keep_index(past_len: int, path: list[int]) -> torch.Tensor:
    """Cache rows to keep after verification: the past, the pending token, then the accepted
    path's node rows (node i was written at past_len + 1 + i). The correction/bonus token
    becomes the new pending token and is not in the cache yet."""
    return torch.cat(
        [torch.arange(past_len + 1), past_len + 1 + torch.tensor(path, dtype=torch.long)]
    )
