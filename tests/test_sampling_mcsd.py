"""Improved MCSD (LOSSY): the bias toy of ALGORITHMS.md 3.3 (emitted law != t1, shown exactly
and by Monte Carlo through select_branch_lossy), longest-branch selection rules, and the
early-stop decision model (training, save/load, threshold)."""

import pytest
import torch
from scipy import stats

from specserve.sampling.mcsd import (
    DECISION_THRESHOLD,
    DecisionModel,
    acceptance_targets,
    select_branch_lossy,
    should_stop,
    ti_first_token_law_lossy,
    ti_roots_lossy,
    train_decision_model,
)
from specserve.tree import ROOT, TokenTree


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Small tensors: on a shared CPU, intra-op threads cost more in sync than they save."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


T1 = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
ACCEPT_GIVEN_ROOT = torch.tensor([0.55, 1.0, 1.0], dtype=torch.float64)


def test_bias_toy_exact_law_differs_from_t1():
    law = ti_first_token_law_lossy(T1, ACCEPT_GIVEN_ROOT, width=2)
    assert float(law.sum()) == pytest.approx(1.0)
    assert law.tolist() == pytest.approx([0.275, 0.435, 0.290], abs=1e-9)
    assert (law - T1.double()).abs().max() > 0.2
    # with one root there is nothing to select among: the law is t1 again (the exact variant)
    assert ti_first_token_law_lossy(T1, ACCEPT_GIVEN_ROOT, width=1).tolist() == pytest.approx(T1.tolist())


def toy_round(gen: torch.Generator) -> int:
    """One TI-MCSD round of the toy through select_branch_lossy; returns the emitted first token."""
    roots = ti_roots_lossy(T1, 2, gen)
    tree = TokenTree()
    rows = [T1]
    for r in roots:
        tree.propose(ROOT, r, T1, "target")
    for r in range(len(roots)):
        # one draft step per root (draft token 0 from a one-hot draft); t(0 | root) = acceptance
        tree.propose(r, 0, None, "draft")
    for node in range(len(tree)):
        if tree.parents[node] == ROOT:
            acc = float(ACCEPT_GIVEN_ROOT[tree.tokens[node]])
            rows.append(torch.tensor([acc, 1.0 - acc, 0.0]))
        else:
            rows.append(torch.tensor([1 / 3] * 3))
    sel = select_branch_lossy(tree, torch.stack(rows), gen)
    return tree.tokens[sel.path[0]]


def test_bias_toy_monte_carlo_rejects_t1_and_fits_the_exact_law():
    gen = torch.Generator().manual_seed(0)
    n = 3000  # the bias is 0.2 in probability: t1 is rejected at p ~ 1e-100 with this n
    counts = torch.bincount(torch.tensor([toy_round(gen) for _ in range(n)]), minlength=3).double()
    exact = ti_first_token_law_lossy(T1, ACCEPT_GIVEN_ROOT, 2)
    assert stats.chisquare(counts.numpy(), (exact * n).numpy()).pvalue > 1e-3
    assert stats.chisquare(counts.numpy(), (T1.double() * n).numpy()).pvalue < 1e-12


def fork(branches):
    """Fork tree: each branch = (root token, [draft tokens]); draft laws one-hot."""
    tree = TokenTree()
    for root, chain in branches:
        r = tree.propose(ROOT, root, None, "target")
        tree.add_sequence(chain, None, "draft", parent=r)
    return tree


def rows_accepting(tree, ok_nodes, vocab=4):
    """Target rows under which exactly the nodes in ok_nodes pass (one-hot drafts)."""
    rows = [torch.full((vocab,), 1 / vocab)]
    for node in range(len(tree)):
        rows.append(torch.full((vocab,), 1 / vocab))
    for node in range(len(tree)):
        parent = tree.parents[node]
        if parent == ROOT:
            continue
        row = torch.zeros(vocab)
        if node in ok_nodes:
            row[tree.tokens[node]] = 1.0
        else:
            row[(tree.tokens[node] + 1) % vocab] = 1.0
        rows[parent + 1] = row
    return torch.stack(rows)


def test_longest_branch_wins_first_on_ties_and_next_roots_come_from_the_residual():
    tree = fork([(0, [1, 2]), (3, [1, 1])])  # nodes: 0(root) 1 2 | 3(root) 4 5
    assert tree.parents == [ROOT, 0, 1, ROOT, 3, 4]
    sel = select_branch_lossy(tree, rows_accepting(tree, {1, 4, 5}), torch.Generator())
    assert sel.run_lengths == [1, 2] and sel.branch == 1 and sel.path == [3, 4, 5]
    assert sel.fully_accepted and sel.drafters == ["target", "draft", "draft"]
    rows = rows_accepting(tree, {1, 4})
    sel = select_branch_lossy(tree, rows, torch.Generator())
    assert sel.run_lengths == [1, 1] and sel.branch == 0 and sel.path == [0, 1]
    assert not sel.fully_accepted
    # next roots: norm((t - d)_+) at the first rejected node (node 2, parent 1, draft one-hot at 2)
    expected = (rows[2] - torch.nn.functional.one_hot(torch.tensor(2), 4)).clamp_min(0)
    assert torch.equal(sel.next_root_probs, expected / expected.sum())
    sel = select_branch_lossy(tree, rows_accepting(tree, set()), torch.Generator())
    assert sel.run_lengths == [0, 0] and sel.path == [0]


def test_greedy_rows_make_selection_exact_match():
    tree = fork([(0, [1]), (2, [3])])
    rows = rows_accepting(tree, {3})
    for seed in range(5):
        sel = select_branch_lossy(tree, rows, torch.Generator().manual_seed(seed))
        assert sel.path == [2, 3]  # the 2nd root wins because its draft matched: lossy in greedy too


def test_decision_model_learns_save_load_and_threshold(tmp_path):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2000, 16, generator=gen)
    w = torch.randn(16, generator=gen)
    t_x = torch.sigmoid(hidden @ w)  # a learnable "acceptance" signal
    d_x = torch.ones(2000)
    targets = acceptance_targets(t_x, d_x)
    assert targets.tolist() == pytest.approx(t_x.tolist())
    model = train_decision_model(hidden, targets, epochs=10, lr=1e-2, seed=0)
    with torch.no_grad():
        pred = model(hidden)
    untrained = DecisionModel(16)
    with torch.no_grad():
        base = untrained(hidden)
    bce = torch.nn.functional.binary_cross_entropy
    assert bce(pred, targets) < bce(base, targets) - 0.05
    assert torch.corrcoef(torch.stack([pred, targets]))[0, 1] > 0.9
    model.save(tmp_path / "dm.pt")
    loaded = DecisionModel.load(tmp_path / "dm.pt")
    with torch.no_grad():
        assert torch.equal(loaded(hidden), pred)
    assert DECISION_THRESHOLD == 0.4
    assert should_stop(torch.tensor([0.4, 0.1]))
    assert not should_stop(torch.tensor([0.41, 0.1]))


def test_acceptance_targets_clip_at_one_and_handle_zero_draft_probability():
    out = acceptance_targets(torch.tensor([0.2, 0.9, 0.3]), torch.tensor([0.4, 0.3, 0.0]))
    assert out.tolist() == pytest.approx([0.5, 1.0, 0.0])
