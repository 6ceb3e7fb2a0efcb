"""Token trees and their bookkeeping: the merged candidates of a round (TokenTree), static
shapes (MCSD k-config, DynaSD fork) with the sliced mask, the verifier's tree attention mask
and position ids, and the KV keep-index after acceptance."""

from .masks import additive_mask, keep_index, tree_position_ids, verifier_tree_mask
from .shapes import SlicedTreeMask, TreeShape, fork_shape, kconfig_node_index, kconfig_shape
from .token_tree import ROOT, Coupling, Proposal, TokenTree

__all__ = [
    "ROOT",
    "Coupling",
    "Proposal",
    "SlicedTreeMask",
    "TokenTree",
    "TreeShape",
    "additive_mask",
    "fork_shape",
    "kconfig_node_index",
    "kconfig_shape",
    "keep_index",
    "tree_position_ids",
    "verifier_tree_mask",
]
