"""Tree shapes, masks and KV keep-index (ALGORITHMS.md 3.6.5, 3.7)."""

import pytest
import torch

from specserve.tree import (
    ROOT,
    SlicedTreeMask,
    TokenTree,
    additive_mask,
    fork_shape,
    kconfig_node_index,
    kconfig_shape,
    keep_index,
    tree_position_ids,
    verifier_tree_mask,
)


def test_kconfig_422_has_28_nodes_in_bfs_order_with_the_index_formula():
    config = (4, 2, 2)
    shape = kconfig_shape(config)
    assert len(shape) == 28
    assert shape.depths == (1,) * 4 + (2,) * 8 + (3,) * 16
    assert all(shape.depths[i] <= shape.depths[i + 1] for i in range(27))
    # node index = level offset + parent index * k_next + child offset
    for level in (1, 2):
        prev_offset = [0, 4, 12][level - 1]
        for p in range([4, 8][level - 1]):
            for c in range(config[level]):
                idx = kconfig_node_index(config, level, p, c)
                assert shape.parents[idx] == prev_offset + p
    assert [kconfig_node_index(config, 0, 0, c) for c in range(4)] == [0, 1, 2, 3]


def test_kconfig_mask_rows_have_depth_plus_one_ones_and_match_token_tree():
    shape = kconfig_shape((4, 2, 2))
    mask = shape.ancestor_mask
    assert mask.sum(1).tolist() == [d for d in shape.depths]  # ancestors + self = depth entries
    tree = TokenTree()
    for parent in shape.parents:
        tree.add_node(parent, 0)
    assert torch.equal(tree.ancestor_mask(), mask)
    assert bool(torch.equal(mask, mask.tril()))


def test_depth_plus_one_ones_with_the_pending_token_in_the_verifier_mask():
    shape = kconfig_shape((4, 2, 2))
    full = verifier_tree_mask(shape.ancestor_mask, past_len=0)
    tree_block = full[1:, :]  # pending column + node columns
    assert tree_block.sum(1).tolist() == [d + 1 for d in shape.depths]


def test_sliced_mask_is_the_mask_of_the_truncated_shape():
    big = fork_shape(width=3, depth=5)
    sliced = SlicedTreeMask(big)
    for depth in range(1, 6):
        small = fork_shape(width=3, depth=depth)
        assert torch.equal(sliced.slice(depth), small.ancestor_mask)
    kc = SlicedTreeMask(kconfig_shape((2, 3, 2)))
    assert torch.equal(kc.slice(2), kconfig_shape((2, 3)).ancestor_mask)
    assert sliced.slice(0).shape == (0, 0)


def test_verifier_mask_positions_and_additive_form():
    tree = TokenTree()
    a = tree.add_node(ROOT, 5)
    tree.add_node(ROOT, 6)
    tree.add_node(a, 7)
    mask = verifier_tree_mask(tree.ancestor_mask(), past_len=2)
    assert mask.tolist() == [
        [True, True, True, False, False, False],
        [True, True, True, True, False, False],
        [True, True, True, False, True, False],
        [True, True, True, True, False, True],
    ]
    add = additive_mask(mask)
    assert add.shape == (1, 1, 4, 6)
    assert add[0, 0][mask].abs().sum() == 0
    assert bool((add[0, 0][~mask] == torch.finfo(torch.float32).min).all())
    assert tree_position_ids(2, tree.depths).tolist() == [2, 3, 3, 4]


def test_keep_index_keeps_past_pending_and_the_accepted_path():
    assert keep_index(3, [0, 2]).tolist() == [0, 1, 2, 3, 4, 6]
    assert keep_index(0, []).tolist() == [0]


def test_keep_index_gathers_the_same_rows_a_chain_would_have():
    """Rows written for a tree, gathered by keep_index, equal the rows a plain chain over the
    accepted path writes (a stand-in KV: each row = position id and token of that row)."""
    shape = kconfig_shape((2, 2))
    tokens = [10, 11, 12, 13, 14, 15]
    past = [[0, 1], [1, 2]]
    pos = tree_position_ids(2, shape.depths)
    rows = past + [[int(pos[0]), 99]] + [[int(pos[1 + i]), tokens[i]] for i in range(6)]
    path = [1, 4]  # node 1 then its first child (node 4: offset 2 + 1 * 2 + 0)
    assert shape.parents[4] == 1
    kept = [rows[i] for i in keep_index(2, path).tolist()]
    assert kept == past + [[2, 99], [3, 11], [4, 14]]


def test_bad_configs_are_refused():
    with pytest.raises(ValueError):
        kconfig_shape(())
    with pytest.raises(ValueError):
        kconfig_shape((2, 0))
