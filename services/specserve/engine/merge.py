"""Merge the candidate trees of several drafters into the one tree the verifier scores.

Shared prefixes become one node (scored once); every proposal is kept, in arrival order,
so multi-draft verification still walks each sampled candidate (tree/token_tree.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..tree.token_tree import ROOT, TokenTree


def merge_trees(trees: Iterable[TokenTree], max_depth: int | None = None) -> TokenTree:
    """One tree holding every proposal of `trees` (nodes deeper than `max_depth` are dropped)."""
    merged = TokenTree()
    for tree in trees:
        node_map = {ROOT: ROOT}  # node id in `tree` -> node id in `merged`
        # topological order: a parent is always mapped before its children
        for parent in [ROOT, *range(len(tree))]:
            if parent not in node_map:
                continue  # below a dropped (too deep) node
            new_parent = node_map[parent]
            if parent in tree.coupling:
                merged.coupling.setdefault(new_parent, tree.coupling[parent])
            if parent in tree.hub_token:
                merged.hub_token.setdefault(new_parent, tree.hub_token[parent])
            for proposal in tree.proposals.get(parent, []):
                if max_depth is not None and tree.depths[proposal.child] > max_depth:
                    continue
                node_map[proposal.child] = merged.propose(
                    new_parent, tree.tokens[proposal.child], proposal.draft_probs, proposal.drafter
                )
    return merged


def drafted_by_drafter(tree: TokenTree) -> dict[str, int]:
    """Number of proposals each drafter put in the tree."""
    counts: dict[str, int] = {}
    for proposals in tree.proposals.values():
        for p in proposals:
            counts[p.drafter] = counts.get(p.drafter, 0) + 1
    return counts


def accepted_by_drafter(tree: TokenTree, path: list[int]) -> dict[str, int]:
    """Accepted nodes credited to every drafter that proposed them (shared nodes credit each)."""
    counts: dict[str, int] = {}
    parent = ROOT
    for node in path:
        credited = {p.drafter for p in tree.proposals.get(parent, []) if p.child == node}
        for name in credited:
            counts[name] = counts.get(name, 0) + 1
        parent = node
    return counts


def subtree_after(tree: TokenTree, first_token: int) -> TokenTree | None:
    """The part of `tree` below its first-level node `first_token`, re-rooted (its children become
    first-level nodes), with every proposal, row and coupling kept; None when no first-level node
    has that token. Used to reuse a draft made one token ahead (overlapped drafting)."""
    top = tree.child_with_token(ROOT, first_token)
    if top is None:
        return None
    out = TokenTree()
    node_map = {top: ROOT}
    for parent in range(top, len(tree)):  # topological order: descendants come after `top`
        if parent not in node_map:
            continue
        new_parent = node_map[parent]
        if parent in tree.coupling:
            out.coupling[new_parent] = tree.coupling[parent]
        if parent in tree.hub_token:
            out.hub_token[new_parent] = tree.hub_token[parent]
        for proposal in tree.proposals.get(parent, []):
            node_map[proposal.child] = out.propose(
                new_parent, tree.tokens[proposal.child], proposal.draft_probs, proposal.drafter
            )
    return out
