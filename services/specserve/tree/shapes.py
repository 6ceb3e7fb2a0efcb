"""Static tree shapes: MCSD k-config trees, DynaSD fork trees, and the sliced mask.

A shape is only topology (parents, depths) in BFS order: every node of depth j comes before
every node of depth j + 1, and inside a level children follow their parents' order. So the
node index of child c of the p-th node of level j is
    level_offset[j + 1] + p * k[j + 1] + c
(ALGORITHMS.md 3.6.5) and the nodes of depth <= D are a prefix of the index range, which is
what makes the dynamic sliced mask a plain top-left slice.

Note: a TokenTree merges identical sibling tokens (TokenTree.propose), so a k-config tree
drafted with replacement can have fewer nodes than its shape; the shape is the layout a
drafter fills before merging.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .token_tree import ROOT


@dataclass(frozen=True)
class TreeShape:
    parents: tuple[int, ...]
    depths: tuple[int, ...]  # 1 for first-level nodes

    def __len__(self) -> int:
        return len(self.parents)

    @property
    def max_depth(self) -> int:
        return max(self.depths, default=0)

    def nodes_up_to_depth(self, depth: int) -> int:
        """How many nodes have depth <= `depth` (a prefix of the BFS order)."""
        return sum(1 for x in self.depths if x <= depth)

    @cached_property
    def ancestor_mask(self) -> torch.Tensor:
        """bool [n, n]: row i is True at i and at every ancestor of i. Built level by level."""
        n = len(self)
        mask = torch.eye(n, dtype=torch.bool)
        parents = torch.tensor(self.parents, dtype=torch.long)
        depths = torch.tensor(self.depths, dtype=torch.long)
        for depth in range(2, self.max_depth + 1):
            level = torch.nonzero(depths == depth).flatten()
            mask[level] |= mask[parents[level]]
        return mask


def kconfig_shape(config: tuple[int, ...] | list[int]) -> TreeShape:
    """MCSD k-config tree: every node of depth j has config[j] children. (4, 2, 2) -> 28 nodes."""
    if not config or any(k < 1 for k in config):
        raise ValueError(f"k-config needs positive entries, got {config!r}")
    parents: list[int] = []
    depths: list[int] = []
    prev_offset, prev_count = None, 1
    for depth, k in enumerate(config, start=1):
        for p in range(prev_count):
            parent = ROOT if prev_offset is None else prev_offset + p
            parents.extend([parent] * k)
            depths.extend([depth] * k)
        prev_offset = len(parents) - prev_count * k
        prev_count *= k
    return TreeShape(tuple(parents), tuple(depths))


def kconfig_node_index(config: tuple[int, ...] | list[int], level: int, parent_pos: int, child: int) -> int:
    """Index of child `child` of the `parent_pos`-th node of level `level` - 1 (level >= 1 is
    the child's 0-based level; level 0 children hang off ROOT with parent_pos 0)."""
    offset, count = 0, 1
    for j in range(level):
        count *= config[j]
        offset += count
    return offset + parent_pos * config[level] + child


def fork_shape(width: int, depth: int) -> TreeShape:
    """DynaSD fork [w, 1, 1, ...]: w roots, each extended by one chain of depth - 1 nodes."""
    return kconfig_shape((width,) + (1,) * (depth - 1))


class SlicedTreeMask:
    """Build the tree mask once for the largest shape; each round take the top-left slice for
    the depth actually drafted (DynaSD's dynamic sliced topology-aware mask)."""

    def __init__(self, shape: TreeShape):
        self.shape = shape
        self.full = shape.ancestor_mask

    def slice(self, depth: int) -> torch.Tensor:
        n = self.shape.nodes_up_to_depth(depth)
        return self.full[:n, :n]
