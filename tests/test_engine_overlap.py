"""Overlapped drafting: the next round is drafted while the verifier checks this one, betting on
full acceptance. It may change timing only: greedy output stays plain greedy output, and a draft
made ahead carries the drafter's law at the context it is finally verified at."""

from __future__ import annotations

import pytest
import torch

from specserve.engine import GenerationRequest, SpeculativeEngine
from specserve.engine.local import LocalDrafter, LocalVerifier
from specserve.engine.merge import subtree_after
from specserve.models.drafters import LMDrafter
from specserve.models.ngram import MaxGramDrafter, PromptLookupDrafter
from specserve.sampling.params import SamplingParams, process_logits
from specserve.tree.token_tree import ROOT, TokenTree

from test_engine import PROMPT, plain, tiny_lm, twin_lm, verifier_lm  # noqa: F401 - fixtures


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("drafter_kind", ["twin", "ngram", "twin+ngram"])
def test_overlapped_greedy_equals_plain_greedy(verifier_lm, twin_lm, dynamic, drafter_kind):
    drafters = {
        "twin": lambda: [LMDrafter(twin_lm, name="twin")],
        "ngram": lambda: [PromptLookupDrafter(), MaxGramDrafter()],
        "twin+ngram": lambda: [LMDrafter(twin_lm, name="twin"), PromptLookupDrafter()],
    }[drafter_kind]()
    engine = SpeculativeEngine(LocalVerifier(verifier_lm), [LocalDrafter(d) for d in drafters],
                               dynamic_length=dynamic, overlap_drafting=True)
    tokens, stats = engine.run(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=40, rule="greedy",
                                                 draft_length=4))
    assert tokens == plain(verifier_lm, 40)
    if drafter_kind.startswith("twin") and not dynamic:
        assert stats.rounds_drafted_ahead > 0  # the twin is often fully accepted: drafts were reused


class RecordingVerifier(LocalVerifier):
    def __init__(self, lm):
        super().__init__(lm)
        self.calls = []

    def verify_sync(self, call):
        self.calls.append((list(call.committed), call.tree))
        return super().verify_sync(call)


def test_drafts_made_ahead_carry_the_law_of_their_real_context(verifier_lm, twin_lm):
    # a low temperature: the random tiny models' logits are nearly flat, so at T=1 the bet (full
    # acceptance AND the drafter guessing the bonus token) would rarely win
    sampling = SamplingParams(temperature=0.02)
    verifier = RecordingVerifier(verifier_lm)
    engine = SpeculativeEngine(verifier, [LocalDrafter(LMDrafter(twin_lm, name="twin"))],
                               dynamic_length=False, overlap_drafting=True)
    results = list(engine.generate(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=60, rule="sps",
                                                     sampling=sampling, draft_length=2, seed=11)))
    ahead_rounds = [i for i, r in enumerate(results) if r.drafted_ahead]
    assert ahead_rounds, "no round reused a draft made ahead"
    for i in ahead_rounds:
        committed, tree = verifier.calls[i]
        session = twin_lm.new_session()
        for node in range(len(tree)):  # a chain: node i's law is the twin's law after node i - 1
            context = committed + [tree.tokens[n] for n in tree.path_to(node)[:-1]]
            session.sync(context)
            expected = process_logits(session.next_logits(), sampling)
            (proposal,) = tree.proposals[tree.parents[node]]
            torch.testing.assert_close(proposal.draft_probs, expected, rtol=1e-4, atol=1e-6)


def test_subtree_after_reroots_below_the_matching_first_token():
    tree = TokenTree()
    row = torch.full((5,), 0.2)
    a = tree.propose(ROOT, 1, row, "x")
    b = tree.propose(a, 2, row, "x")
    tree.propose(b, 3, None, "x")
    tree.propose(a, 4, row, "y")
    tree.propose(ROOT, 4, row, "y")
    sub = subtree_after(tree, 1)
    assert sub.tokens == [2, 4, 3] and sub.parents == [ROOT, ROOT, 0] and sub.depths == [1, 1, 2]
    assert [p.drafter for p in sub.proposals[ROOT]] == ["x", "y"]
    assert subtree_after(tree, 9) is None
    assert len(subtree_after(tree, 4)) == 0
