"""Verify several sessions' token trees in ONE forward pass (cross-request batching).

Each session keeps its own DynamicCache, of its own length. A batched pass stacks them:

* past rows: every session's cache is right-padded to the longest one (P rows) and the caches are
  concatenated along the batch axis; pad rows are never visible;
* fed rows: [pending] + tree.tokens per session, right-padded to the longest feed (T rows); a pad
  row sees only itself (a fully masked row would give NaN);
* a 4-D additive mask [B, 1, T, P + T] carries each session's tree mask (LMSession.tree_inputs),
  shifted so its fed rows start at column P; position ids are each session's own.

After the pass each session gets back its own rows (past[:L] + fed[:n]) and is marked scored, so
`LMSession.commit` keeps the accepted path exactly as after `LMSession.score_tree`. The logits are
the same as scoring each session alone, up to float rounding of the larger matmuls.

Why: on a GPU a forward over B x T rows costs about what one over T rows costs, and on a CPU with
prepacked weights (models/packed_linear.py) the weights are read once for the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..tree.token_tree import TokenTree
from .causal_lm import LMSession


def _layer_kv(session: LMSession, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    layer = session.cache.layers[index]
    keys = getattr(layer, "keys", None)
    if keys is None or not getattr(layer, "is_initialized", False) or keys.numel() == 0:
        return None
    return layer.keys, layer.values


@torch.inference_mode()
def score_trees(sessions: list[LMSession], trees: list[TokenTree]) -> list[torch.Tensor]:
    """fp32 logits [len(tree) + 1, V] per session, from one forward over all of them. The
    sessions must be distinct and share one model; each is left as `score_tree` leaves it."""
    if len(sessions) != len(trees):
        raise ValueError("one tree per session")
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("a session may appear only once in a batch")
    if len(sessions) == 1:
        return [sessions[0].score_tree(trees[0])]
    lm = sessions[0].lm
    if any(s.lm is not lm for s in sessions):
        raise ValueError("all sessions of a batch must run on the same model")

    inputs = [s.tree_inputs(t) for s, t in zip(sessions, trees)]  # prefills what is missing
    prefixes = [s.cache.get_seq_length() for s in sessions]
    batch, past = len(sessions), max(prefixes)
    fed = max(len(feed) for feed, _, _ in inputs)

    ids = torch.zeros(batch, fed, dtype=torch.long)
    positions = torch.zeros(batch, fed, dtype=torch.long)
    visible = torch.zeros(batch, fed, past + fed, dtype=torch.bool)
    for b, ((feed, pos, vis), prefix) in enumerate(zip(inputs, prefixes)):
        n = len(feed)
        ids[b, :n] = torch.tensor(feed)
        positions[b, :n] = torch.tensor(pos)
        visible[b, :n, :prefix] = vis[:, :prefix]
        visible[b, :n, past : past + n] = vis[:, prefix:]
        pad_rows = torch.arange(n, fed)
        visible[b, pad_rows, past + pad_rows] = True  # pad rows see themselves only
    mask = torch.zeros(visible.shape, dtype=lm.dtype)
    mask.masked_fill_(~visible, torch.finfo(lm.dtype).min)

    cache = DynamicCache(config=lm.model.config)
    if past:
        for index, layer in enumerate(cache.layers):
            kvs = [_layer_kv(s, index) for s in sessions]
            like = next(kv for kv in kvs if kv is not None)[0]
            empty = like.new_zeros(*like.shape[:-2], 0, like.shape[-1])
            keys = [F.pad(kv[0] if kv else empty, (0, 0, 0, past - p)) for kv, p in zip(kvs, prefixes)]
            values = [F.pad(kv[1] if kv else empty, (0, 0, 0, past - p)) for kv, p in zip(kvs, prefixes)]
            layer.lazy_initialization(like, like)
            layer.keys, layer.values = torch.cat(keys), torch.cat(values)

    device = lm.device
    logits, _ = lm.forward(ids.to(device), positions.to(device), mask[:, None].to(device), cache)
    logits = logits.float().cpu()

    results = []
    for b, (session, tree, (feed, _, _), prefix) in enumerate(zip(sessions, trees, inputs, prefixes)):
        n = len(feed)
        for index, layer in enumerate(cache.layers):
            own = session.cache.layers[index]
            if not getattr(own, "is_initialized", False):
                own.lazy_initialization(layer.keys, layer.values)
            own.keys = torch.cat([layer.keys[b : b + 1, :, :prefix], layer.keys[b : b + 1, :, past : past + n]], dim=-2)
            own.values = torch.cat(
                [layer.values[b : b + 1, :, :prefix], layer.values[b : b + 1, :, past : past + n]], dim=-2
            )
        session.mark_scored(tree)
        session.forwards += 1
        results.append(logits[b, :n])
    return results
