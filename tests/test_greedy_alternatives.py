"""Runner-up siblings beside greedy LM chains ("width where rows are free", models/drafters.py
`alternatives`, engine/loop.py `greedy_alternatives`, cascade/draft_length.py `alternatives_pay`)."""

from __future__ import annotations

import copy

import pytest
import torch

from specserve.cascade.draft_length import DraftLengthPolicy, TieredLengthPolicy
from specserve.engine import GenerationRequest, SpeculativeEngine
from specserve.engine.local import LocalDrafter, LocalVerifier
from specserve.engine.workers import DraftCall, alternative_label, is_alternative_label
from specserve.models.causal_lm import CausalLM
from specserve.models.drafters import LMDrafter
from specserve.sampling.params import SamplingParams
from specserve.tree.token_tree import ROOT

from test_engine import PROMPT, plain, tiny_lm


@pytest.fixture(scope="module")
def verifier_lm():
    return tiny_lm(0)


@pytest.fixture(scope="module")
def noisy_twin(verifier_lm):
    """The verifier with clearly perturbed weights: its top token is often wrong, its runner-up often right."""
    model = copy.deepcopy(verifier_lm.model)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.005 * torch.randn_like(p))
    return CausalLM(model, tokenizer=None, name="noisy")


def test_greedy_chain_names_the_runner_up_of_each_position(noisy_twin):
    drafter = LMDrafter(noisy_twin)
    proposal = drafter.propose(PROMPT, 4, SamplingParams(), session_id="a", alternatives=4)
    assert len(proposal.alternatives) == len(proposal.tokens) == 4
    assert drafter.propose(PROMPT, 4, SamplingParams(), session_id="a", alternatives=2).alternatives == \
        proposal.alternatives[:2]  # the first positions only
    text = list(PROMPT)
    for token, runner_up in zip(proposal.tokens, proposal.alternatives):
        session = noisy_twin.new_session()
        session.sync(text)
        top2 = torch.topk(session.next_logits(), 2).indices.tolist()
        assert [token, runner_up] == top2
        text.append(token)
    assert drafter.propose(PROMPT, 4, SamplingParams(), session_id="b").alternatives is None  # not asked
    sampled = drafter.propose(PROMPT, 4, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0),
                              session_id="c", alternatives=4)
    assert sampled.alternatives is None  # greedy only: a sampled tree must follow its rule's coupling


def test_backend_puts_each_runner_up_beside_its_chain_token_as_a_labelled_leaf(noisy_twin):
    backend = LocalDrafter(LMDrafter(noisy_twin, name="noisy"))
    call = DraftCall(session_id="s", committed=list(PROMPT), num_tokens=3, sampling=SamplingParams(), seed=1,
                     alternatives=3)
    tree = backend.draft_sync(call).tree
    chain, node = [], ROOT
    for _ in range(3):
        kids = tree.children(node)
        assert len(kids) == 2  # the chain token and its runner-up
        by_label = {p.drafter: p.child for p in tree.proposals[node]}
        assert set(by_label) == {"noisy", alternative_label("noisy")}
        assert tree.children(by_label[alternative_label("noisy")]) == []  # a leaf
        node = by_label["noisy"]
        chain.append(tree.tokens[node])
    assert len(tree) == 6 and is_alternative_label(alternative_label("noisy"))
    plain_tree = backend.draft_sync(DraftCall(session_id="t", committed=list(PROMPT), num_tokens=3,
                                              sampling=SamplingParams(), seed=1)).tree
    assert plain_tree.is_chain() and len(plain_tree) == 3


def _measured_policy(node_cost: float, accept: float = 0.6) -> DraftLengthPolicy:
    policy = DraftLengthPolicy(8)
    for _ in range(4):
        policy.record(0, 0, 0.0, 0.1)  # verifier-only steps: 0.1 s
    for nodes in (2, 4, 6, 3):  # tree passes: 0.1 s + node_cost steps per node
        policy.record(nodes, 0, 0.0, 0.1 * (1 + node_cost * nodes), nodes)
    policy.reached = [10.0] * 8
    policy.accepted = [10.0 * accept] * 8
    return policy


def test_siblings_pay_where_rows_are_nearly_free_and_not_where_they_cost():
    cheap, costly = _measured_policy(0.005), _measured_policy(0.15)
    assert cheap.measured_costs()[1] == pytest.approx(0.005, abs=1e-3)
    assert cheap.alternative_positions(3) == 3 and costly.alternative_positions(3) == 0
    assert DraftLengthPolicy(8).alternative_positions(3) == 0  # nothing measured: no width
    assert cheap.alternative_positions(0) == 0
    # deep positions are rarely reached: at a middling row cost only the first ones pay
    middling = _measured_policy(0.03)
    assert 0 < middling.alternative_positions(8) < 8
    # a measured hit rate of ~0 turns them off again, a high one keeps them
    for _ in range(30):
        cheap.record_alternatives(judged=True, hit=False)
    assert cheap.alternative_rate() < 0.1 and cheap.alternative_positions(3) == 0
    for _ in range(30):
        cheap.record_alternatives(judged=True, hit=True)
    assert cheap.alternative_positions(3) == 3
    tiered = TieredLengthPolicy(cheap, DraftLengthPolicy(8))
    assert tiered.alternative_positions(3) == 3
    tiered.free_only = True  # the free tier drafts no LM chain: nothing to widen
    assert tiered.alternative_positions(3) == 0


def _run(verifier_lm, drafter_lm, widen: bool, monkeypatch, n: int = 40):
    # the mechanism under test, whatever this machine's measured costs say: every round drafts
    # (the tiny model's near-uniform rows end each chain at its first token: the confidence stop)
    monkeypatch.setattr(DraftLengthPolicy, "next_length", lambda self, npp=1.0: self.max_length)
    monkeypatch.setattr(DraftLengthPolicy, "alternative_positions", lambda self, k, npp=1.0: k if widen else 0)
    engine = SpeculativeEngine(LocalVerifier(verifier_lm), [LocalDrafter(LMDrafter(drafter_lm, name="noisy"))],
                               greedy_alternatives=widen)
    return engine.run(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=n, rule="greedy", draft_length=4))


def test_widened_greedy_output_equals_plain_and_siblings_are_counted_apart(verifier_lm, noisy_twin, monkeypatch):
    tokens, stats = _run(verifier_lm, noisy_twin, True, monkeypatch)
    assert tokens == plain(verifier_lm, 40)  # fp32: token for token
    label = alternative_label("noisy")
    assert stats.drafted_by_drafter.get(label, 0) > 0
    hits = stats.accepted_by_drafter.get(label, 0)
    assert hits > 0  # the runner-up was the verifier's pick sometimes
    narrow_tokens, narrow = _run(verifier_lm, noisy_twin, False, monkeypatch)
    assert narrow_tokens == tokens and label not in narrow.drafted_by_drafter
    assert stats.rounds < narrow.rounds  # each taken sibling brought its row's token: fewer verifier passes


def test_sampled_rules_are_never_widened(verifier_lm, noisy_twin, monkeypatch):
    monkeypatch.setattr(DraftLengthPolicy, "alternative_positions", lambda self, k, npp=1.0: k)
    monkeypatch.setattr(DraftLengthPolicy, "next_length", lambda self, npp=1.0: self.max_length)
    engine = SpeculativeEngine(LocalVerifier(verifier_lm), [LocalDrafter(LMDrafter(noisy_twin, name="noisy"))])
    _, stats = engine.run(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=20, rule="sps", draft_length=4,
                                            sampling=SamplingParams(temperature=1.0), seed=5))
    assert not any(is_alternative_label(k) for k in stats.drafted_by_drafter)
