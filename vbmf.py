"""Rank selection by variational Bayesian matrix factorization (VBMF).

The model (Nakajima et al., 2013, Sec. 2) factorises an observed ``L x M``
matrix, ``L <= M``, as ``Y = B A^T + E`` with ``E`` i.i.d. ``N(0, sigma2)``,
Gaussian priors ``a_h ~ N(0, c_a_h^2 I_M)``, ``b_h ~ N(0, c_b_h^2 I_L)`` on the
columns of ``A`` (``M x H``) and ``B`` (``L x H``), and a column-wise factorised
Gaussian posterior. The global minimiser of the free energy is a re-weighted
SVD: component ``h`` keeps the ``h``-th singular vectors of ``Y`` and shrinks the
observed singular value ``gamma_h`` to ``gamma_hat_h``, which is exactly zero
below a threshold. So only the singular values of ``Y`` are needed, and the
number of non-zero ``gamma_hat_h`` is the rank that VBMF selects.

* :func:`vbmf` -- VB with a given product of prior standard deviations
  ``cacb = c_a c_b`` (the VB threshold and shrinkage of the JMLR 2013 paper).
* :func:`evbmf` -- empirical VB, the prior variances estimated too
  (the EVB threshold in the closed form of Nakajima et al., 2012/2015).
* :func:`estimate_rank` -- the EVBMF rank, noise variance estimated.

Notation follows the papers: ``gamma_h`` observed singular values (descending),
``alpha = L / M``, ``x_h = gamma_h^2 / (M sigma2)``, ``tau`` and ``tau_lower``
(their ``underline{tau}``), ``x_lower = (1 + tau_lower)(1 + alpha / tau_lower)``.
Equation labels in comments name the paper and the quantity (e.g. "JMLR'13,
VB threshold"); formulas marked "derived here" are this module's own algebra
from the free energy, checked numerically against a brute-force minimisation of
that free energy in ``tests/test_vbmf.py``.

Cost: one call of :func:`torch.linalg.svdvals` (singular values only, in the
input's floating dtype, on its device) plus ``O(L)`` scalar work in numpy
float64 for the noise-variance search.

References
----------
.. [1] S. Nakajima, M. Sugiyama, S. D. Babacan, R. Tomioka, "Global analytic
   solution of fully-observed variational Bayesian matrix factorization",
   Journal of Machine Learning Research 14:1-37, 2013.
.. [2] S. Nakajima, R. Tomioka, M. Sugiyama, S. D. Babacan, "Perfect
   dimensionality recovery by variational Bayesian PCA", Advances in Neural
   Information Processing Systems 25 (NIPS 2012), pp. 971-979.
.. [3] S. Nakajima, R. Tomioka, M. Sugiyama, S. D. Babacan, "Condition for
   perfect dimensionality recovery by variational Bayesian PCA", Journal of
   Machine Learning Research 16:3757-3811, 2015 (journal version of [2]).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.optimize import brentq

from threads import lapack_threads

logger = logging.getLogger(__name__)

# Noise-variance search (vectorised "zoom" grid search, see _minimise_log_grid):
# points of the first, global grid over log(sigma2) between the bounds, points
# of each refining grid, and the log-width at which refining stops (relative
# precision of sigma2). The objective is continuous but only piecewise smooth
# and not unimodal, so a dense first grid is safer than a local scalar search.
_COARSE_GRID_POINTS = 128
_FINE_GRID_POINTS = 129
_LOG_SIGMA2_TOLERANCE = 1e-5
_MAX_REFINEMENTS = 12
# tau_lower solves a 1-D equation on (sqrt(alpha), _TAU_BRACKET_HIGH]; the
# root is below 2.52 for every alpha in (0, 1] (it is 2.5129 at alpha = 1).
_TAU_BRACKET_HIGH = 3.0
# Approximation tau_lower ~= 2.5129 sqrt(alpha) quoted in NIPS'12 / JMLR'15,
# used as Newton's starting point, and Newton's stopping rule.
_TAU_LOWER_APPROX = 2.5129
_NEWTON_MAX_ITERATIONS = 20
_NEWTON_RELATIVE_TOLERANCE = 1e-14
# Smallest noise variance searched for, relative to ||Y||_F^2 / (L M): only
# reached when the matrix is (numerically) exactly low-rank.
_MIN_RELATIVE_SIGMA2 = 1e-12


@dataclass(frozen=True, eq=False)
class VBMFResult:
    """Outcome of (empirical) VBMF on one matrix.

    Attributes
    ----------
    rank : int
        Number of components with a non-zero posterior mean (0 means the
        matrix is explained as noise only).
    singular_values : numpy.ndarray
        ``(rank,)`` float64, the posterior-mean singular values
        ``gamma_hat_h`` of the retained components, descending; each is
        strictly below the observed one (VB shrinks).
    sigma2 : float
        Noise variance: the one given, or the free-energy minimiser.
    threshold : float
        Observed singular values strictly above this (and within ``H``) are
        retained; in the units of the singular values.
    observed_singular_values : numpy.ndarray
        ``(min(shape),)`` float64, all singular values of the input, descending.
    shape : tuple of int
        Shape of the input matrix as given (not transposed).
    """

    rank: int
    singular_values: np.ndarray
    sigma2: float
    threshold: float
    observed_singular_values: np.ndarray
    shape: tuple[int, int]


# --------------------------------------------------------------------------
# Input handling: singular values only.
# --------------------------------------------------------------------------


def _as_float_tensor(matrix: Any) -> torch.Tensor:
    """``matrix`` as a detached 2-D real floating tensor (no copy when possible)."""
    if isinstance(matrix, torch.Tensor):
        tensor = matrix.detach()
    else:
        array = np.asarray(matrix)
        if array.dtype.kind not in "fiub":
            raise ValueError(f"expected a real numeric matrix, got a numpy array of dtype {array.dtype}")
        if array.dtype.kind != "f" or array.dtype.itemsize < 4:
            array = array.astype(np.float32)
        elif not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))  # torch needs native byte order
        # torch.from_numpy needs positive strides and warns on read-only memory.
        if not (array.flags.c_contiguous or array.flags.f_contiguous) or not array.flags.writeable:
            array = np.array(array, order="C")
        tensor = torch.from_numpy(array)
    if tensor.is_complex():
        raise ValueError(f"expected a real matrix, got a complex tensor of dtype {tensor.dtype}")
    if tensor.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(f"expected a non-empty matrix, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in (torch.float32, torch.float64):
        # half/bfloat16 have no SVD kernels; integers and bools are promoted too.
        tensor = tensor.to(torch.float32)
    return tensor


# Smallest side from which float32 singular values come from the float64 Gram matrix
# (below it the SVD takes milliseconds and is kept).
GRAM_MIN_SIDE = 256


def _singular_values(tensor: torch.Tensor) -> tuple[np.ndarray, float]:
    """Singular values (float64, descending) and ``||Y||_F^2`` of a checked 2-D tensor.

    Raises
    ------
    ValueError
        For non-finite values.
    """
    shape = tuple(tensor.shape)
    # ||Y||_F^2 straight from the matrix: one cheap pass that also detects
    # NaN/inf (they propagate into the sum) before LAPACK/cuSOLVER sees them.  In float64:
    # squares of float32 entries overflow above ~1e19 and underflow below ~1e-23, where the
    # singular values are still exact and would then disagree with it.
    frob2 = float(torch.linalg.vector_norm(tensor, dtype=torch.float64).square())
    if not math.isfinite(frob2):
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"matrix of shape {shape} contains non-finite values (NaN or inf)")
        raise ValueError(f"matrix of shape {shape} is too large in magnitude: ||Y||_F^2 overflows float64")
    # Singular values are those of Y^T too; LAPACK's SVD is several times
    # faster on the tall orientation (rows >= cols), which .mT gives as a free view.
    tall = tensor if shape[0] >= shape[1] else tensor.mT
    if tensor.dtype == torch.float32 and min(shape) >= GRAM_MIN_SIDE:
        # Large float32 matrices (an FC layer's 4096 x 9216 weight): the eigenvalues of the
        # float64 Gram matrix Y^T Y (L x L), square-rooted. One matrix product (all threads)
        # and a symmetric eigensolver are 6-7x faster here than the SVD (54 s -> 8 s for
        # 4096 x 9216, benchmarks/RESULTS.md "Threads"), and no less accurate than a float32
        # SVD: the float64 Gram's error, about eps64 * gamma_1^2, puts every singular value
        # within ~1e-8 gamma_1 of the truth, below float32's own eps32 * gamma_1 ~ 1e-7.
        wide64 = tall.mT.to(torch.float64)
        gram = wide64 @ wide64.mT  # (L, L)
        with lapack_threads():
            eig = torch.linalg.eigvalsh(gram)
        gammas = eig.clamp_min(0).sqrt().flip(0).to(device="cpu").numpy()
        return gammas, frob2
    with lapack_threads():  # one thread: see threads.py
        gammas = torch.linalg.svdvals(tall).to(dtype=torch.float64, device="cpu").numpy()
    return gammas, frob2


def _check_h(H: int | None, L: int) -> int:
    if H is None:
        return L
    if isinstance(H, bool) or not isinstance(H, (int, np.integer)) or not 1 <= H <= L:
        raise ValueError(f"H must be an integer in [1, min(shape)] = [1, {L}], got {H!r}")
    return int(H)


def _check_positive(name: str, value: float | None, *, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _result(
    gammas: np.ndarray, sigma2: float, threshold: float, estimates: np.ndarray, shape: tuple[int, int]
) -> VBMFResult:
    kept = np.ascontiguousarray(estimates, dtype=np.float64)
    kept.setflags(write=False)
    gammas.setflags(write=False)
    return VBMFResult(
        rank=int(kept.size),
        singular_values=kept,
        sigma2=float(sigma2),
        threshold=float(threshold),
        observed_singular_values=gammas,
        shape=shape,
    )


# --------------------------------------------------------------------------
# Scalar search helper.
# --------------------------------------------------------------------------


def _minimise_log_grid(objective: Callable[[np.ndarray], np.ndarray], log_low: float, log_high: float) -> float:
    """Minimiser of ``objective(log_sigma2_array)`` on ``[log_low, log_high]``.

    A dense global grid, then repeated local grids around the best point, each
    evaluated in one vectorised call (cheaper than a scalar optimiser's Python
    loop, and not misled by the objective's several local minima). Each
    refinement shrinks the bracket ``(FINE_POINTS - 1) / 2``-fold.
    """
    if not log_high > log_low:
        return log_high
    fine_steps = np.arange(_FINE_GRID_POINTS) / (_FINE_GRID_POINTS - 1)  # (P,) in [0, 1]
    grid = np.linspace(log_low, log_high, _COARSE_GRID_POINTS)
    for _ in range(_MAX_REFINEMENTS):
        best = int(np.argmin(objective(grid)))
        low, high = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
        if high - low < _LOG_SIGMA2_TOLERANCE:
            break
        grid = low + (high - low) * fine_steps
    return float(grid[best])


# --------------------------------------------------------------------------
# Empirical VB (EVB).
# --------------------------------------------------------------------------


def _tau_lower(alpha: float) -> float:
    """``tau_lower(alpha)``: the positive root of ``Psi_1`` in ``tau`` (NIPS'12 / JMLR'15).

    ``f(tau) = tau * (Phi(tau) + Phi(tau / alpha)) = log(1 + tau) + alpha log(1 + tau / alpha) - tau``
    with ``Phi(z) = log(1 + z) / z - 1/2``. ``f`` is concave, zero at 0 with
    slope 1, so it has one positive root, which lies in (sqrt(alpha), 3). The
    papers quote ``tau_lower ~= 2.5129 sqrt(alpha)``, exact at ``alpha = 1`` but
    3% low at ``alpha = 1/9`` (512 x 4608) and 25% low at ``alpha = 1e-3``
    (the threshold it gives is up to ~1% low); here it is only the start of
    Newton's method (a few iterations, cheaper than a bracketing solver), with
    ``brentq`` as the fallback.
    """

    def f(tau: float) -> float:
        return math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau

    def slope(tau: float) -> float:
        return 1.0 / (1.0 + tau) + alpha / (alpha + tau) - 1.0

    tau = _TAU_LOWER_APPROX * math.sqrt(alpha)
    for _ in range(_NEWTON_MAX_ITERATIONS):
        step = f(tau) / slope(tau)
        tau -= step
        if abs(step) <= _NEWTON_RELATIVE_TOLERANCE * tau:
            if math.sqrt(alpha) < tau < _TAU_BRACKET_HIGH:
                return tau
            break
    return brentq(f, math.sqrt(alpha), _TAU_BRACKET_HIGH, xtol=1e-14, rtol=1e-14)


def _tau_of_x(x: np.ndarray, alpha: float) -> np.ndarray:
    """Inverse of ``x = (1 + tau)(1 + alpha / tau)`` on ``tau >= sqrt(alpha)`` (NIPS'12 / JMLR'15)."""
    shifted = x - (1.0 + alpha)
    return 0.5 * (shifted + np.sqrt(np.maximum(shifted * shifted - 4.0 * alpha, 0.0)))


def _psi1(x: np.ndarray, alpha: float) -> np.ndarray:
    """``Psi_1(x) = log(tau + 1) + alpha log(tau / alpha + 1) - tau`` with ``tau = tau(x)`` (JMLR'15).

    ``M * Psi_1(x_h)`` is twice the free energy of a retained EVB component
    relative to a pruned one; it is negative exactly when ``x_h > x_lower``.
    """
    tau = _tau_of_x(x, alpha)
    return np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau


def _evb_estimates(gammas: np.ndarray, sigma2: float, L: int, M: int) -> np.ndarray:
    """EVB shrinkage ``gamma_breve^EVB_h`` of retained singular values (JMLR'13, EVB solution).

    ``gamma_breve = gamma/2 * (1 - (L+M) s/gamma^2 + sqrt((1 - (L+M) s/gamma^2)^2 - 4 L M s^2/gamma^4))``
    with ``s = sigma2``; real and in ``(0, gamma)`` above the EVB threshold.
    """
    ratio = sigma2 / (gammas * gammas)
    first = 1.0 - (L + M) * ratio
    disc = np.maximum(first * first - 4.0 * L * M * ratio * ratio, 0.0)
    return 0.5 * gammas * (first + np.sqrt(disc))


def _evb_noise_objective(
    log_sigma2: np.ndarray, gammas2: np.ndarray, frob2: float, L: int, M: int, x_lower: float
) -> np.ndarray:
    """``2 F(sigma2) / (L M)`` of EVB up to a constant, vectorised over ``log_sigma2`` (JMLR'15).

    The free energy with the factor and prior variances at their optimum is
    ``L M log sigma2 + ||Y||^2 / sigma2 + M sum_{h <= H, x_h > x_lower} Psi_1(x_h)`` up to
    constants (the objective ``Omega`` of JMLR'15 written with ``||Y||_F^2``
    instead of ``sum_h Psi_0``, which avoids ``log gamma_h`` of zero singular
    values). Scaled by ``1 / (L M)`` with ``sigma2`` relative to
    ``||Y||^2 / (L M)`` so that values are O(1) and differences resolvable.

    ``gammas2`` holds only the squared singular values that can be retained
    somewhere in the search interval (``h <= H`` and above the threshold at
    the lower bound); the others contribute 0.
    """
    sigma2 = np.exp(log_sigma2)  # (G,)
    base = np.log(sigma2 * (L * M / frob2)) + frob2 / (L * M * sigma2)
    if gammas2.size == 0:
        return base
    x = gammas2[:, None] / (M * sigma2[None, :])  # (C, G)
    retained = x > x_lower
    psi1 = np.where(retained, _psi1(np.maximum(x, x_lower), L / M), 0.0)
    return base + psi1.sum(axis=0) / L


def _evb_sigma2_bounds(
    gammas: np.ndarray, frob2: float, L: int, M: int, H: int, x_lower: float
) -> tuple[float, float, int]:
    """Bounds ``[lower, upper]`` holding the EVB noise-variance estimate (JMLR'15 / NIPS'12).

    ``upper = ||Y||_F^2 / (L M)``: above it, every term of the objective
    increases with ``sigma2``.

    ``H_bar = ceil(L / (1 + alpha)) - 1`` bounds the number of components that
    EVB can retain at its noise-variance estimate, and
    ``lower = max(gamma_{H_bar+1}^2 / (M x_lower), sum_{h > H_bar} gamma_h^2 / (M (L - H_bar)))``.
    Both follow from the stationarity condition ``d Omega / d sigma2 = 0``,
    which simplifies, with ``x Psi_1'(x) = -tau(x)``, to
    ``L M sigma2 = ||Y||^2 - M sigma2 sum_{retained} tau_h`` (derived here).
    The first term needs component ``H_bar + 1`` to be pruned by the
    threshold rather than by the cap ``H``, so it is used only when
    ``H_bar < H``; with ``H < H_bar`` the second term uses ``H`` instead.

    Returns
    -------
    lower, upper : float
    cap : int
        ``min(H_bar, H)``: the most components the estimate can retain.
    """
    upper = frob2 / (L * M)
    h_bar = math.ceil(L / (1.0 + L / M)) - 1
    cap = min(h_bar, H)
    tail = gammas[cap:]
    lower = float(np.dot(tail, tail)) / (M * (L - cap)) if cap < L else 0.0
    if h_bar < H:
        lower = max(lower, float(gammas[h_bar]) ** 2 / (M * x_lower))
    return max(lower, upper * _MIN_RELATIVE_SIGMA2), upper, cap


def _spectrum(matrix, H: int | None):
    """Validated input of :func:`evbmf` / :func:`vbmf`: shape, L <= M, H, singular values, ||Y||^2."""
    tensor = _as_float_tensor(matrix)
    shape = (int(tensor.shape[0]), int(tensor.shape[1]))
    L, M = min(shape), max(shape)  # the papers' L <= M, whatever the orientation
    H = _check_h(H, L)
    gammas, frob2 = _singular_values(tensor)
    return shape, L, M, H, gammas, frob2


def evbmf(matrix: Any, *, sigma2: float | None = None, H: int | None = None) -> VBMFResult:
    """Empirical variational Bayesian matrix factorisation (global analytic solution).

    The prior variances ``c_a_h^2, c_b_h^2`` are estimated per component, so
    the only free quantity is the noise variance. Component ``h <= H`` is
    retained iff ``gamma_h > gamma_lower^EVB = sqrt(M sigma2 x_lower)`` with
    ``x_lower = (1 + tau_lower)(1 + alpha / tau_lower)``, ``alpha = L / M``
    ([2], [3]); its estimate is the EVB shrinkage ``gamma_breve_h^EVB`` ([1]).

    Parameters
    ----------
    matrix : torch.Tensor or numpy.ndarray
        2-D, any orientation (the maths uses ``L = min(shape)``,
        ``M = max(shape)``), any device and floating dtype; tensors that
        require grad are detached. Half precision and integer inputs are
        promoted to float32.
    sigma2 : float, optional
        Noise variance. ``None`` estimates it by minimising the free energy
        over the analytic interval of [3] (see ``_evb_sigma2_bounds``).
    H : int, optional
        Most components to retain, ``1 <= H <= min(shape)``; default ``min(shape)``.

    Returns
    -------
    VBMFResult

    Raises
    ------
    ValueError
        For a non-2-D, empty, complex or non-finite matrix, or a bad ``sigma2``/``H``.

    References
    ----------
    .. [1] Nakajima, Sugiyama, Babacan, Tomioka, "Global analytic solution of
       fully-observed variational Bayesian matrix factorization", JMLR 14, 2013.
    .. [2] Nakajima, Tomioka, Sugiyama, Babacan, "Perfect dimensionality
       recovery by variational Bayesian PCA", NIPS 2012.
    .. [3] Nakajima, Tomioka, Sugiyama, Babacan, "Condition for perfect
       dimensionality recovery by variational Bayesian PCA", JMLR 16, 2015.
    """
    sigma2 = _check_positive("sigma2", sigma2, optional=True)
    shape, L, M, H, gammas, frob2 = _spectrum(matrix, H)
    alpha = L / M
    tau_lower = _tau_lower(alpha)
    x_lower = (1.0 + tau_lower) * (1.0 + alpha / tau_lower)  # NIPS'12 / JMLR'15: x_lower

    if sigma2 is None:
        if frob2 == 0.0:
            # The zero matrix: nothing to explain, the free energy has no minimiser.
            return _result(gammas, 0.0, 0.0, gammas[:0], shape)
        lower, upper, cap = _evb_sigma2_bounds(gammas, frob2, L, M, H, x_lower)
        gammas2 = gammas[:cap] ** 2
        # Only components above the threshold at the smallest sigma2 searched
        # ever enter the objective.
        gammas2 = gammas2[gammas2 > M * x_lower * lower]
        if cap == 0 or gammas2.size == 0:
            sigma2 = upper  # no component can be retained: the ML noise variance
        else:
            log_sigma2 = _minimise_log_grid(
                lambda log_s2: _evb_noise_objective(log_s2, gammas2, frob2, L, M, x_lower),
                math.log(lower),
                math.log(upper),
            )
            sigma2 = math.exp(log_sigma2)

    threshold = math.sqrt(M * sigma2 * x_lower)  # NIPS'12 / JMLR'15: gamma_lower^EVB
    rank = int(np.count_nonzero(gammas[:H] > threshold))
    estimates = _evb_estimates(gammas[:rank], sigma2, L, M)
    logger.debug("EVBMF %s: rank %d, sigma2 %.4g, threshold %.4g", shape, rank, sigma2, threshold)
    return _result(gammas, sigma2, threshold, estimates, shape)


def estimate_rank(matrix: Any) -> int:
    """The EVBMF rank of ``matrix`` (noise variance estimated); 0 means noise only.

    Parameters
    ----------
    matrix : torch.Tensor or numpy.ndarray
        2-D, any orientation, device and floating dtype (see :func:`evbmf`).

    Returns
    -------
    int
        Number of components retained by empirical VBMF, in ``[0, min(shape))``.

    Raises
    ------
    ValueError
        For a non-2-D, empty, complex or non-finite matrix.

    References
    ----------
    .. [1] Nakajima, Sugiyama, Babacan, Tomioka, "Global analytic solution of
       fully-observed variational Bayesian matrix factorization", JMLR 14, 2013.
    .. [2] Nakajima, Tomioka, Sugiyama, Babacan, "Perfect dimensionality
       recovery by variational Bayesian PCA", NIPS 2012.
    """
    return evbmf(matrix).rank


# --------------------------------------------------------------------------
# VB with a given prior (c_a c_b).
# --------------------------------------------------------------------------


def _positive_root(a, b, c):
    """Positive root of ``a z^2 + b z - c = 0`` for ``a, c > 0``, without cancellation."""
    root = np.sqrt(b * b + 4.0 * a * c)
    return np.where(b >= 0.0, 2.0 * c / (b + root), (root - b) / (2.0 * a))


def _vb_threshold(sigma2, L: int, M: int, cacb: float):
    """``gamma_lower^VB`` (JMLR'13, VB threshold).

    ``gamma_lower^2 = sigma2 (A + sqrt(A^2 - L M))`` with
    ``A = (L + M) / 2 + sigma2 / (2 c_a^2 c_b^2)``; it is where the VB
    shrinkage ``gamma_breve^VB`` crosses zero.
    """
    half_sum = 0.5 * (L + M) + sigma2 / (2.0 * cacb * cacb)
    return np.sqrt(sigma2 * (half_sum + np.sqrt(half_sum * half_sum - L * M)))


def _vb_shrinkage_factor(gammas, sigma2, L: int, M: int, cacb: float):
    """``t = 1 - gamma_breve^VB / gamma`` (JMLR'13, VB shrinkage estimator).

    ``gamma_breve^VB = gamma (1 - sigma2 / (2 gamma^2) (M + L + sqrt((M - L)^2 + 4 gamma^2 / (c_a c_b)^2)))``.
    """
    root = np.sqrt((M - L) ** 2 + 4.0 * gammas * gammas / (cacb * cacb))
    return sigma2 / (2.0 * gammas * gammas) * (M + L + root), root


def _vb_retained_free_energy(gammas, sigma2, L: int, M: int, cacb: float):
    """Twice the free energy of a retained VB component (derived here).

    At the non-zero stationary point (with ``c_a = c_b``; only ``c_a c_b``
    matters) the posterior variances of ``a_h`` and ``b_h`` are
    ``c_a^2 P`` and ``c_b^2 Q`` with ``P = t - L sigma2 / gamma^2``,
    ``Q = t - M sigma2 / gamma^2`` and ``P Q = sigma2^2 / (gamma c_a c_b)^2``;
    with ``r = gamma gamma_hat / sigma2`` the free energy
    ``M log(c_a^2/sigma_a^2) + L log(c_b^2/sigma_b^2) + <|a|^2>/c_a^2 + <|b|^2>/c_b^2 - (L+M)
    + (<|a|^2><|b|^2> - 2 gamma a b) / sigma2`` becomes the expression below.
    """
    t, root = _vb_shrinkage_factor(gammas, sigma2, L, M, cacb)
    unit = sigma2 / (gammas * gammas)
    p = 0.5 * unit * (M - L + root)
    # Q = unit/2 (L - M + root), written without cancellation when M >> L.
    w = 4.0 * gammas * gammas / (cacb * cacb)
    q = 0.5 * unit * w / (root + (M - L))
    r = (1.0 - t) / unit
    return (
        -M * np.log(p)
        - L * np.log(q)
        + (r + M) * p
        + (r + L) * q
        - (L + M)
        - 2.0 * r
        + (r + M) * (r + L) * unit
    )


def _vb_null_free_energy(sigma2, L: int, M: int, cacb: float):
    """Twice the free energy of a pruned VB component (``a_h = b_h = 0``; derived here).

    With ``k = (c_a c_b)^2 / sigma2`` the posterior variances are ``c_a^2 P``
    and ``c_b^2 Q``, where ``1/P = 1 + L k Q`` and ``1/Q = 1 + M k P``; so
    ``k L Q^2 + (1 + k (M - L)) Q - 1 = 0`` (and likewise for ``P``), and the
    free energy is ``-M log P - L log Q + M P + L Q - (L + M) + L M k P Q > 0``.
    """
    k = cacb * cacb / sigma2
    q = _positive_root(k * L, 1.0 + k * (M - L), 1.0)
    p = _positive_root(k * M, 1.0 + k * (L - M), 1.0)
    return -M * np.log(p) - L * np.log(q) + M * p + L * q - (L + M) + L * M * k * p * q


def _vb_noise_objective(log_sigma2, gammas, frob2: float, L: int, M: int, H: int, cacb: float):
    """``2 F(sigma2) / (L M)`` of VB with a fixed ``c_a c_b``, up to a constant (derived here).

    ``L M log sigma2 + ||Y||^2 / sigma2 + sum_{h <= H} 2 F_h`` where ``F_h`` is
    the retained or the pruned free energy depending on the VB threshold.
    """
    sigma2 = np.exp(log_sigma2)  # (G,)
    total = L * M * np.log(sigma2 * (L * M / frob2)) + frob2 / sigma2 + H * _vb_null_free_energy(sigma2, L, M, cacb)
    g = gammas[:H, None]  # (H, 1)
    retained = g > _vb_threshold(sigma2, L, M, cacb)[None, :]  # (H, G)
    g_safe = np.where(retained, g, np.inf)  # pruned: evaluated far away, then masked
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        gain = _vb_retained_free_energy(g_safe, sigma2[None, :], L, M, cacb) - _vb_null_free_energy(
            sigma2, L, M, cacb
        )[None, :]
    total = total + np.where(retained, gain, 0.0).sum(axis=0)
    return total / (L * M)


def vbmf(matrix: Any, *, cacb: float, sigma2: float | None = None, H: int | None = None) -> VBMFResult:
    """Variational Bayesian matrix factorisation with a given prior (global analytic solution).

    Component ``h <= H`` is retained iff ``gamma_h > gamma_lower^VB`` and then
    estimated by the VB shrinkage ``gamma_breve_h^VB`` ([1]); a larger
    ``cacb`` (a weaker prior) lowers the threshold and shrinks less.

    Parameters
    ----------
    matrix : torch.Tensor or numpy.ndarray
        2-D, any orientation, device and floating dtype (see :func:`evbmf`).
    cacb : float
        Product ``c_a c_b`` of the prior standard deviations of the factor
        columns (the same for every component); only the product matters.
    sigma2 : float, optional
        Noise variance. ``None`` estimates it by minimising the VB free energy
        over ``sigma2``: a log-grid search from ``1e-12 ||Y||^2 / (L M)`` up to
        ``||Y||^2 / (L M) + H c_a^2 c_b^2``. The upper end holds every
        stationary point: there ``L M sigma2 = ||Y||^2 + sum_h D_h`` with
        ``D_h = <|a_h|^2><|b_h|^2> - 2 gamma_h gamma_hat_h``, which is at most
        ``L M c_a^2 c_b^2`` for a pruned component (exactly) and for a
        retained one (checked numerically, not proved here).
    H : int, optional
        Most components to retain, ``1 <= H <= min(shape)``; default ``min(shape)``.

    Returns
    -------
    VBMFResult

    Raises
    ------
    ValueError
        For a non-2-D, empty, complex or non-finite matrix, or a bad ``cacb``,
        ``sigma2`` or ``H``.

    References
    ----------
    .. [1] Nakajima, Sugiyama, Babacan, Tomioka, "Global analytic solution of
       fully-observed variational Bayesian matrix factorization", JMLR 14, 2013.
    """
    cacb = _check_positive("cacb", cacb, optional=False)
    sigma2 = _check_positive("sigma2", sigma2, optional=True)
    shape, L, M, H, gammas, frob2 = _spectrum(matrix, H)

    if sigma2 is None:
        if frob2 == 0.0:
            return _result(gammas, 0.0, 0.0, gammas[:0], shape)
        upper = frob2 / (L * M) + H * cacb * cacb
        lower = frob2 / (L * M) * _MIN_RELATIVE_SIGMA2
        log_sigma2 = _minimise_log_grid(
            lambda log_s2: _vb_noise_objective(log_s2, gammas, frob2, L, M, H, cacb),
            math.log(lower),
            math.log(upper),
        )
        sigma2 = math.exp(log_sigma2)

    threshold = float(_vb_threshold(sigma2, L, M, cacb))
    rank = int(np.count_nonzero(gammas[:H] > threshold))
    kept = gammas[:rank]
    t, _ = _vb_shrinkage_factor(kept, sigma2, L, M, cacb)
    estimates = kept * (1.0 - t)
    logger.debug("VBMF %s (cacb %.4g): rank %d, sigma2 %.4g", shape, cacb, rank, sigma2)
    return _result(gammas, sigma2, threshold, estimates, shape)
