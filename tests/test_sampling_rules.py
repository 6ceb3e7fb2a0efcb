"""Single-draft rules: SpS losslessness (chi-square), Cactus (= SpS at delta 0, bit for bit;
Monte Carlo = closed form; support), TAS, greedy, and the no-NaN / no-zero-token guarantees.

Statistical tests: chi-square goodness of fit at significance ALPHA = 1e-3, fixed seeds,
N = 2e5 samples, drawn in one vectorised call of the same functions the tree walker uses.
"""

import pytest
import torch
from scipy import stats

from specserve.sampling import closed_form as cf
from specserve.sampling.params import SamplingParams, process_logits
from specserve.sampling.rules import (
    cactus_step,
    greedy_accept,
    normalize_or,
    sample_rows,
    sps_step,
    tas_accept,
)


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
    """Goodness of fit of token samples to `law`; tokens with law 0 must never appear.
    Cells with expected count < 5 are pooled so the chi-square approximation holds."""
    law = law.double() / law.double().sum()
    counts = torch.bincount(samples.long(), minlength=law.shape[0]).double()
    assert counts[law == 0].sum() == 0, "a zero-probability token was emitted"
    expected = law * samples.numel()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    keep = exp > 0
    return float(stats.chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue)


def draws(gen: torch.Generator, *shape) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, dtype=torch.float64)


def pairs():
    """(t, d) test pairs: Dirichlet random, peaked-and-aligned, and a truncated target."""
    gen = torch.Generator().manual_seed(1234)
    out = [
        (torch.tensor([0.35, 0.30, 0.20, 0.10, 0.05]), torch.tensor([0.80, 0.05, 0.05, 0.05, 0.05])),
        (torch.tensor([0.2, 0.5, 0.2, 0.1]), torch.tensor([0.5, 0.3, 0.1, 0.1])),
    ]
    for conc in (0.5, 1.0):
        alpha = torch.full((7,), conc)
        t = torch.distributions.Dirichlet(alpha).sample()
        d = torch.distributions.Dirichlet(alpha).sample()
        out.append((t, d))
    logits = torch.randn(8, generator=gen) * 2
    out.append((process_logits(logits * 2, SamplingParams(1.0)), process_logits(logits, SamplingParams(1.0))))
    # verifier truncated by top-k: zero-probability tokens the draft still proposes
    out.append(
        (process_logits(logits, SamplingParams(1.0, top_k=3)), process_logits(logits + torch.randn(8, generator=gen), SamplingParams(1.0)))
    )
    return out


PAIRS = pairs()


def run_step(step, t, d, seed, n=N, **kw):
    gen = torch.Generator().manual_seed(seed)
    x = sample_rows(d.unsqueeze(0).expand(n, -1), draws(gen, n))
    accepted, recovery = step(t, d, x, draws(gen, n).float(), **kw)
    y = sample_rows(recovery, draws(gen, n))
    return torch.where(accepted, x, y), accepted


@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_sps_emits_exactly_t_and_accepts_at_the_closed_form_rate(i):
    t, d = PAIRS[i]
    emitted, accepted = run_step(sps_step, t, d, seed=100 + i)
    assert chi2_pvalue(emitted, t) > ALPHA
    alpha = cf.sps_acceptance(t, d)
    se = (max(alpha * (1 - alpha), 0.0) / N) ** 0.5
    assert abs(accepted.double().mean().item() - alpha) < 4 * se + 1e-9


def test_chi2_helper_rejects_a_wrong_law():
    """The statistic has power: SpS samples tested against the draft law fail."""
    t, d = PAIRS[0]
    emitted, _ = run_step(sps_step, t, d, seed=1)
    assert chi2_pvalue(emitted, d) < 1e-12


@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_cactus_delta_zero_is_sps_bit_for_bit(i):
    t, d = PAIRS[i]
    gen = torch.Generator().manual_seed(i)
    x = sample_rows(d.unsqueeze(0).expand(1000, -1), draws(gen, 1000))
    u = draws(gen, 1000).float()
    acc_s, rec_s = sps_step(t, d, x, u)
    acc_c, rec_c = cactus_step(t, d, x, u, 0.0)
    assert torch.equal(acc_s, acc_c)
    assert torch.equal(rec_s, rec_c)


@pytest.mark.parametrize("pair", [0, 1, 2, 3])
@pytest.mark.parametrize("delta", [0.05, 0.2, 1.0])
def test_cactus_monte_carlo_matches_closed_form(pair, delta):
    t, d = PAIRS[pair]
    emitted, accepted = run_step(cactus_step, t, d, seed=7 * pair + int(delta * 100), delta=delta)
    alpha, law = cf.cactus_closed_form(t, d, delta)
    assert chi2_pvalue(emitted, law) > ALPHA
    se = (max(alpha * (1 - alpha), 0.0) / N) ** 0.5
    assert abs(accepted.double().mean().item() - alpha) < 4 * se + 1e-6


def test_cactus_never_emits_tokens_removed_by_top_k_or_top_p():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(12, generator=gen)
    for params in (SamplingParams(1.0, top_k=4), SamplingParams(0.8, top_p=0.6)):
        t = process_logits(logits, params)
        d = process_logits(logits.flip(0), SamplingParams(1.0))  # draft loves the removed tokens
        for delta in (0.0, 0.5, 2.0):
            emitted, _ = run_step(cactus_step, t, d, seed=5, delta=delta, n=50_000)
            assert bool((t[emitted] > 0).all())


def test_tas_monte_carlo_matches_closed_form_and_rejection_emits_argmax():
    t, d = PAIRS[0]
    gen = torch.Generator().manual_seed(9)
    x = sample_rows(d.unsqueeze(0).expand(N, -1), draws(gen, N))
    ok = tas_accept(t, x, 0.09, 0.3)
    emitted = torch.where(ok, x, t.argmax())
    alpha, law = cf.tas_closed_form(t, d, 0.09, 0.3)
    assert chi2_pvalue(emitted, law) > ALPHA
    assert abs(ok.double().mean().item() - alpha) < 4 * (alpha * (1 - alpha) / N) ** 0.5


def test_tas_never_accepts_zero_probability_tokens():
    t = torch.tensor([0.0, 0.0, 1.0])  # zero entropy: threshold = min(eps, alpha) = 0.09
    assert tas_accept(t, torch.tensor([0, 1, 2]), 0.09, 0.3).tolist() == [False, False, True]


def test_greedy_accept_is_exact_match_on_argmax():
    t = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    assert greedy_accept(t, torch.tensor([1, 1])).tolist() == [True, False]


def test_identical_laws_accept_always_and_never_nan():
    t = torch.tensor([0.25, 0.25, 0.5])
    x = torch.tensor([0, 1, 2])
    accepted, recovery = sps_step(t, t, x, torch.tensor([0.0, 0.5, 0.999999]))
    assert bool(accepted.all())
    assert torch.isfinite(recovery).all()
    assert recovery.tolist() == [t.tolist()] * 3  # empty residual -> fallback row inside t's support
    one = torch.tensor([0.0, 1.0, 0.0])
    accepted, recovery = cactus_step(one, one, torch.tensor([1]), torch.tensor([0.99]), 0.5)
    assert bool(accepted.all()) and torch.isfinite(recovery).all()


def test_normalize_or_falls_back_only_for_empty_rows():
    rows = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    fb = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    assert normalize_or(rows, fb).tolist() == [[0.5, 0.5], [0.25, 0.75]]


def test_sample_rows_never_returns_zero_mass_tokens_even_at_u_near_one():
    probs = torch.tensor([[0.0, 0.3, 0.7, 0.0, 0.0]] * 4)
    v = torch.tensor([0.0, 0.3, 1.0 - 1e-16, 0.9999999999])
    out = sample_rows(probs, v)
    assert out.tolist() == [1, 2, 2, 2]


def test_sample_rows_keeps_the_tail_of_a_150k_vocab_row():
    """float64 CDF: a 1e-4 tail after 150k entries is still reachable, exactly where expected."""
    vocab = 150_000
    row = torch.full((vocab,), (1 - 1e-4) / (vocab - 1))
    row[-1] = 1e-4
    v = torch.tensor([1 - 0.5e-4, 1 - 2e-4, 0.0], dtype=torch.float64)
    regular = (1 - 1e-4) / (vocab - 1)
    inside_body = int((1 - 2e-4) // regular)  # 149984: the CDF of the uniform body
    assert sample_rows(row.unsqueeze(0).expand(3, -1), v).tolist() == [vocab - 1, inside_body, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_is_torch_argmax_ties_and_nan_included(dtype):
    """greedy_tokens (numpy's argmax, for speed) must pick what torch.argmax picks: the lowest
    id among tied maxima, a NaN as the maximum, on rows and on batches of rows."""
    from specserve.sampling.params import greedy_token, greedy_tokens

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(-3, 3, (64, 1000), generator=g).to(dtype)  # ties everywhere
    rows[5, 17] = float("nan")
    assert greedy_tokens(rows) == torch.argmax(rows.float(), -1).tolist()
    assert greedy_tokens(rows[None]) == torch.argmax(rows.float(), -1).tolist()
    assert all(greedy_token(r) == int(torch.argmax(r)) for r in rows)
    assert greedy_tokens(rows[5]) == [17]
