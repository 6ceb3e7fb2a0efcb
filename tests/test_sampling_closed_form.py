"""Closed forms against the numeric checks of ALGORITHMS.md (0.4, 1.6, 1.8, 2.8, 4.7)."""

import itertools

import pytest
import torch

from specserve.sampling import closed_form as cf
from specserve.sampling.rules import cactus_gamma


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Small tensors: on a shared CPU, intra-op threads cost more in sync than they save."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


T1 = (torch.tensor([0.35, 0.30, 0.20, 0.10, 0.05], dtype=torch.float64),
      torch.tensor([0.80, 0.05, 0.05, 0.05, 0.05], dtype=torch.float64))
T2 = (torch.tensor([0.2, 0.5, 0.2, 0.1], dtype=torch.float64),
      torch.tensor([0.5, 0.3, 0.1, 0.1], dtype=torch.float64))


@pytest.mark.parametrize(
    "alpha,m,c,tokens,speedup",
    [(0.8, 4, 0.02, 3.3616, 3.1126), (0.6, 5, 0.05, 2.3834, 1.9067), (0.9, 8, 0.01, 6.1258, 5.6720)],
)
def test_leviathan_tokens_per_call_and_walltime(alpha, m, c, tokens, speedup):
    assert cf.expected_tokens_per_call(alpha, m) == pytest.approx(tokens, abs=1e-4)
    assert cf.walltime_improvement(alpha, m, c) == pytest.approx(speedup, abs=1e-4)


def test_tokens_per_call_at_full_acceptance_is_m_plus_one():
    assert cf.expected_tokens_per_call(1.0, 5) == 6.0


def test_swi_arithmetic_of_cs_drafting():
    runs = {"t5-xxl": 60, "t5-base": 150, "t5-small": 300, "mag": 1000}
    cost = {"t5-xxl": 1.0, "t5-base": 0.04, "t5-small": 0.02}  # MaG is free
    assert cf.standardized_walltime_improvement(200, runs, cost, "t5-xxl") == pytest.approx(200 / 72)
    assert round(cf.standardized_walltime_improvement(200, runs, cost, "t5-xxl"), 2) == 2.78


def test_cactus_readme_scalar_example():
    gamma = float(cactus_gamma(torch.tensor(0.35, dtype=torch.float64), 0.2))
    assert gamma == pytest.approx(0.6517, abs=1e-4)
    assert min(1.0, gamma / 0.8) == pytest.approx(0.8146, abs=1e-4)
    assert min(1.0, 0.35 / 0.8) == pytest.approx(0.4375)
    # h^(n) moves mass proportionally, so KL(h || t) is the binary kl(gamma || t(n))
    binary = gamma * torch.log(torch.tensor(gamma / 0.35)) + (1 - gamma) * torch.log(torch.tensor((1 - gamma) / 0.65))
    assert float(binary) == pytest.approx(0.1878, abs=1e-4)


@pytest.mark.parametrize(
    "delta,acc,kl,law",
    [
        (0.0, 0.5500, 0.0, [0.35, 0.30, 0.20, 0.10, 0.05]),
        (0.05, 0.7008, 0.0494, [0.5008, 0.2237, 0.1497, 0.0758, 0.05]),
        (0.10, 0.7633, 0.0982, [0.5633, 0.1917, 0.1289, 0.0661, 0.05]),
        (0.20, 0.8517, 0.1968, [0.6517, 0.1458, 0.0994, 0.0531, 0.05]),
        (0.5, 1.0, 0.4678, [0.80, 0.05, 0.05, 0.05, 0.05]),
        (1.0, 1.0, 0.4678, [0.80, 0.05, 0.05, 0.05, 0.05]),
    ],
)
def test_cactus_table_t1(delta, acc, kl, law):
    t, d = T1
    acceptance, emitted = cf.cactus_closed_form(t, d, delta)
    assert acceptance == pytest.approx(acc, abs=1e-4)
    assert cf.kl(emitted, t) == pytest.approx(kl, abs=1e-4)
    assert emitted.tolist() == pytest.approx(law, abs=1e-4)
    assert float(emitted.sum()) == pytest.approx(1.0, abs=1e-9)


def test_kl_of_d_to_t_on_t1_is_the_saturated_value():
    t, d = T1
    assert cf.kl(d, t) == pytest.approx(0.4678, abs=1e-4)


def test_tas_row_of_t1():
    t, d = T1
    acceptance, emitted = cf.tas_closed_form(t, d, 0.09, 0.3)
    assert acceptance == pytest.approx(0.95, abs=1e-6)
    assert cf.kl(emitted, t) == pytest.approx(0.5606, abs=1e-4)
    assert emitted.tolist() == pytest.approx([0.85, 0.05, 0.05, 0.05, 0.0], abs=1e-9)


@pytest.mark.parametrize("delta,acc,kl", [(0.01, 0.7566, 0.00969), (0.1, 0.8789, 0.0883), (0.2, 0.9530, 0.1700), (0.5, 1.0, 0.2356)])
def test_cactus_table_t2(delta, acc, kl):
    t, d = T2
    acceptance, emitted = cf.cactus_closed_form(t, d, delta)
    assert acceptance == pytest.approx(acc, abs=1e-4)
    assert cf.kl(emitted, t) == pytest.approx(kl, abs=1e-4 if kl > 0.01 else 1e-5)


def test_greedy_closed_form():
    t, d = T2
    acceptance, emitted = cf.greedy_closed_form(t, d)
    assert acceptance == pytest.approx(0.3)
    assert emitted.tolist() == [0.0, 1.0, 0.0, 0.0]


# ---- ALGORITHMS.md 2.8: multi-draft acceptance and brute-force optima ----------------------
@pytest.mark.parametrize(
    "pair,sps,rrs,opt_iid,wor,opt_wor,hub,opt_hub",
    [
        (T1, 0.5500, 0.6175, 0.6775, 0.8250, 0.9579, 0.9500, 0.9500),
        (T2, 0.7000, 0.8200, 0.9400, 0.9400, 1.0000, 1.0000, 1.0000),
    ],
)
def test_multidraft_acceptance_table(pair, sps, rrs, opt_iid, wor, opt_wor, hub, opt_hub):
    t, d = pair
    assert cf.sps_acceptance(t, d) == pytest.approx(sps, abs=1e-4)
    assert cf.rrs_acceptance(t, d, 2) == pytest.approx(rrs, abs=1e-4)
    assert cf.optimal_acceptance(t, cf.iid_joint(d, 2)) == pytest.approx(opt_iid, abs=1e-4)
    assert cf.rrs_wor_acceptance(t, d, 2) == pytest.approx(wor, abs=1e-4)
    assert cf.optimal_acceptance(t, cf.wor_joint(d, 2)) == pytest.approx(opt_wor, abs=1e-4)
    assert cf.spechub_acceptance(t, d) == pytest.approx(hub, abs=1e-4)
    assert cf.optimal_acceptance(t, cf.hub_joint(d)) == pytest.approx(opt_hub, abs=1e-4)


def test_more_drafts_on_t1():
    t, d = T1
    assert cf.rrs_acceptance(t, d, 3) == pytest.approx(0.6749, abs=1e-4)
    assert cf.rrs_acceptance(t, d, 4) == pytest.approx(0.7158, abs=1e-4)
    assert cf.rrs_wor_acceptance(t, d, 3) == pytest.approx(0.9208, abs=1e-4)
    assert cf.rrs_wor_acceptance(t, d, 4) == pytest.approx(0.9604, abs=1e-4)


def test_k1_multidraft_reduces_to_sps_and_optimum():
    gen = torch.Generator().manual_seed(11)
    for _ in range(5):
        t, d = torch.distributions.Dirichlet(torch.ones(6)).sample((2,)).double()
        sps = cf.sps_acceptance(t, d)
        assert cf.rrs_acceptance(t, d, 1) == pytest.approx(sps)
        assert cf.rrs_wor_acceptance(t, d, 1) == pytest.approx(sps)
        assert cf.optimal_acceptance(t, d) == pytest.approx(sps)


def test_spechub_is_optimal_for_its_coupling_and_never_below_sps():
    torch.manual_seed(5)
    for conc in (0.5, 1.0):
        for _ in range(8):
            t, d = torch.distributions.Dirichlet(torch.full((6,), conc)).sample((2,)).double()
            t, d = t / t.sum(), d / d.sum()  # exact float64 laws: alpha* uses 1 - t(H)
            hub = cf.spechub_acceptance(t, d)
            assert hub == pytest.approx(cf.optimal_acceptance(t, cf.hub_joint(d)), abs=1e-9)
            assert hub >= cf.sps_acceptance(t, d) - 1e-12
            # the recursive verifiers never beat the optimum for their own coupling
            assert cf.rrs_acceptance(t, d, 2) <= cf.optimal_acceptance(t, cf.iid_joint(d, 2)) + 1e-9
            assert cf.rrs_wor_acceptance(t, d, 2) <= cf.optimal_acceptance(t, cf.wor_joint(d, 2)) + 1e-9


def test_joint_laws_are_normalised_and_first_hub_child_is_d():
    d = T1[1]
    for q in (cf.iid_joint(d, 3), cf.wor_joint(d, 3), cf.hub_joint(d)):
        assert float(q.sum()) == pytest.approx(1.0)
    assert cf.hub_joint(d).sum(1).tolist() == pytest.approx(d.tolist())
    assert cf.wor_joint(d, 2).diagonal().abs().sum() == 0


def test_cactus_corollary6_and_documented_overshoots():
    tn = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    for delta in (0.01, 0.05, 0.2, 0.5, 1.0, 2.0):
        g = cactus_gamma(tn, delta)
        binary = g * torch.log(g / tn) + (1 - g) * torch.log(((1 - g) / (1 - tn)).clamp_min(1e-300))
        small = g <= 0.5
        assert bool((binary[small] <= delta + 1e-12).all())
    for tn_, delta, gamma, kl_ in ((0.5, 0.2, 0.8162, 0.2161), (0.7, 0.2, 0.9898, 0.3085)):
        g = float(cactus_gamma(torch.tensor(tn_, dtype=torch.float64), delta))
        assert g == pytest.approx(gamma, abs=1e-4)
        exact = g * torch.log(torch.tensor(g / tn_)) + (1 - g) * torch.log(torch.tensor((1 - g) / (1 - tn_)))
        assert float(exact) == pytest.approx(kl_, abs=1e-4)


def test_cactus_invariants_on_random_pairs():
    """Acceptance and emitted KL non-decreasing in delta; emitted KL <= KL(d || t). (Not KL <= delta:
    that is false in general, ALGORITHMS.md 1.7.7.)"""
    torch.manual_seed(7)
    deltas = [0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
    for conc, vocab in itertools.product((0.7, 1.0), (5, 8)):
        for _ in range(6):
            t, d = torch.distributions.Dirichlet(torch.full((vocab,), conc)).sample((2,)).double()
            accs, kls = [], []
            for delta in deltas:
                a, e = cf.cactus_closed_form(t, d, delta)
                accs.append(a)
                kls.append(cf.kl(e, t))
                assert kls[-1] <= cf.kl(d, t) + 1e-6
            assert all(b >= a - 1e-6 for a, b in zip(accs, accs[1:]))
            assert all(b >= a - 1e-6 for a, b in zip(kls, kls[1:]))
            assert accs[0] == pytest.approx(cf.sps_acceptance(t, d), abs=1e-6)
            assert kls[0] == pytest.approx(0.0, abs=1e-6)
