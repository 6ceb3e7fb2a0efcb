"""n-gram drafters: Max-Gram (CS Drafting, ALGORITHMS.md 4.7) and prompt lookup."""

from __future__ import annotations

import numpy as np
import pytest

from specserve.models.base import Drafter
from specserve.models.ngram import (
    MaxGramDrafter,
    PromptLookupDrafter,
    bigram_table,
    longest_suffix_match,
)


class WordTokenizer:
    """One id per whitespace-separated word (enough to test tokenizer-driven table building)."""

    def __init__(self, words: str) -> None:
        self.vocab = {w: i for i, w in enumerate(dict.fromkeys(words.split()))}
        self.words = {i: w for w, i in self.vocab.items()}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocab[w] for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


TOK = WordTokenizer("a b c d e f g h x y z p q r s t")


def ids(text: str) -> list[int]:
    return TOK.encode(text)


def test_both_satisfy_the_drafter_protocol():
    assert isinstance(MaxGramDrafter(), Drafter)
    assert isinstance(PromptLookupDrafter(), Drafter)


def test_mag_copies_after_the_longest_earlier_suffix_match():
    prompt = ids("a b c d e f")
    context = prompt + ids("g h x c d")
    proposal = MaxGramDrafter().propose(context, 2, prompt_len=len(prompt))
    assert TOK.decode(proposal.tokens) == "e f"
    assert proposal.probs is None and proposal.drafter == "mag"
    longer = MaxGramDrafter().propose(context, 4, prompt_len=len(prompt))
    assert TOK.decode(longer.tokens).startswith("e f")


def test_mag_prefers_the_longest_match_then_the_earliest():
    # "c d" occurs twice; only the second is preceded by "b" like the suffix "b c d"
    context = ids("c d x a b c d y p q b c d")
    end, length = longest_suffix_match(np.asarray(context))
    assert (end, length) == (6, 3)
    assert TOK.decode(MaxGramDrafter().propose(context, 1).tokens) == "y"
    # equal lengths: the earliest occurrence wins
    context = ids("q d x q d y q d")
    assert TOK.decode(MaxGramDrafter().propose(context, 1).tokens) == "x"


def test_mag_falls_back_to_bigram_iteration_when_nothing_matches():
    mag = MaxGramDrafter.from_texts(TOK, ["z p q r", "p q s", "p q r t r"])
    # bigram: z->p, p->q, q->r (2 of 3, beating q->s), r->t
    assert mag.bigram[ids("p")[0]] == ids("q")[0]
    assert mag.bigram[ids("q")[0]] == ids("r")[0]
    context = ids("a b c z")  # "z" never occurred earlier
    proposal = mag.propose(context, 3)
    assert TOK.decode(proposal.tokens) == "p q r"


def test_mag_extends_a_short_copy_then_uses_the_bigram():
    bigram = {ids("y")[0]: ids("z")[0], ids("z")[0]: ids("a")[0]}
    mag = MaxGramDrafter(bigram)
    prompt = ids("a b")
    context = prompt + ids("x y")  # "x y" has no earlier occurrence; "y" does not either
    assert TOK.decode(mag.propose(context, 2, prompt_len=2).tokens) == "z a"
    # copy runs into the end of the text: "h" occurs once earlier, followed by only "g h"
    context = ids("g h g h")
    out = mag.propose(context, 5).tokens
    assert TOK.decode(out[:2]) == "g h"
    assert len(out) == 5


def test_mag_returns_nothing_without_matches_or_table():
    assert MaxGramDrafter().propose(ids("a b c"), 4).tokens == []
    assert MaxGramDrafter().propose([], 4).tokens == []


def test_bigram_table_ties_go_to_the_smaller_id():
    assert bigram_table([[5, 9, 5, 2]]) == {5: 2, 9: 5}


def test_prompt_lookup_prefers_longer_ngrams_and_first_match():
    plk = PromptLookupDrafter(min_ngram=1, max_ngram=3)
    context = ids("a b c d a x c d e b c d")
    # trigram "b c d" occurs at the start -> continuation "a x c"
    assert TOK.decode(plk.propose(context, 3).tokens) == "a x c"
    # with max_ngram=1 the first "d" continuation wins
    assert TOK.decode(PromptLookupDrafter(1, 1).propose(context, 2).tokens) == "a x"
    # continuation is cut at the end of the text
    assert TOK.decode(plk.propose(ids("p q r p q"), 5).tokens) == "r p q"
    # the suffix alone (no earlier occurrence) proposes nothing
    assert plk.propose(ids("a b c"), 3).tokens == []
    with pytest.raises(ValueError):
        PromptLookupDrafter(3, 2)
