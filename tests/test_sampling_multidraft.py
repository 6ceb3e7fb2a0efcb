"""Multi-draft sibling verifiers: RRS, RRS without replacement, SpecHub, and the sibling
sampler they rely on. Chi-square at ALPHA = 1e-3, fixed seeds, N = 2e5 vectorised draws made
with the same draw_* functions `sample_siblings` uses. Includes negative controls: a verifier
paired with the wrong coupling is rejected by the same statistic."""

import itertools

import pytest
import torch
from scipy import stats

from specserve.sampling import closed_form as cf
from specserve.sampling.multidraft import (
    draw_hub_pair,
    draw_independent,
    draw_without_replacement,
    rrs_verify,
    sample_siblings,
    spechub_verify,
)
from specserve.sampling.rules import one_hot, sample_rows


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Small tensors: on a shared CPU, intra-op threads cost more in sync than they save."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


ALPHA = 1e-3
N = 200_000


def chi2_pvalue(samples: torch.Tensor, law: torch.Tensor) -> float:
    """Goodness of fit to `law`; zero-probability cells must be empty; cells < 5 pooled."""
    law = law.double() / law.double().sum()
    counts = torch.bincount(samples.long().flatten(), minlength=law.numel()).double()
    law = law.flatten()
    assert counts[law == 0].sum() == 0, "a zero-probability outcome occurred"
    expected = law * samples.numel()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    keep = exp > 0
    return float(stats.chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue)


def rand(gen, *shape):
    return torch.rand(*shape, generator=gen, dtype=torch.float64)


def make_pairs():
    torch.manual_seed(2024)
    out = {
        "T1": (torch.tensor([0.35, 0.30, 0.20, 0.10, 0.05]), torch.tensor([0.80, 0.05, 0.05, 0.05, 0.05])),
        "T2": (torch.tensor([0.2, 0.5, 0.2, 0.1]), torch.tensor([0.5, 0.3, 0.1, 0.1])),
    }
    for name, conc in (("dir0.5", 0.5), ("dir1", 1.0)):
        t, d = torch.distributions.Dirichlet(torch.full((6,), conc)).sample((2,))
        out[name] = (t, d)
    logits = torch.randn(7)
    out["peaked"] = (torch.softmax(logits * 3, -1), torch.softmax(logits * 3 + 0.5 * torch.randn(7), -1))
    # truncated target (top-3): the draft proposes tokens the verifier removed
    t = torch.softmax(logits, -1)
    t[t < t.topk(3).values[-1]] = 0.0
    out["top3"] = (t / t.sum(), torch.softmax(logits.flip(0), -1))
    return out


PAIRS = make_pairs()


def finish(accepted_idx, tokens, residual, gen):
    y = sample_rows(residual, rand(gen, tokens.shape[0]))
    chosen = tokens.gather(1, accepted_idx.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(accepted_idx >= 0, chosen, y)


def check_acceptance(accepted_idx, alpha):
    se = (max(alpha * (1 - alpha), 0.0) / accepted_idx.numel()) ** 0.5
    assert abs((accepted_idx >= 0).double().mean().item() - alpha) < 4 * se + 1e-6


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("k", [2, 3])
def test_rrs_with_replacement_is_lossless(name, k):
    t, d = PAIRS[name]
    gen = torch.Generator().manual_seed(k * 31 + len(name))
    x = draw_independent(d, k, rand(gen, N, k))
    idx, res = rrs_verify(t, d.unsqueeze(0).expand(k, -1), x, rand(gen, N, k).float())
    assert chi2_pvalue(finish(idx, x, res, gen), t) > ALPHA
    check_acceptance(idx, cf.rrs_acceptance(t, d, k))


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("k", [2, 3])
def test_rrs_without_replacement_is_lossless(name, k):
    t, d = PAIRS[name]
    gen = torch.Generator().manual_seed(k * 17 + len(name))
    x = draw_without_replacement(d, k, rand(gen, N, d.shape[0]))
    k = x.shape[1]  # fewer if the draft support is small
    idx, res = rrs_verify(t, d.unsqueeze(0).expand(k, -1), x, rand(gen, N, k).float(), [False] + [True] * (k - 1))
    assert chi2_pvalue(finish(idx, x, res, gen), t) > ALPHA
    check_acceptance(idx, cf.rrs_wor_acceptance(t, d, k))


def test_rrs_wor_t1_three_drafts_matches_doc():
    t, d = PAIRS["T1"]
    gen = torch.Generator().manual_seed(3)
    x = draw_without_replacement(d, 3, rand(gen, N, 5))
    idx, _ = rrs_verify(t, d.unsqueeze(0).expand(3, -1), x, rand(gen, N, 3).float(), [False, True, True])
    assert (idx >= 0).double().mean().item() == pytest.approx(0.9208, abs=4e-3)


@pytest.mark.parametrize("name", list(PAIRS))
def test_rrs_with_a_different_law_per_proposal_is_lossless(name):
    """Merged candidates from two drafters (each its own row) plus a deterministic proposal."""
    t, d = PAIRS[name]
    gen = torch.Generator().manual_seed(99)
    d2 = torch.softmax(torch.randn(t.shape[0], generator=gen), -1)
    x1 = draw_independent(d, 1, rand(gen, N, 1))
    x2 = draw_without_replacement(d2, 2, rand(gen, N, t.shape[0]))
    fixed = torch.full((N, 1), int(t.argmin()))  # e.g. an n-gram proposal, law one-hot
    tokens = torch.cat([x1, x2, fixed], 1)
    rows = torch.stack([d, d2, d2, one_hot(int(t.argmin()), t.shape[0])])
    idx, res = rrs_verify(t, rows, tokens, rand(gen, N, 4).float(), [False, False, True, False])
    assert chi2_pvalue(finish(idx, tokens, res, gen), t) > ALPHA


@pytest.mark.parametrize("name", list(PAIRS))
def test_spechub_is_lossless_and_accepts_at_alpha_hub(name):
    t, d = PAIRS[name]
    gen = torch.Generator().manual_seed(len(name) * 7)
    x1, x2, a = draw_hub_pair(d, rand(gen, N, 2))
    u = rand(gen, N, 2).float()
    idx, res = spechub_verify(t, d, torch.tensor(a), x1, x2, u[:, 0], u[:, 1])
    tokens = torch.stack([x1, x2], 1)
    assert chi2_pvalue(finish(idx, tokens, res, gen), t) > ALPHA
    check_acceptance(idx, cf.spechub_acceptance(t, d))


def test_spechub_t1_acceptance_is_095():
    t, d = PAIRS["T1"]
    gen = torch.Generator().manual_seed(0)
    x1, x2, a = draw_hub_pair(d, rand(gen, N, 2))
    u = rand(gen, N, 2).float()
    idx, _ = spechub_verify(t, d, torch.tensor(a), x1, x2, u[:, 0], u[:, 1])
    assert (idx >= 0).double().mean().item() == pytest.approx(0.95, abs=3e-3)


# ---- negative controls: the wrong coupling is caught -------------------------------------
def test_negative_control_spechub_on_iid_siblings_is_rejected():
    t, d = PAIRS["T1"]
    gen = torch.Generator().manual_seed(5)
    x = draw_independent(d, 2, rand(gen, N, 2))
    u = rand(gen, N, 2).float()
    idx, res = spechub_verify(t, d, torch.tensor(int(d.argmax())), x[:, 0], x[:, 1], u[:, 0], u[:, 1])
    assert chi2_pvalue(finish(idx, x, res, gen), t) < 1e-12


def test_negative_control_rrs_with_replacement_on_wor_siblings_is_rejected():
    t, d = PAIRS["T1"]
    gen = torch.Generator().manual_seed(6)
    x = draw_without_replacement(d, 2, rand(gen, N, 5))
    idx, res = rrs_verify(t, d.unsqueeze(0).expand(2, -1), x, rand(gen, N, 2).float())  # no continues
    assert chi2_pvalue(finish(idx, x, res, gen), t) < 1e-12


# ---- the sampler: joint laws of the siblings ----------------------------------------------
def pair_codes(x, vocab):
    return x[:, 0] * vocab + x[:, 1]


@pytest.mark.parametrize("name", ["T1", "dir1"])
def test_sibling_draws_have_the_joint_law_the_verifiers_assume(name):
    d = PAIRS[name][1]
    vocab = d.shape[0]
    gen = torch.Generator().manual_seed(1)
    iid = draw_independent(d, 2, rand(gen, N, 2))
    assert chi2_pvalue(pair_codes(iid, vocab), cf.iid_joint(d, 2)) > ALPHA
    wor = draw_without_replacement(d, 2, rand(gen, N, vocab))
    assert chi2_pvalue(pair_codes(wor, vocab), cf.wor_joint(d, 2)) > ALPHA
    x1, x2, _ = draw_hub_pair(d, rand(gen, N, 2))
    assert chi2_pvalue(pair_codes(torch.stack([x1, x2], 1), vocab), cf.hub_joint(d)) > ALPHA


def test_sample_siblings_uses_the_same_draws_as_the_batched_samplers():
    d = PAIRS["dir1"][1]
    for coupling, k, width in (("independent", 3, 3), ("without_replacement", 3, 6), ("hub", 2, 2)):
        g1, g2 = torch.Generator().manual_seed(42), torch.Generator().manual_seed(42)
        tokens, hub = sample_siblings(d, k, coupling, g1)
        u = torch.rand(1, width, generator=g2, dtype=torch.float64)
        if coupling == "independent":
            assert tokens == draw_independent(d, k, u)[0].tolist() and hub is None
        elif coupling == "without_replacement":
            assert tokens == draw_without_replacement(d, k, u)[0].tolist() and hub is None
            assert len(set(tokens)) == k
        else:
            x1, x2, a = draw_hub_pair(d, u)
            assert tokens == [int(x1[0]), int(x2[0])] and hub == a == int(d.argmax())
            assert a in tokens


def test_sample_siblings_edge_cases():
    gen = torch.Generator().manual_seed(0)
    one = torch.tensor([0.0, 1.0, 0.0])
    assert sample_siblings(one, 2, "hub", gen) == ([1], None)  # no second child exists
    assert sample_siblings(one, 3, "without_replacement", gen) == ([1], None)
    assert sample_siblings(one, 2, "independent", gen) == ([1, 1], None)
    with pytest.raises(ValueError):
        sample_siblings(torch.tensor([0.5, 0.5]), 3, "hub", gen)
    with pytest.raises(ValueError):
        sample_siblings(torch.tensor([0.5, 0.5]), 2, "bogus", gen)


def test_wor_sampler_never_draws_zero_probability_tokens():
    d = torch.tensor([0.0, 0.6, 0.0, 0.4, 0.0])
    gen = torch.Generator().manual_seed(0)
    x = draw_without_replacement(d, 4, rand(gen, 1000, 5))
    assert x.shape[1] == 2 and set(itertools.chain(*x.tolist())) <= {1, 3}
