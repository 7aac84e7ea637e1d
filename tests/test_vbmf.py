"""Tests for vbmf.py: EVBMF/VBMF rank selection from singular values.

Besides behaviour on planted low-rank-plus-noise matrices, the closed forms are
checked against a brute-force numerical minimisation of the per-component VB
free energy (Nakajima et al., JMLR 2013, Sec. 2), which is what the analytic
thresholds and shrinkage estimators claim to minimise.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import vbmf
from vbmf import VBMFResult, estimate_rank, evbmf

# Planted matrices: signal singular values between these multiples of the
# noise edge sigma * (sqrt(L) + sqrt(M)) (the largest singular value of pure
# noise), comfortably above the EVB threshold (~1.1x the edge for these shapes).
SIGNAL_LOW, SIGNAL_HIGH = 2.0, 4.0
NOISE_STD = 0.5
SIGMA2_RTOL = 0.05  # estimated noise variance vs the true one
WIDE_SHAPE = (120, 300)


def planted(L: int, M: int, rank: int, *, noise_std: float = NOISE_STD, seed: int = 0) -> np.ndarray:
    """``(L, M)`` float64: a rank-``rank`` signal plus i.i.d. N(0, noise_std^2) noise."""
    rng = np.random.default_rng(seed)
    left, _ = np.linalg.qr(rng.normal(size=(L, rank)))  # (L, rank) orthonormal columns
    right, _ = np.linalg.qr(rng.normal(size=(M, rank)))  # (M, rank)
    edge = noise_std * (math.sqrt(L) + math.sqrt(M))
    strengths = np.linspace(SIGNAL_HIGH, SIGNAL_LOW, rank) * edge
    return (left * strengths) @ right.T + noise_std * rng.normal(size=(L, M))


def rank_one(gamma: float, L: int, M: int, *, seed: int = 0) -> np.ndarray:
    """``(L, M)`` matrix whose only non-zero singular value is ``gamma``."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=L)
    v = rng.normal(size=M)
    return gamma * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))


def as_input(matrix: np.ndarray, orientation: str, backend: str):
    matrix = matrix if orientation == "wide" else matrix.T
    return torch.tensor(matrix, dtype=torch.float32) if backend == "torch" else matrix


# ---------------------------------------------------------------- behaviour


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("orientation", ["wide", "tall"])
@pytest.mark.parametrize("rank", [5, 20])
def test_evbmf_recovers_planted_rank_and_noise_variance(rank, orientation, backend):
    matrix = as_input(planted(*WIDE_SHAPE, rank, seed=rank), orientation, backend)
    result = evbmf(matrix)
    assert result.rank == rank
    assert estimate_rank(matrix) == rank
    assert result.sigma2 == pytest.approx(NOISE_STD**2, rel=SIGMA2_RTOL)
    assert result.shape == tuple(matrix.shape)


@pytest.mark.parametrize("scale", [1e-20, 1e-23])
def test_the_rank_does_not_depend_on_a_tiny_scale_in_float32(scale):
    """||Y||_F^2 of float32 entries near 1e-23 underflows in float32 while the singular values do
    not: both are taken in float64, so the planted rank is found at any scale."""
    matrix = torch.tensor(planted(*WIDE_SHAPE, 5, seed=5) * scale, dtype=torch.float32)
    assert estimate_rank(matrix) == 5


@pytest.mark.parametrize("shape", [(100, 300), (300, 100), (200, 200), (64, 27), (27, 64), (1, 50), (50, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_noise_has_rank_zero(shape, seed):
    noise = np.random.default_rng(seed).normal(scale=0.3, size=shape)
    result = evbmf(noise)
    assert result.rank == 0
    assert result.singular_values.shape == (0,)
    assert estimate_rank(torch.from_numpy(noise)) == 0
    if min(shape) > 1:
        assert result.sigma2 == pytest.approx(0.09, rel=0.2)


def test_orientation_does_not_change_the_result():
    matrix = planted(*WIDE_SHAPE, 7, seed=3)
    wide, tall = evbmf(matrix), evbmf(matrix.T)
    assert wide.rank == tall.rank == 7
    assert wide.sigma2 == pytest.approx(tall.sigma2, rel=1e-5)  # search precision ~1e-6
    np.testing.assert_allclose(wide.singular_values, tall.singular_values, rtol=1e-5)
    assert wide.shape == WIDE_SHAPE and tall.shape == WIDE_SHAPE[::-1]


def test_retained_values_are_shrunk_and_descending():
    matrix = planted(*WIDE_SHAPE, 12, seed=4)
    results = [
        evbmf(matrix),
        evbmf(matrix, sigma2=NOISE_STD**2),
        vbmf.vbmf(matrix, cacb=1.0, sigma2=NOISE_STD**2),
        vbmf.vbmf(matrix, cacb=0.05),
    ]
    for result in results:
        kept = result.singular_values
        observed = result.observed_singular_values
        assert kept.shape == (result.rank,) and result.rank > 0
        assert np.all(kept > 0) and np.all(kept < observed[: result.rank])
        assert np.all(np.diff(kept) <= 0)
        assert np.all(np.diff(observed) <= 0)
        # Exactly the observed values above the threshold are kept.
        assert np.count_nonzero(observed > result.threshold) == result.rank


def test_given_noise_variance_is_used_and_larger_noise_keeps_fewer():
    matrix = planted(*WIDE_SHAPE, 10, seed=5)
    ranks = []
    for sigma2 in [0.01, 0.1, NOISE_STD**2, 1.0, 4.0, 100.0]:
        result = evbmf(matrix, sigma2=sigma2)
        assert result.sigma2 == sigma2
        ranks.append(result.rank)
    assert ranks == sorted(ranks, reverse=True)
    assert ranks[2] == 10 and ranks[-1] == 0


def test_vbmf_larger_prior_keeps_at_least_as_many_components():
    matrix = planted(*WIDE_SHAPE, 10, seed=6)
    L, M = WIDE_SHAPE
    ranks, thresholds = [], []
    for cacb in [1e-4, 1e-3, 1e-2, 0.1, 1.0, 1e3]:
        result = vbmf.vbmf(matrix, cacb=cacb, sigma2=NOISE_STD**2)
        ranks.append(result.rank)
        thresholds.append(result.threshold)
    assert ranks == sorted(ranks) and ranks[0] == 0 and ranks[-1] >= 10
    assert thresholds == sorted(thresholds, reverse=True)
    # A flat prior leaves the threshold sqrt(M sigma2) (limit of the VB threshold).
    flat = vbmf.vbmf(matrix, cacb=1e8, sigma2=NOISE_STD**2)
    assert flat.threshold == pytest.approx(math.sqrt(M * NOISE_STD**2), rel=1e-6)


def test_vbmf_estimates_noise_variance_and_matches_orientation():
    matrix = planted(*WIDE_SHAPE, 8, seed=7)
    result = vbmf.vbmf(matrix, cacb=0.05)
    assert result.rank >= 8
    assert 0.5 * NOISE_STD**2 < result.sigma2 < 2 * NOISE_STD**2
    transposed = vbmf.vbmf(torch.from_numpy(matrix.T.copy()), cacb=0.05)
    assert transposed.rank == result.rank
    assert transposed.sigma2 == pytest.approx(result.sigma2, rel=1e-5)


def test_h_caps_the_rank():
    matrix = planted(*WIDE_SHAPE, 5, seed=8)
    assert evbmf(matrix, H=3).rank == 3
    assert evbmf(matrix, H=min(WIDE_SHAPE)).rank == 5
    assert vbmf.vbmf(matrix, cacb=1.0, sigma2=NOISE_STD**2, H=2).rank == 2


def test_zero_matrix_is_noise_only():
    result = evbmf(np.zeros((10, 20)))
    assert result.rank == 0 and result.sigma2 == 0.0
    assert vbmf.vbmf(np.zeros((10, 20)), cacb=1.0).rank == 0


def test_torch_inputs_of_any_kind():
    torch.manual_seed(0)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 3, 3, 3))  # a conv weight, requires grad
    unfolded = weight.reshape(64, -1)  # (64, 27), part of the autograd graph
    rank = estimate_rank(unfolded)
    assert type(rank) is int and rank == 0  # Gaussian noise: nothing retained
    assert weight.grad is None
    signal = torch.from_numpy(planted(64, 160, 4, seed=9))
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        assert estimate_rank(signal.to(dtype)) == 4
    # Non-contiguous views and integer arrays.
    assert estimate_rank(signal.mT) == 4
    assert estimate_rank(planted(64, 160, 4, seed=9)[:, ::-1]) == 4
    assert estimate_rank(np.arange(12).reshape(3, 4)) == estimate_rank(np.arange(12.0).reshape(3, 4))


def test_result_is_immutable():
    result = evbmf(planted(*WIDE_SHAPE, 3, seed=10))
    assert isinstance(result, VBMFResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.rank = 1
    with pytest.raises(ValueError):
        result.singular_values[0] = 0.0


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.ones(5), "2-D"),
        (np.ones((2, 3, 4)), "2-D"),
        (torch.ones(2, 3, 4), "2-D"),
        (np.ones((0, 5)), "non-empty"),
        (torch.ones(5, 0), "non-empty"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "non-finite"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), "non-finite"),
        (np.ones((3, 3), dtype=complex), "complex128"),
        (torch.ones(3, 3, dtype=torch.complex64), "complex"),
        (np.array([["a", "b"]]), "numeric"),
    ],
)
def test_bad_matrices_raise_value_error(matrix, message):
    with pytest.raises(ValueError, match=message):
        evbmf(matrix)
    with pytest.raises(ValueError, match=message):
        estimate_rank(matrix)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"H": 0}, "H must be"),
        ({"H": 11}, "H must be"),
        ({"H": True}, "H must be"),
        ({"H": 2.0}, "H must be"),
        ({"sigma2": 0.0}, "sigma2 must be"),
        ({"sigma2": -1.0}, "sigma2 must be"),
        ({"sigma2": float("nan")}, "sigma2 must be"),
    ],
)
def test_bad_options_raise_value_error(kwargs, message):
    matrix = np.ones((10, 20))
    with pytest.raises(ValueError, match=message):
        evbmf(matrix, **kwargs)
    with pytest.raises(ValueError, match=message):
        vbmf.vbmf(matrix, cacb=1.0, **kwargs)


@pytest.mark.parametrize("cacb", [0.0, -1.0, float("inf"), None])
def test_bad_prior_raises_value_error(cacb):
    with pytest.raises(ValueError, match="cacb must be"):
        vbmf.vbmf(np.ones((10, 20)), cacb=cacb)


# ------------------------------------------- brute force against the paper

# Small problem for the per-component free energy: L x M, noise variance.
BF_L, BF_M, BF_SIGMA2 = 6, 15, 0.8
BF_LOG_CLIP = 40.0  # keeps exp() of the log-variances finite during the search


def _free_energy(theta, gamma, cacb=None):
    """Twice the free energy of one component, up to its pruned-limit constant.

    ``theta = (a, b, log sigma_a^2, log sigma_b^2)`` with scalar means ``a, b``
    of the factor columns along the singular vectors (JMLR 2013, Sec. 2):
    ``M log(c_a^2/sigma_a^2) + L log(c_b^2/sigma_b^2) + <|a|^2>/c_a^2
    + <|b|^2>/c_b^2 - (L + M) + (<|a|^2><|b|^2> - 2 gamma a b) / sigma2``.
    With ``cacb=None`` (empirical VB) the prior variances take their optimum
    ``c_a^2 = <|a|^2>/M``, ``c_b^2 = <|b|^2>/L``; the pruned solution then has
    infimum 0. Otherwise ``c_a = c_b = sqrt(cacb)`` (only the product matters).
    """
    a, b, log_var_a, log_var_b = theta
    var_a = math.exp(min(max(log_var_a, -BF_LOG_CLIP), BF_LOG_CLIP))
    var_b = math.exp(min(max(log_var_b, -BF_LOG_CLIP), BF_LOG_CLIP))
    second_a = a * a + BF_M * var_a  # <|a_h|^2>
    second_b = b * b + BF_L * var_b  # <|b_h|^2>
    fit = (second_a * second_b - 2.0 * gamma * a * b) / BF_SIGMA2
    if cacb is None:
        return BF_M * math.log(second_a / (BF_M * var_a)) + BF_L * math.log(second_b / (BF_L * var_b)) + fit
    return (
        BF_M * math.log(cacb / var_a)
        + BF_L * math.log(cacb / var_b)
        + (second_a + second_b) / cacb
        - (BF_L + BF_M)
        + fit
    )


def _brute_force(gamma, *, cacb=None, seed=0):
    """Best of BFGS runs from several starts: (free energy, a * b)."""
    rng = np.random.default_rng(seed)
    starts = [np.array([math.sqrt(gamma), math.sqrt(gamma), -1.0, -1.0]), np.array([0.0, 0.0, -1.0, -1.0])]
    starts += [rng.normal(scale=2.0, size=4) for _ in range(4)]
    best = min(
        (minimize(_free_energy, start, args=(gamma, cacb), method="BFGS") for start in starts),
        key=lambda result: result.fun,
    )
    return best.fun, best.x[0] * best.x[1]


@pytest.mark.parametrize("ratio", [0.9, 0.97, 1.03, 1.2, 2.0, 5.0])
def test_evb_threshold_and_shrinkage_match_brute_force(ratio):
    threshold = evbmf(rank_one(1.0, BF_L, BF_M), sigma2=BF_SIGMA2).threshold
    gamma = ratio * threshold
    result = evbmf(rank_one(gamma, BF_L, BF_M), sigma2=BF_SIGMA2)
    energy, product = _brute_force(gamma)
    if ratio < 1:
        # Every non-zero solution costs more than the pruned one (infimum 0).
        assert energy > -1e-8
        assert result.rank == 0
    else:
        assert energy < -0.1
        assert result.rank == 1
        assert result.singular_values[0] == pytest.approx(product, rel=1e-5)
        # The noise-variance objective uses M * Psi_1(x) as this free energy.
        x = gamma**2 / (BF_M * BF_SIGMA2)
        assert BF_M * vbmf._psi1(np.array([x]), BF_L / BF_M)[0] == pytest.approx(energy, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("ratio", [0.9, 0.97, 1.05, 1.3, 3.0])
def test_vb_threshold_and_shrinkage_match_brute_force(ratio):
    cacb = 0.3
    threshold = vbmf.vbmf(rank_one(1.0, BF_L, BF_M), cacb=cacb, sigma2=BF_SIGMA2).threshold
    gamma = ratio * threshold
    result = vbmf.vbmf(rank_one(gamma, BF_L, BF_M), cacb=cacb, sigma2=BF_SIGMA2)
    energy, product = _brute_force(gamma, cacb=cacb)
    sigma2 = np.array([BF_SIGMA2])
    if ratio < 1:
        assert result.rank == 0
        assert abs(product) < 1e-4
        expected = vbmf._vb_null_free_energy(sigma2, BF_L, BF_M, cacb)[0]
    else:
        assert result.rank == 1
        assert result.singular_values[0] == pytest.approx(product, rel=1e-4)
        expected = vbmf._vb_retained_free_energy(np.array([gamma]), sigma2, BF_L, BF_M, cacb)[0]
    # The closed forms used in the noise-variance objective are this free energy.
    assert expected == pytest.approx(energy, rel=1e-6, abs=1e-6)


def test_tau_lower_solves_its_equation_and_matches_the_papers_approximation():
    for alpha in [1e-3, 0.05, 27 / 64, 0.5, 1.0]:
        tau = vbmf._tau_lower(alpha)
        assert math.sqrt(alpha) < tau < 3.0
        assert math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau == pytest.approx(0.0, abs=1e-12)
        # The papers' approximation is exact at alpha = 1 but low for small alpha
        # (25% at alpha = 1e-3); the EVB threshold it implies is within ~1%.
        approx = 2.5129 * math.sqrt(alpha)
        if alpha >= 0.25:
            assert tau == pytest.approx(approx, rel=0.02)
        x_exact, x_approx = (1 + tau) * (1 + alpha / tau), (1 + approx) * (1 + alpha / approx)
        assert math.sqrt(x_exact) == pytest.approx(math.sqrt(x_approx), rel=0.015)


@pytest.mark.parametrize("seed", [0, 1])
def test_noise_variance_is_the_global_minimiser_on_a_wide_grid(seed):
    matrix = planted(60, 150, 6, seed=seed)
    gammas = np.linalg.svd(matrix, compute_uv=False)
    frob2 = float(np.sum(matrix**2))
    L, M = matrix.shape
    tau = vbmf._tau_lower(L / M)
    x_lower = (1 + tau) * (1 + L / M / tau)
    # Far outside the analytic bounds on both sides.
    log_grid = np.log(frob2 / (L * M)) + np.linspace(-12.0, 4.0, 20001)

    def evb_objective(log_sigma2):
        return vbmf._evb_noise_objective(log_sigma2, gammas**2, frob2, L, M, x_lower)

    found = math.log(evbmf(matrix).sigma2)
    assert evb_objective(np.array([found]))[0] <= evb_objective(log_grid).min() + 1e-10

    cacb = 0.05

    def vb_objective(log_sigma2):
        return vbmf._vb_noise_objective(log_sigma2, gammas, frob2, L, M, L, cacb)

    found = math.log(vbmf.vbmf(matrix, cacb=cacb).sigma2)
    assert vb_objective(np.array([found]))[0] <= vb_objective(log_grid).min() + 1e-10


@pytest.mark.parametrize("orientation", ["wide", "tall"])
def test_large_float32_singular_values_from_the_gram_matrix_match_the_svd(orientation, monkeypatch):
    # From GRAM_MIN_SIDE on, float32 singular values come from the float64 Gram matrix. A spectrum
    # over eight decades (and exact zeros, which rounding may not leave negative) must come back
    # within float32's own accuracy of the float64 SVD, and the ranks must be those of the SVD route.
    L, M = vbmf.GRAM_MIN_SIDE + 4, 2 * vbmf.GRAM_MIN_SIDE
    rng = np.random.default_rng(3)
    left, _ = np.linalg.qr(rng.normal(size=(L, L)))
    right, _ = np.linalg.qr(rng.normal(size=(M, L)))
    values = np.logspace(2, -6, L)
    values[-10:] = 0.0
    matrix = torch.tensor((left * values) @ right.T, dtype=torch.float32)
    matrix = matrix if orientation == "wide" else matrix.T
    truth = np.linalg.svd(matrix.double().numpy(), compute_uv=False)
    gammas, frob2 = vbmf._singular_values(matrix)
    assert gammas.dtype == np.float64 and gammas.shape == (L,) and np.all(gammas >= 0)
    assert np.all(np.diff(gammas) <= 0)
    np.testing.assert_allclose(gammas, truth, rtol=0, atol=1e-7 * truth[0])
    np.testing.assert_allclose(gammas[:L // 4], truth[:L // 4], rtol=1e-5)  # two decades: relative
    noisy = torch.tensor(planted(L, M, 12, seed=7), dtype=torch.float32)
    gram_route = evbmf(noisy)
    assert gram_route.rank == 12
    monkeypatch.setattr(vbmf, "GRAM_MIN_SIDE", L + 1)  # the SVD route
    svd_route = evbmf(noisy)
    assert svd_route.rank == gram_route.rank
    assert gram_route.sigma2 == pytest.approx(svd_route.sigma2, rel=1e-5)
