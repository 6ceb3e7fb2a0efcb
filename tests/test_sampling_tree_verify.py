"""Tree verification: losslessness of the whole walk (hub root + merged extra proposal,
without-replacement and independent branching below, chains, bonus tokens), rule dispatch,
Cactus = SpS bit for bit at delta 0 on trees, greedy / TAS semantics, per-drafter reporting.

The tree-level Monte Carlo runs verify_tree itself once per sample (a Python walk of a few
ms on this shared CPU), so it uses N_TREE = 8_000 samples of a 3-token joint law (V = 3, 27
cells; power against gross composition errors such as a wrong row, coupling or bonus law).
Every node verifier it composes is separately tested with 2e5 vectorised samples in
test_sampling_multidraft.py / test_sampling_rules.py. Rules sps / rrs / rrs-wor / spechub take the
same code path here (the tree's couplings pick the verifier), so one rule is run.
"""

import pytest
import torch
from scipy import stats

from specserve.engine import types as engine_types
from specserve.sampling import closed_form as cf
from specserve.sampling.multidraft import sample_siblings
from specserve.sampling.rules import sample_row
from specserve.sampling.tree_verify import (
    LOSSY_RULES,
    RULES,
    RuleConfig,
    coupling_for_rule,
    drafted_counts,
    verify_tree,
)
from specserve.tree import ROOT, TokenTree


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Small tensors: on a shared CPU, intra-op threads cost more in sync than they save."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


ALPHA = 1e-3
N_TREE = 8_000
V = 3


def chi2_pvalue(counts: torch.Tensor, law: torch.Tensor) -> float:
    law = law.double().flatten() / law.double().sum()
    counts = counts.double().flatten()
    assert counts[law == 0].sum() == 0
    expected = law * counts.sum()
    keep = expected > 0
    return float(stats.chisquare(counts[keep].numpy(), expected[keep].numpy()).pvalue)


class ToyLM:
    """Context-dependent laws for a 3-token vocabulary: target T[ctx], draft D[ctx]."""

    def __init__(self, seed: int, conc: float = 0.8):
        g = torch.Generator().manual_seed(seed)
        self.laws = {}
        for ctx in [(), *[(a,) for a in range(V)], *[(a, b) for a in range(V) for b in range(V)]]:
            t = torch._standard_gamma(torch.full((V,), conc), generator=g)
            d = torch._standard_gamma(torch.full((V,), conc), generator=g)
            self.laws[ctx] = (t / t.sum(), d / d.sum())

    def t(self, ctx):
        return self.laws[tuple(ctx)][0]

    def d(self, ctx):
        return self.laws[tuple(ctx)][1]

    def joint(self):
        law = torch.zeros(V, V, V, dtype=torch.float64)
        for a in range(V):
            for b in range(V):
                law[a, b] = self.t(()).double()[a] * self.t((a,)).double()[b] * self.t((a, b)).double()
        return law


def draft_tree(lm: ToyLM, gen: torch.Generator) -> TokenTree:
    """Root: SpecHub pair from drafter A plus an independent proposal from drafter B (merged).
    Under the first root child: 2 children without replacement; under the others: one child
    each; under every depth-2 node that was drafted first: nothing (bonus comes from t)."""
    tree = TokenTree()
    d0 = lm.d(())
    toks, hub = sample_siblings(d0, 2, "hub", gen)
    for x in toks:
        tree.propose(ROOT, x, d0, "A")
    tree.coupling[ROOT] = "hub"
    if hub is not None:
        tree.hub_token[ROOT] = hub
    d_b = lm.t(()) * 0.5 + 0.5 / V  # drafter B: a different law
    (xb,), _ = sample_siblings(d_b, 1, "independent", gen)
    tree.propose(ROOT, xb, d_b, "B")
    for i, node in enumerate(tree.children(ROOT)):
        ctx = [tree.tokens[node]]
        dn = lm.d(ctx)
        if i == 0:
            kids, _ = sample_siblings(dn, 2, "without_replacement", gen)
            tree.coupling[node] = "without_replacement"
        else:
            kids, _ = sample_siblings(dn, 1, "independent", gen)
        for x in kids:
            tree.propose(node, x, dn, "A")
    return tree


def target_rows(lm: ToyLM, tree: TokenTree) -> torch.Tensor:
    rows = [lm.t(())]
    for node in range(len(tree)):
        rows.append(lm.t([tree.tokens[n] for n in tree.path_to(node)]))
    return torch.stack(rows)


def complete(lm: ToyLM, tokens: list[int], gen) -> list[int]:
    """Tokens the next rounds would add with nothing drafted (plain target sampling)."""
    out = list(tokens[:3])
    while len(out) < 3:
        out.append(sample_row(lm.t(out), gen))
    return out


def test_verify_tree_emits_the_target_joint_law():
    lm = ToyLM(seed=3)
    gen = torch.Generator().manual_seed(11)
    counts = torch.zeros(V, V, V)
    for _ in range(N_TREE):
        tree = draft_tree(lm, gen)
        verdict = verify_tree(tree, target_rows(lm, tree), "spechub", None, gen)
        a, b, c = complete(lm, verdict.tokens, gen)
        counts[a, b, c] += 1
    assert chi2_pvalue(counts, lm.joint()) > ALPHA


def test_negative_control_mislabelled_coupling_is_rejected_at_tree_level():
    """The same statistic has power at tree level: hub-coupled siblings verified as if they
    were independent (RRS) emit a visibly wrong law."""
    lm = ToyLM(seed=3)
    gen = torch.Generator().manual_seed(11)
    counts = torch.zeros(V, V, V)
    for _ in range(3000):  # the first-token law moves by ~0.3, far beyond this n's noise
        tree = draft_tree(lm, gen)
        tree.coupling[ROOT] = "independent"
        verdict = verify_tree(tree, target_rows(lm, tree), "sps", None, gen)
        a, b, c = complete(lm, verdict.tokens, gen)
        counts[a, b, c] += 1
    assert chi2_pvalue(counts, lm.joint()) < 1e-12


def test_rules_and_couplings_match_the_engine_contract():
    assert RULES == engine_types.RULES
    assert LOSSY_RULES == engine_types.LOSSY_RULES
    assert coupling_for_rule("rrs") == "independent"
    assert coupling_for_rule("rrs-wor") == "without_replacement"
    assert coupling_for_rule("spechub") == "hub"
    assert {coupling_for_rule(r) for r in RULES} <= {"independent", "without_replacement", "hub"}
    with pytest.raises(ValueError):
        coupling_for_rule("nope")


def test_rule_params_from_engine_types_are_accepted():
    lm = ToyLM(seed=1)
    tree = draft_tree(lm, torch.Generator().manual_seed(0))
    verdict = verify_tree(tree, target_rows(lm, tree), "cactus", engine_types.RuleParams(delta=0.3), torch.Generator().manual_seed(0))
    assert len(verdict.tokens) == verdict.num_accepted + 1


@pytest.mark.parametrize("chain", [True, False])
def test_cactus_delta_zero_equals_sps_bit_for_bit_on_trees(chain):
    lm = ToyLM(seed=5)
    for seed in range(150):
        gen = torch.Generator().manual_seed(seed)
        if chain:
            tree = TokenTree()
            ctx: list[int] = []
            parent = ROOT
            for _ in range(2):
                (x,), _ = sample_siblings(lm.d(ctx), 1, "independent", gen)
                parent = tree.propose(parent, x, lm.d(ctx), "A")
                ctx.append(x)
        else:
            tree = draft_tree(lm, gen)
        rows = target_rows(lm, tree)
        a = verify_tree(tree, rows, "sps", None, torch.Generator().manual_seed(1000 + seed))
        b = verify_tree(tree, rows, "cactus", RuleConfig(delta=0.0), torch.Generator().manual_seed(1000 + seed))
        assert (a.path, a.tokens, a.bonus) == (b.path, b.tokens, b.bonus)


def test_cactus_single_node_acceptance_matches_closed_form_and_beats_sps():
    t = torch.tensor([0.35, 0.30, 0.20, 0.10, 0.05])
    d = torch.tensor([0.80, 0.05, 0.05, 0.05, 0.05])
    gen = torch.Generator().manual_seed(0)
    n = 2000
    hits = {"sps": 0, "cactus": 0}
    for _ in range(n):
        tree = TokenTree()
        (x,), _ = sample_siblings(d, 1, "independent", gen)
        tree.propose(ROOT, x, d, "A")
        rows = torch.stack([t, torch.full((5,), 0.2)])
        for rule in hits:
            hits[rule] += verify_tree(tree, rows, rule, RuleConfig(delta=0.2), gen).num_accepted
    for rule, alpha in (("sps", 0.55), ("cactus", cf.cactus_closed_form(t, d, 0.2)[0])):
        assert abs(hits[rule] / n - alpha) < 4 * (alpha * (1 - alpha) / n) ** 0.5
    assert hits["cactus"] > hits["sps"]


def one_hot_rows(*tokens):
    return torch.nn.functional.one_hot(torch.tensor(tokens), 4).float()


def test_greedy_takes_the_first_child_equal_to_argmax_and_emits_argmax():
    tree = TokenTree()
    a = tree.propose(ROOT, 1, None, "A")
    b = tree.propose(ROOT, 2, None, "B")
    c = tree.add_sequence([3], None, "B", parent=b)[0]
    rows = one_hot_rows(2, 0, 3, 1)  # root wants 2 (node b), b wants 3 (node c), c wants 1
    verdict = verify_tree(tree, rows, "greedy")
    assert verdict.path == [b, c] and verdict.tokens == [2, 3, 1] and verdict.bonus
    assert verdict.accepted_drafters == ["B", "B"]
    rows = one_hot_rows(0, 0, 3, 1)  # root wants 0: nothing matches, correction = 0
    verdict = verify_tree(tree, rows, "greedy")
    assert verdict.path == [] and verdict.tokens == [0] and not verdict.bonus
    assert a == 0


def _reference_greedy_walk(tree: TokenTree, logits: torch.Tensor) -> tuple[list[int], list[int]]:
    """Greedy by definition: from the root follow the child equal to torch.argmax of its row."""
    node, path = ROOT, []
    while True:
        want = int(torch.argmax(logits[0 if node == ROOT else node + 1]))
        children = [p.child for p in tree.proposals.get(node, []) if tree.tokens[p.child] == want]
        if not children:
            return path, [tree.tokens[n] for n in path] + [want]
        path.append(children[0])
        node = children[0]


@pytest.mark.parametrize("seed", range(20))
def test_greedy_on_raw_logits_is_greedy_on_processed_rows_and_the_argmax_walk(seed):
    """The verifier hands greedy its raw logits (engine/local.py): the verdict must be the one
    on the processed one-hot rows, and the argmax walk's, on random trees with ties in the rows."""
    from specserve.sampling.params import SamplingParams, process_logits

    g = torch.Generator().manual_seed(seed)
    vocab = 6
    tree = TokenTree()
    frontier = [ROOT]
    for _ in range(3):  # up to 3 levels, 1-3 distinct children per node
        nxt = []
        for parent in frontier:
            for token in torch.randperm(vocab, generator=g)[: int(torch.randint(1, 4, (1,), generator=g))].tolist():
                nxt.append(tree.propose(parent, token, None, "D"))
        frontier = nxt
    logits = torch.randint(0, 3, (len(tree) + 1, vocab), generator=g).float()  # many ties
    # steer half the rows to a drafted child so that paths get deep
    for node in [ROOT, *range(len(tree))]:
        kids = tree.proposals.get(node, [])
        if kids and torch.rand(1, generator=g) < 0.7:
            logits[0 if node == ROOT else node + 1, tree.tokens[kids[-1].child]] = 5.0
    raw = verify_tree(tree, logits, "greedy")
    processed = verify_tree(tree, process_logits(logits, SamplingParams()), "greedy")
    path, tokens = _reference_greedy_walk(tree, logits)
    assert (raw.path, raw.tokens, raw.bonus) == (processed.path, processed.tokens, processed.bonus)
    assert (raw.path, raw.tokens) == (path, tokens)
    assert raw.bonus == (not tree.proposals.get(path[-1] if path else ROOT))


def test_tas_takes_the_first_passing_child_and_corrects_with_argmax():
    tree = TokenTree()
    tree.propose(ROOT, 0, torch.tensor([1.0, 0, 0, 0]), "A")  # t = 0.01: fails
    tree.propose(ROOT, 2, torch.tensor([0, 0, 1.0, 0]), "A")  # t = 0.29: passes
    tree.propose(ROOT, 1, torch.tensor([0, 1.0, 0, 0]), "A")  # t = 0.7: passes, but later
    rows = torch.tensor([[0.01, 0.7, 0.29, 0.0]] + [[0.25] * 4] * 3)
    verdict = verify_tree(tree, rows, "tas")
    assert verdict.path == [1] and verdict.tokens[0] == 2
    rows[0] = torch.tensor([0.02, 0.96, 0.01, 0.01])  # threshold 0.09: only token 1 passes
    tree2 = TokenTree()
    tree2.propose(ROOT, 0, None, "A")
    verdict = verify_tree(tree2, rows[:2], "tas")
    assert verdict.path == [] and verdict.tokens == [1]


def test_bonus_comes_from_the_unmodified_leaf_row():
    tree = TokenTree()
    tree.add_sequence([2], torch.tensor([[0.0, 0.0, 1.0, 0.0]]), "A")
    rows = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    seen = set()
    for seed in range(40):
        v = verify_tree(tree, rows, "cactus", RuleConfig(delta=5.0), torch.Generator().manual_seed(seed))
        assert v.path == [0] and v.bonus
        seen.add(v.tokens[-1])
    assert seen == {0, 1}  # both tokens of the leaf law, never the zero-probability ones


def test_merged_children_report_the_drafter_whose_proposal_was_accepted():
    tree = TokenTree()
    tree.add_sequence([1, 2], None, "small")
    tree.add_sequence([1, 3], None, "ngram")  # merges with node 0, new node for 3
    assert len(tree) == 3 and len(tree.proposals[ROOT]) == 2
    rows = one_hot_rows(1, 3, 0, 0)
    verdict = verify_tree(tree, rows, "sps", None, torch.Generator().manual_seed(0))
    assert verdict.path == [0, 2]
    assert verdict.accepted_drafters == ["small", "ngram"]
    per_depth, per_drafter = drafted_counts(tree)
    assert per_depth == [1, 2] and per_drafter == {"small": 2, "ngram": 2}


def test_empty_tree_emits_one_target_sample():
    tree = TokenTree()
    verdict = verify_tree(tree, torch.tensor([[0.0, 1.0, 0.0]]), "sps", None, torch.Generator())
    assert verdict.path == [] and verdict.tokens == [1] and verdict.bonus


def test_bad_inputs_are_refused():
    tree = TokenTree()
    tree.propose(ROOT, 0, torch.tensor([0.5, 0.5, 0.0]), "A")
    tree.propose(ROOT, 1, torch.tensor([0.5, 0.5, 0.0]), "A")
    tree.coupling[ROOT] = "hub"
    tree.hub_token[ROOT] = 2  # the hub is not among the first two children
    rows = torch.full((3, 3), 1 / 3)
    with pytest.raises(ValueError):
        verify_tree(tree, rows, "spechub", None, torch.Generator())
    with pytest.raises(ValueError):
        verify_tree(tree, rows[:2], "sps", None, torch.Generator())
    with pytest.raises(ValueError):
        verify_tree(tree, rows, "bogus", None, torch.Generator())


def test_mcsd_ti_through_verify_tree_is_labelled_and_returns_next_root_law():
    tree = TokenTree()
    tree.add_sequence([0, 1], torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), "target")
    tree.add_sequence([2, 2], torch.tensor([[0, 0, 1.0], [0, 0, 1.0]]), "target")
    rows = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0], [0.1, 0.1, 0.8]])
    verdict = verify_tree(tree, rows, "mcsd-ti", None, torch.Generator().manual_seed(0))
    assert "mcsd-ti" in LOSSY_RULES
    assert verdict.path == [0, 1] and verdict.tokens[:2] == [0, 1] and len(verdict.tokens) == 3
    assert verdict.bonus  # the kept branch was fully accepted
    assert torch.equal(verdict.next_root_probs, rows[2])
    assert rows[2][verdict.tokens[-1]] > 0  # the extra token is a draw from the next-root law


def test_hub_node_without_a_recorded_hub_uses_argmax_of_the_draft_law():
    d = torch.tensor([0.1, 0.7, 0.2])
    rows = torch.stack([torch.tensor([0.2, 0.3, 0.5])] + [torch.full((3,), 1 / 3)] * 2)
    outcomes = []
    for with_hub in (True, False):
        tree = TokenTree()
        tree.propose(ROOT, 2, d, "A")
        tree.propose(ROOT, 1, d, "A")
        tree.coupling[ROOT] = "hub"
        if with_hub:
            tree.hub_token[ROOT] = 1
        outcomes.append([verify_tree(tree, rows, "spechub", None, torch.Generator().manual_seed(s)).tokens for s in range(30)])
    assert outcomes[0] == outcomes[1]


LOSSLESS_SAMPLED_RULES = [r for r in engine_types.RULES if r != "greedy" and r not in engine_types.LOSSY_RULES]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("rule", LOSSLESS_SAMPLED_RULES)
def test_every_lossless_rule_at_temperature_zero_is_the_greedy_walk(rule, seed):
    """What verification_rule relies on (engine/types.py): on one-hot target rows (temperature 0)
    a lossless rule accepts exactly the greedy walk and emits its argmax, whatever laws the drafts
    came with (none, or random ones), on random trees with several children per node."""
    from specserve.sampling.params import SamplingParams, process_logits

    assert engine_types.verification_rule(rule, greedy_sampling=True) == "greedy"
    assert engine_types.verification_rule(rule, greedy_sampling=False) == rule
    g = torch.Generator().manual_seed(seed)
    vocab = 6
    tree = TokenTree()
    frontier = [ROOT]
    for _ in range(3):
        nxt = []
        for parent in frontier:
            for token in torch.randperm(vocab, generator=g)[: int(torch.randint(1, 4, (1,), generator=g))].tolist():
                law = torch.softmax(torch.randn(vocab, generator=g), -1) if seed % 2 else None
                nxt.append(tree.propose(parent, token, law, "D"))
        frontier = nxt
    logits = torch.randint(0, 3, (len(tree) + 1, vocab), generator=g).float()
    for node in [ROOT, *range(len(tree))]:
        kids = tree.proposals.get(node, [])
        if kids and torch.rand(1, generator=g) < 0.7:
            logits[0 if node == ROOT else node + 1, tree.tokens[kids[-1].child]] = 5.0
    walked = verify_tree(tree, logits, "greedy")
    for draw in range(3):
        verdict = verify_tree(tree, process_logits(logits, SamplingParams()), rule, None,
                              torch.Generator().manual_seed(100 * seed + draw))
        assert (verdict.path, verdict.tokens) == (walked.path, walked.tokens)


def test_lossy_rules_keep_their_own_rule_at_temperature_zero():
    for rule in engine_types.LOSSY_RULES:
        assert engine_types.verification_rule(rule, greedy_sampling=True) == rule
