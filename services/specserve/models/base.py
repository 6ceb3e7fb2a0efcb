"""What the engine needs from a verifier and from a drafter (structural protocols).

Cache convention shared by every backend: a session's KV cache holds every committed token
except the last one, which stays *pending*. A verification pass feeds
`[pending] + tree.tokens` in one forward, so output row 0 is the law after the committed
text and row 1 + i the law after tree node i. `commit` keeps only the accepted path
and the new pending token is the correction/bonus token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..sampling.params import SamplingParams
from ..tree.token_tree import TokenTree


@runtime_checkable
class VerifierSession(Protocol):
    committed: list[int]

    def score_tree(self, tree: TokenTree) -> torch.Tensor:
        """Raw logits [len(tree) + 1, V] (fp32) from ONE forward pass over the tree."""
        ...

    def commit(self, path: list[int], tree: TokenTree, next_token: int) -> None:
        """Keep the cache rows of `path` (node ids, root to leaf); append path tokens + next_token."""
        ...


@dataclass
class DraftProposal:
    tokens: list[int]
    probs: torch.Tensor | None  # [len(tokens), V] processed law each token was drawn from; None = deterministic
    drafter: str = ""
    # last hidden state per drafted token (for the MCSD early-stop decision model); optional
    hidden: torch.Tensor | None = None
    # greedy chains only: the drafter's runner-up token at each position (propose's alternatives)
    alternatives: list[int] | None = None


@dataclass
class AheadUnit:
    """One outcome of a verification, drafted for before it is known (enumerate-and-select): if
    the verifier's accepted path ends at `accepted` (an end of the draft: 0 = nothing accepted,
    1 + i = at node i; for a chain, the first `accepted` tokens) and its correction/bonus token is
    `bonus`, `proposal` is the next round's draft, drawn from the right context."""

    accepted: int
    bonus: int
    proposal: DraftProposal


@runtime_checkable
class Drafter(Protocol):
    name: str

    def propose(
        self,
        context: list[int],
        num_tokens: int,
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> DraftProposal:
        """Up to `num_tokens` continuation tokens for `context` (all committed token ids)."""
        ...
