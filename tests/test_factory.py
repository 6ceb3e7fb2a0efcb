"""Drafter specs -> drafters: Max-Gram with a bigram fallback table built from a corpus file."""

from __future__ import annotations

import pytest

from specserve.engine.factory import make_cascade, make_drafter, make_local_drafters
from specserve.models.causal_lm import CausalLM
from specserve.models.ngram import MaxGramDrafter
from specserve.sampling.params import SamplingParams

from test_engine import tiny_lm


class WordTokenizer:
    """Whitespace tokenizer over a fixed vocabulary (the factory only needs `encode`)."""

    def __init__(self, words):
        self.ids = {w: i for i, w in enumerate(words)}

    def encode(self, text, add_special_tokens=False):
        return [self.ids[w] for w in text.split()]


@pytest.fixture
def verifier_with_tokenizer():
    lm = tiny_lm(0)
    return CausalLM(lm.model, WordTokenizer(["the", "cat", "sat", "on", "mat", "dog"]), name="tiny")


def test_ngram_corpus_builds_the_bigram_fallback(tmp_path, verifier_with_tokenizer):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n\nthe cat sat\n", encoding="utf-8")
    drafter = make_drafter(f"ngram:{corpus}", verifier_with_tokenizer)
    assert isinstance(drafter, MaxGramDrafter)
    # the -> cat (twice) beats the -> mat (once); cat -> sat; sat -> on
    assert drafter.bigram[0] == 1 and drafter.bigram[1] == 2 and drafter.bigram[2] == 3
    # a context with no earlier match is completed from the table: dog? no entry; the -> cat -> sat
    proposal = drafter.propose([5, 0], 3, SamplingParams())
    assert proposal.tokens == [1, 2, 3]
    assert make_drafter("ngram", verifier_with_tokenizer).bigram == {}
    (local,) = make_local_drafters([f"ngram:{corpus}"], verifier_with_tokenizer)
    assert local.name == "ngram"
    cascade = make_cascade(["ngram:" + str(corpus)], verifier_with_tokenizer, draft_length=3)
    assert cascade.name == "cascade(ngram)" and cascade.bottom.bigram == drafter.bigram


def test_missing_corpus_is_refused_naming_the_file(tmp_path, verifier_with_tokenizer):
    with pytest.raises(ValueError, match="nothing.txt"):
        make_drafter(f"ngram:{tmp_path / 'nothing.txt'}", verifier_with_tokenizer)
