"""Token trees: the candidates of one round, merged, with what verification needs.

Node order is topological (a parent's index is always below its children's), so the
ancestor mask is lower-triangular and a node's row in a verifier pass is `1 + index`
(row 0 is the pending last committed token; see models/).

Each branching point keeps its *proposals* in sampling order. A proposal is "this child
was drawn from this draft law". Two drafters proposing the same token give two proposals
pointing at one merged child node: the shared prefix is scored once, but multi-draft
verification still walks every proposal, which keeps RRS lossless (de-duplicating the
proposals themselves would change the law, ALGORITHMS.md 2.7.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

ROOT = -1  # the parent of first-level nodes: the committed prefix

# How the siblings under one parent were sampled; verification must match it.
Coupling = Literal["independent", "without_replacement", "hub"]


@dataclass
class Proposal:
    child: int  # node index
    draft_probs: torch.Tensor | None  # [V] fp32 law the token was drawn from; None = deterministic (one-hot)
    drafter: str = ""


@dataclass
class TokenTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)  # 1 for first-level nodes
    proposals: dict[int, list[Proposal]] = field(default_factory=dict)
    coupling: dict[int, Coupling] = field(default_factory=dict)
    hub_token: dict[int, int] = field(default_factory=dict)  # parent -> SpecHub hub token a

    def __len__(self) -> int:
        return len(self.tokens)

    # ---- building -------------------------------------------------------------
    def child_with_token(self, parent: int, token: int) -> int | None:
        for p in self.proposals.get(parent, []):
            if self.tokens[p.child] == token:
                return p.child
        return None

    def add_node(self, parent: int, token: int) -> int:
        """A new node (no proposal recorded); use `propose` to add a candidate."""
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.depths.append(1 if parent == ROOT else self.depths[parent] + 1)
        return len(self.tokens) - 1

    def propose(
        self, parent: int, token: int, draft_probs: torch.Tensor | None, drafter: str = ""
    ) -> int:
        """Record one sampled proposal under `parent`, merging with an existing child."""
        child = self.child_with_token(parent, token)
        if child is None:
            child = self.add_node(parent, token)
        self.proposals.setdefault(parent, []).append(Proposal(child, draft_probs, drafter))
        return child

    def add_sequence(
        self,
        tokens: list[int],
        draft_probs: torch.Tensor | None = None,
        drafter: str = "",
        parent: int = ROOT,
    ) -> list[int]:
        """Merge one candidate chain (row i of draft_probs = law of tokens[i]); returns node ids."""
        nodes = []
        for i, tok in enumerate(tokens):
            row = None if draft_probs is None else draft_probs[i]
            parent = self.propose(parent, int(tok), row, drafter)
            nodes.append(parent)
        return nodes

    # ---- reading -------------------------------------------------------------
    def children(self, parent: int) -> list[int]:
        seen: list[int] = []
        for p in self.proposals.get(parent, []):
            if p.child not in seen:
                seen.append(p.child)
        return seen

    def path_to(self, node: int) -> list[int]:
        path = []
        while node != ROOT:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def is_chain(self) -> bool:
        return all(len(self.children(p)) <= 1 for p in [ROOT, *range(len(self))])

    @property
    def max_depth(self) -> int:
        return max(self.depths, default=0)

    def ancestor_mask(self) -> torch.Tensor:
        """bool [n, n]: node i may attend to node j iff j is i or an ancestor of i."""
        n = len(self)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j != ROOT:
                mask[i, j] = True
                j = self.parents[j]
        return mask
