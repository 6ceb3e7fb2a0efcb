"""Cascade Speculative Drafting (Chen et al., NeurIPS 2024; ALGORITHMS.md section 4), greedy review.

Drafters D_1 (largest) .. D_n (the statistical bottom, Max-Gram: costs ~0) form levels below
the verifier (level 0). A neural drafter never generates token by token:

* vertical cascade: D_i's draft is what D_i *accepts* when it reviews (one forward) a draft
  built by the levels below it, down to the bottom model, plus its own correction/bonus token;
* horizontal cascade: row r of K says how many positions each smaller drafter fills for the
  reviewer at level r, larger drafters first (early positions are worth most).

K uses the released code's INCREMENT convention: K[r][c] = tokens drafter D_{c+1} adds for the
reviewer at level r (r = 0 is the verifier); the paper writes rows cumulatively, convert with
`increments_from_cumulative`. Upper-triangular; the bottom has no row (it always proposes
`bottom_tokens`). Lenience l >= 1 relaxes intermediate reviews only: the top review is the
verifier's own exact verification in the decode loop, so the output is the verifier's greedy
output for any K and l.

`CascadeDrafter` is a models Drafter, so the loop uses it like any other (LocalDrafter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..models.base import DraftProposal, Drafter
from ..models.causal_lm import CausalLM
from ..sampling.params import SamplingParams
from ..tree.token_tree import TokenTree

GREEDY = SamplingParams()


class Reviewer(Protocol):
    name: str

    def review_logits(self, context: list[int], draft: list[int]) -> torch.Tensor:
        """fp32 logits [len(draft) + 1, V] from ONE forward: row j = law after context + draft[:j]."""
        ...


class LMReviewer:
    """A CausalLM as a reviewer, with one KV-cached session: each review is one tree forward over
    the new draft, and the accepted part is committed so the next review starts from it."""

    def __init__(self, lm: CausalLM, name: str | None = None) -> None:
        self.lm = lm
        self.name = name or lm.name
        self.session = lm.new_session()

    def review_logits(self, context: list[int], draft: list[int]) -> torch.Tensor:
        self.session.sync(context)
        self._tree = TokenTree()
        self._tree.add_sequence(draft)
        return self.session.score_tree(self._tree)

    def keep(self, accepted: int, next_token: int) -> None:
        """Keep the first `accepted` draft rows in the cache (so they are not prefilled again)."""
        self.session.commit(list(range(accepted)), self._tree, next_token)


@dataclass
class Review:
    """One intermediate review, for statistics and tests."""

    level: int  # 1 = D_1
    context: list[int]
    draft: list[int]
    accepted: int  # leading draft tokens kept (lenient or exact)


@dataclass
class ReviewStats:
    reviews: list[int] = field(default_factory=list)  # per level 1..n-1: forwards run
    drafted: list[int] = field(default_factory=list)  # draft tokens reviewed
    accepted: list[int] = field(default_factory=list)  # draft tokens kept


def increments_from_cumulative(k_cumulative: Sequence[Sequence[int]]) -> list[list[int]]:
    """Paper convention (row entries = running totals) -> code convention (per-drafter counts)."""
    out = []
    for r, row in enumerate(k_cumulative):
        prev, inc = 0, []
        for c, total in enumerate(row):
            if c < r:
                inc.append(0)
                continue
            if total < prev:
                raise ValueError(f"cumulative K row {r} decreases at column {c}: {list(row)}")
            inc.append(total - prev)
            prev = total
        out.append(inc)
    return out


def default_k_matrix(num_drafters: int, draft_length: int, lower: int = 4) -> list[list[int]]:
    """Top row: D_1 fills all `draft_length` positions (the loop's dynamic length trims it);
    each lower reviewer gets `lower` tokens from the next smaller drafter."""
    k = [[0] * num_drafters for _ in range(num_drafters)]
    for r in range(num_drafters):
        k[r][r] = draft_length if r == 0 else lower
    return k


def greedy_review(
    logits: torch.Tensor, draft: list[int], draft_probs: list[float], lenience: float
) -> tuple[list[int], list[float], int]:
    """CS Drafting's review of `draft` by a model with these logits ([len(draft) + 1, V]).

    Accept draft_j if it is the reviewer's argmax, or (lenience > 1) if the reviewer gives it more
    than draft_probs[j] / lenience. Stop at the first refusal with the reviewer's argmax; after a
    full acceptance append its bonus argmax. Returns (tokens, reviewer prob of each, accepted)."""
    probs = torch.softmax(logits.float(), dim=-1)
    best = logits.argmax(-1).tolist()
    tokens: list[int] = []
    token_probs: list[float] = []
    for j, x in enumerate(draft):
        if x == best[j] or (lenience > 1 and float(probs[j, x]) > draft_probs[j] / lenience):
            tokens.append(x)
            token_probs.append(float(probs[j, x]))
            continue
        tokens.append(best[j])
        token_probs.append(float(probs[j, best[j]]))
        return tokens, token_probs, j
    tokens.append(best[len(draft)])
    token_probs.append(float(probs[len(draft), best[len(draft)]]))
    return tokens, token_probs, len(draft)


class CascadeDrafter:
    """CS Drafting as a drafter: `propose` returns the level-0 draft (a deterministic chain)."""

    def __init__(
        self,
        reviewers: Sequence[Reviewer],
        bottom: Drafter,
        k_matrix: Sequence[Sequence[int]],
        lenience: float = 1.0,
        bottom_tokens: int = 10,
        name: str = "cascade",
        keep_log: bool = False,
    ) -> None:
        n = len(reviewers) + 1  # drafters D_1..D_n, the bottom last
        if len(k_matrix) != n or any(len(row) != n for row in k_matrix):
            raise ValueError(f"k_matrix must be {n}x{n} (one row per reviewer level incl. the verifier)")
        for r, row in enumerate(k_matrix):
            if any(v < 0 for v in row) or any(row[c] for c in range(r)):
                raise ValueError(f"k_matrix must be non-negative and upper-triangular; row {r} = {list(row)}")
        if lenience < 1:
            raise ValueError(f"lenience must be >= 1, got {lenience}")
        self.reviewers = list(reviewers)
        self.bottom = bottom
        self.k = [list(row) for row in k_matrix]
        self.lenience = float(lenience)
        self.bottom_tokens = bottom_tokens
        self.name = name
        self.stats = ReviewStats([0] * (n - 1), [0] * (n - 1), [0] * (n - 1))
        self.log: list[Review] | None = [] if keep_log else None

    @property
    def num_drafters(self) -> int:
        return len(self.reviewers) + 1

    def propose(
        self,
        context: list[int],
        num_tokens: int,
        params: SamplingParams = GREEDY,
        generator: torch.Generator | None = None,
    ) -> DraftProposal:
        """Greedy cascade draft (probs None = deterministic proposal). The loop's verifier review
        is exact, so sampled requests stay lossless: a deterministic draft is a one-hot law."""
        if num_tokens <= 0:
            return DraftProposal([], None, self.name)
        tokens, _ = self._fill(0, list(context), limit=num_tokens)
        return DraftProposal(tokens[:num_tokens], None, self.name)

    # ---- the recursion -------------------------------------------------------------------
    def _fill(self, level: int, prefix: list[int], limit: int | None = None) -> tuple[list[int], list[float]]:
        """The draft the reviewer at `level` will review: horizontal blocks from its drafters."""
        draft: list[int] = []
        probs: list[float] = []
        target = 0
        for c in range(level, self.num_drafters):
            target += self.k[level][c]
            if limit is not None:
                target = min(target, limit)
            while len(draft) < target:
                new, new_probs = self._step(c + 1, prefix + draft)
                if not new:
                    break  # this drafter has nothing to offer: let the next one try
                draft += new
                probs += new_probs
        return draft, probs

    def _step(self, drafter_level: int, prefix: list[int]) -> tuple[list[int], list[float]]:
        """What drafter D_{drafter_level} contributes after `prefix`."""
        if drafter_level == self.num_drafters:  # the statistical bottom proposes, never reviews
            proposal = self.bottom.propose(prefix, self.bottom_tokens, GREEDY, None)
            return list(proposal.tokens), [1.0] * len(proposal.tokens)  # one-hot draft law
        reviewer = self.reviewers[drafter_level - 1]
        sub_draft, sub_probs = self._fill(drafter_level, prefix)
        logits = reviewer.review_logits(prefix, sub_draft)
        tokens, token_probs, accepted = greedy_review(logits, sub_draft, sub_probs, self.lenience)
        keep = getattr(reviewer, "keep", None)
        if keep is not None:
            keep(accepted, tokens[-1])
        i = drafter_level - 1
        self.stats.reviews[i] += 1
        self.stats.drafted[i] += len(sub_draft)
        self.stats.accepted[i] += accepted
        if self.log is not None:
            self.log.append(Review(drafter_level, list(prefix), list(sub_draft), accepted))
        return tokens, token_probs
