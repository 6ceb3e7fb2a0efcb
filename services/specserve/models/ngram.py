"""Statistical drafters: no neural network, no cost, deterministic proposals (probs = None).

* MaxGramDrafter: CS Drafting's bottom model (ALGORITHMS.md 4.1). Copy what followed the longest
  earlier occurrence of the text's suffix (earliest occurrence wins), search again inside the
  generated text when that runs short, and fill what is left from a greedy bigram table.
* PromptLookupDrafter: prompt lookup decoding as in transformers' `prompt_lookup_num_tokens`: for
  n = max..min, the first earlier occurrence of the last n tokens whose continuation is non-empty.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from ..sampling.params import SamplingParams
from .base import DraftProposal


def longest_suffix_match(seq: np.ndarray, start: int = 0, max_ngram: int = 64) -> tuple[int, int]:
    """The earlier occurrence of the longest suffix of `seq` (length <= max_ngram).

    Occurrences must lie in seq[start:-1] (they end before the last token, so the suffix does
    not match itself). Returns (end index of the occurrence, match length); (-1, 0) if none.
    Ties in length go to the earliest occurrence.
    """
    last = len(seq) - 1
    if last < 1:
        return -1, 0
    candidates = np.flatnonzero(seq[start:last] == seq[last]) + start
    best_end, best_len = -1, 0
    for end in candidates:
        length = 1
        while (
            length < max_ngram
            and end - length >= start
            and seq[end - length] == seq[last - length]
        ):
            length += 1
        if length > best_len:  # strict: the earliest of equally long matches is kept
            best_end, best_len = int(end), length
    return best_end, best_len


def bigram_table(sequences: Iterable[Iterable[int]]) -> dict[int, int]:
    """Greedy bigram table B[v] = most frequent token after v (ties: the smaller id)."""
    counts: dict[int, Counter] = defaultdict(Counter)
    for seq in sequences:
        seq = list(seq)
        for a, b in zip(seq, seq[1:]):
            counts[int(a)][int(b)] += 1
    return {a: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for a, c in counts.items()}


class MaxGramDrafter:
    """Max-Gram (MaG) per CS Drafting. `context` is prompt + generated text; `prompt_len` (per call,
    argument) says where the generated text starts (unknown: the whole text counts as generated)."""

    model_free = True  # runs no torch kernels (engine/local.py runs it off the compute thread)

    def __init__(
        self,
        bigram: Mapping[int, int] | None = None,
        name: str = "mag",
        max_ngram: int = 64,
    ) -> None:
        self.bigram = dict(bigram or {})
        self.name = name
        self.max_ngram = max_ngram

    @classmethod
    def from_texts(cls, tokenizer, texts: Iterable[str], **kwargs) -> "MaxGramDrafter":
        """Build the bigram fallback from text (e.g. a prompt corpus) with the model's tokenizer."""
        ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        return cls(bigram_table(ids), **kwargs)

    def propose(
        self,
        context: list[int],
        num_tokens: int,
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
        session_id: str = "",
        prompt_len: int | None = None,
    ) -> DraftProposal:
        out: list[int] = []
        if num_tokens > 0 and context:
            seq = np.asarray(context, dtype=np.int64)
            # 1. longest earlier suffix match in prompt + sequence
            out += self._copy_after_match(seq, 0, num_tokens)
            # 2. keep extending by matching inside the generated text (plus what we proposed);
            #    without a prompt_len the whole text counts as generated
            start = prompt_len if prompt_len is not None and prompt_len < len(context) else 0
            if out:
                while len(out) < num_tokens:
                    extended = np.asarray(list(context) + out, dtype=np.int64)
                    more = self._copy_after_match(extended, start, num_tokens - len(out))
                    if not more:
                        break
                    out += more
            # 3. greedy bigram iteration from the last token
            last = out[-1] if out else int(context[-1])
            while len(out) < num_tokens and last in self.bigram:
                last = self.bigram[last]
                out.append(last)
        return DraftProposal(tokens=out[:num_tokens], probs=None, drafter=self.name)

    def _copy_after_match(self, seq: np.ndarray, start: int, k: int) -> list[int]:
        end, length = longest_suffix_match(seq, start, self.max_ngram)
        if length == 0:
            return []
        return [int(t) for t in seq[end + 1 : end + 1 + k]]


class PromptLookupDrafter:
    """Prompt lookup decoding: n-gram sizes max_ngram down to min_ngram, first match wins."""

    model_free = True  # runs no torch kernels (engine/local.py runs it off the compute thread)

    def __init__(self, min_ngram: int = 1, max_ngram: int = 3, name: str = "prompt-lookup") -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.min_ngram, self.max_ngram, self.name = min_ngram, max_ngram, name

    def propose(
        self,
        context: list[int],
        num_tokens: int,
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
        session_id: str = "",
    ) -> DraftProposal:
        seq = np.asarray(context, dtype=np.int64)
        length = len(seq)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            if num_tokens <= 0:
                break
            windows = np.lib.stride_tricks.sliding_window_view(seq, n)
            hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
            for start in hits:
                begin = start + n
                if begin < length:  # the suffix itself has an empty continuation
                    tokens = [int(t) for t in seq[begin : begin + num_tokens]]
                    return DraftProposal(tokens=tokens, probs=None, drafter=self.name)
        return DraftProposal(tokens=[], probs=None, drafter=self.name)
