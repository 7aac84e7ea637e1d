"""Low-rank replacements for convolution and fully connected layers.

Each conversion is a pure function ``layer -> nn.Module`` that reads every geometry
field from the layer it is given, runs under ``torch.no_grad()`` and returns a module
on the layer's device and dtype:

* :func:`tucker_decompose_conv` -- Tucker-2 (Kim et al. 2015): 1x1 conv S->R_in, an
  R_in->R_out core conv with the layer's kernel/stride/padding/dilation, 1x1 conv
  R_out->T carrying the bias.
* :func:`cp_decompose_conv` -- CP (Lebedev et al. 2014): 1x1 conv S->R, depthwise
  (kh, 1) conv, depthwise (1, kw) conv, 1x1 conv R->T carrying the bias.
* :func:`svd_decompose_linear` -- truncated SVD of a Linear layer (Girshick 2015).
* :func:`diagonal_decompose_linear` -- a wrapped banded-diagonal Linear layer.

:func:`decompose_model` applies a *plan* (layer name -> method and ranks, chosen by
:func:`ranks.plan_decomposition` or written by a user; checked whole first by
:func:`check_plan`) in place and returns one :class:`LayerReport` per plan entry.  No
rank is chosen here.  Every replacement module carries a :meth:`plan_entry` (method and
ranks) so that a saved model can be rebuilt from its architecture and a plan
(:func:`model_plan`, :func:`apply_plan`) without ever pickling a module.

The factorizations are written in plain torch rather than with tensorly's
``partial_tucker``/``parafac``: the same algorithms (HOSVD + HOOI, CP-ALS), but
computed through small Gram matrices and Khatri-Rao products that never form large
unfoldings, which makes them much faster on a CPU (benchmarks/bench_library.py; figures in
benchmarks/RESULTS.md).
tensorly is used in the tests as the reference.

References
----------
.. [1] Kim, Y.-D. et al. "Compression of Deep Convolutional Neural Networks for Fast
   and Low Power Mobile Applications", ICLR 2016, arXiv:1511.06530.
.. [2] Lebedev, V. et al. "Speeding-up Convolutional Neural Networks Using Fine-tuned
   CP-Decomposition", ICLR 2015, arXiv:1412.6553.
.. [3] Nakajima, S. et al. "Global analytic solution of fully-observed variational
   Bayesian matrix factorization", JMLR 14, 2013.
.. [4] Girshick, R. "Fast R-CNN", ICCV 2015 (truncated SVD of fc layers).
.. [5] De Lathauwer, L. et al. "On the best rank-1 and rank-(R1,...,RN) approximation
   of higher-order tensors", SIAM J. Matrix Anal. Appl. 21(4), 2000 (HOOI).
.. [6] Banner, R., Nahshan, Y., Soudry, D. "Post training 4-bit quantization of
   convolutional networks for rapid-deployment", NeurIPS 2019 (per-channel correction
   of an approximated weight's statistics, here its norm: :func:`restore_filter_norms`).
.. [7] Zhang, X., Zou, J., He, K., Sun, J. "Accelerating Very Deep Convolutional Networks
   for Classification and Detection", TPAMI 38(10), 2016 (asymmetric reconstruction of
   each layer's response on data).
.. [8] Izenman, A. J. "Reduced-rank regression for the multivariate linear model", J.
   Multivariate Analysis 5, 1975.
.. [9] Wang, X. et al. "SVD-LLM: Truncation-aware Singular Value Decomposition for Large
   Language Model Compression", ICLR 2025; BALF, arXiv:2509.25136 (SVD in a whitened space).
.. [10] Nagel, M. et al. "Data-Free Quantization Through Weight Equalization and Bias
   Correction", ICCV 2019 (matching a compressed layer's mean output by its bias).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

import calibration as calibration_data
import report
from calibration import LayerStats
from diagonal import DiagonalLinear, diagonal_decompose_linear
from threads import lapack_threads

logger = logging.getLogger(__name__)

__all__ = [
    "TuckerConv2d",
    "CPConv2d",
    "SVDLinear",
    "SVDConv2d",
    "DiagonalLinear",
    "LayerReport",
    "CPDiverged",
    "tucker_decompose_conv",
    "cp_decompose_conv",
    "svd_decompose_linear",
    "svd_decompose_conv1x1",
    "matrix_shape",
    "replace_layer",
    "diagonal_decompose_linear",
    "decompose_model",
    "candidate_layers",
    "check_plan",
    "cp_fallback_ranks",
    "cp_rank_limit",
    "count_params",
    "macs_at",
    "model_plan",
    "apply_plan",
    "empty_replacement",
    "CONV_METHODS",
    "FC_METHODS",
]

CONV_METHODS = ("tucker", "cp", "none")
FC_METHODS = ("none", "svd", "diagonal")

# HOOI refinement steps after the HOSVD start.  Two steps bring the error to within
# 0.1% of tensorly's converged HOOI on VGG16 layers (benchmarks/bench_library.py).
TUCKER_HOOI_ITERS = 2
# CP-ALS iterations, and the relative error change that counts as converged.
CP_MAX_ITER = 100
CP_TOL = 1e-7
# A CP component whose norm exceeds this multiple of the weight's norm is a sign of
# degeneracy: ALS components that diverge while cancelling each other [2].
CP_DEGENERACY_RATIO = 1e3
# How many fresh random starts CP gets after a degenerate or non-finite result,
# before the layer falls back to Tucker-2.
CP_RETRIES = 2
#: restore_filter_norms scales a filter up at most this much: the most for which the corrected
#: filter is never further from the original than the zero filter (see its docstring).
MAX_FILTER_SCALE = 2.0


# --------------------------------------------------------------------------- modules
class TuckerConv2d(nn.Sequential):
    """Tucker-2 factorized convolution: 1x1 (S->R_in), core (R_in->R_out), 1x1 (R_out->T).

    Built empty from the original conv's geometry; :func:`tucker_decompose_conv` fills
    the weights.  ``ranks`` is ``(R_out, R_in)``, the order of
    :func:`ranks.estimate_tucker_ranks`.
    """

    method = "tucker"

    def __init__(self, conv: nn.Conv2d, ranks: Sequence[int]) -> None:
        rank_out, rank_in = (int(r) for r in ranks)
        _check_rank("Tucker rank_out", rank_out, conv.out_channels)
        _check_rank("Tucker rank_in", rank_in, conv.in_channels)
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        super().__init__(
            nn.Conv2d(conv.in_channels, rank_in, 1, bias=False, **factory),
            nn.Conv2d(
                rank_in,
                rank_out,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                padding_mode=conv.padding_mode,
                bias=False,
                **factory,
            ),
            nn.Conv2d(rank_out, conv.out_channels, 1, bias=conv.bias is not None, **factory),
        )
        self.ranks = (rank_out, rank_in)

    def plan_entry(self) -> dict:
        return {"method": self.method, "ranks": list(self.ranks)}


class CPConv2d(nn.Sequential):
    """CP factorized convolution: 1x1 (S->R), depthwise (kh,1), depthwise (1,kw), 1x1 (R->T).

    Each depthwise conv takes its own axis's stride, padding and dilation: the
    vertical one ``(s_h, 1)``, ``(p_h, 0)``, ``(d_h, 1)``, the horizontal one
    ``(1, s_w)``, ``(0, p_w)``, ``(1, d_w)``.  String padding ('same'/'valid') is
    passed to both, which pads each axis by its own kernel extent, as the original
    conv does.  Padding modes other than zeros commute with the separable convs
    because the 1x1 convs before them act per pixel.
    """

    method = "cp"

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        rank = int(rank)
        if rank < 1:
            raise ValueError(f"CP rank must be >= 1, got {rank}")
        kh, kw = conv.kernel_size
        sh, sw = conv.stride
        dh, dw = conv.dilation
        if isinstance(conv.padding, str):
            pad_v = pad_h = conv.padding
        else:
            pad_v, pad_h = (conv.padding[0], 0), (0, conv.padding[1])
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        super().__init__(
            nn.Conv2d(conv.in_channels, rank, 1, bias=False, **factory),
            nn.Conv2d(rank, rank, (kh, 1), stride=(sh, 1), padding=pad_v, dilation=(dh, 1),
                      groups=rank, padding_mode=conv.padding_mode, bias=False, **factory),
            nn.Conv2d(rank, rank, (1, kw), stride=(1, sw), padding=pad_h, dilation=(1, dw),
                      groups=rank, padding_mode=conv.padding_mode, bias=False, **factory),
            nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **factory),
        )
        self.rank = rank

    def plan_entry(self) -> dict:
        return {"method": self.method, "rank": self.rank}


class SVDLinear(nn.Sequential):
    """Truncated-SVD Linear layer: Linear(M->r, no bias) then Linear(r->N, bias)."""

    method = "svd"

    def __init__(self, linear: nn.Linear, rank: int) -> None:
        rank = int(rank)
        _check_rank("SVD rank", rank, min(linear.in_features, linear.out_features))
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        super().__init__(
            nn.Linear(linear.in_features, rank, bias=False, **factory),
            nn.Linear(rank, linear.out_features, bias=linear.bias is not None, **factory),
        )
        self.rank = rank

    def plan_entry(self) -> dict:
        return {"method": self.method, "rank": self.rank}


class SVDConv2d(nn.Sequential):
    """Truncated-SVD 1x1 convolution: Conv2d(S->r, 1x1, the layer's stride and padding, no bias)
    then Conv2d(r->T, 1x1, bias).

    A 1x1 convolution is a Linear layer applied at every pixel, so its factorization is the
    Linear one (:func:`svd_decompose_linear`).  The first conv carries the stride and the
    padding: it has no bias, so a padded pixel is 0 after it and the bias after the second,
    as in the original.
    """

    method = "svd"

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        rank = int(rank)
        if tuple(conv.kernel_size) != (1, 1) or conv.groups != 1:
            raise ValueError(f"SVDConv2d needs a 1x1 convolution with groups=1, got kernel {tuple(conv.kernel_size)} "
                             f"and groups={conv.groups}")
        _check_rank("SVD rank", rank, min(conv.in_channels, conv.out_channels))
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        super().__init__(
            nn.Conv2d(conv.in_channels, rank, 1, stride=conv.stride, padding=conv.padding,
                      padding_mode=conv.padding_mode, bias=False, **factory),
            nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **factory),
        )
        self.rank = rank

    def plan_entry(self) -> dict:
        return {"method": self.method, "rank": self.rank}


DECOMPOSED_TYPES = (TuckerConv2d, CPConv2d, SVDLinear, SVDConv2d, DiagonalLinear)


def _check_rank(what: str, rank: int, limit: int) -> None:
    if not 1 <= rank <= limit:
        raise ValueError(f"{what} must be in [1, {limit}], got {rank}")


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    # Factorize half-precision weights in float32; keep float64 as it is.
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _check_plain_conv(conv: nn.Module) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"grouped convolutions (groups={conv.groups}) are not decomposed")


# ---------------------------------------------------------------------------- helpers
def _unfold(weight: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: (shape[mode], prod(other dims))."""
    return weight.movedim(mode, 0).reshape(weight.shape[mode], -1)


# --------------------------------------------------------------------------- Tucker-2
def _leading_eigvecs(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading left singular vectors of ``matrix`` (rows x cols).

    Computed from the small ``rows x rows`` Gram matrix with a float64 eigh: the
    same subspace as a thin SVD for a fraction of its cost when cols >> rows.
    """
    gram = (matrix @ matrix.T).double()
    with lapack_threads():
        _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vecs[:, -rank:].flip(-1).to(matrix.dtype)


RANDOMIZED_OVERSAMPLE = 16   # extra columns of the randomized range finder (Halko et al. 2011)
RANDOMIZED_POWER_ITERS = 4   # power iterations: enough for the slowly decaying spectra of FC weights


def _leading_subspace(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal basis (rows x rank) of the leading left singular subspace.

    For a rank far below ``rows`` the randomized range finder with power
    iterations (Halko, Martinsson & Tropp 2011) costs ``O(rows * cols * rank)``
    instead of the Gram's ``O(rows^2 * cols)``, which matters for wide FC layers at low
    rank (VGG16's fc6, 4096 x 25088).  Near full rank the exact
    Gram eigh is both cheaper and exact, so it is used there.
    """
    rows = matrix.shape[0]
    width = rank + RANDOMIZED_OVERSAMPLE
    # Each power iteration costs two (rows x cols x width) products; the Gram costs one with width=rows.
    if 2 * (RANDOMIZED_POWER_ITERS + 1) * width >= rows:
        return _leading_eigvecs(matrix, rank)
    gen = torch.Generator(device=matrix.device).manual_seed(0)  # repeatable decompositions
    probe = torch.randn(matrix.shape[1], width, generator=gen, device=matrix.device, dtype=matrix.dtype)
    with lapack_threads():
        basis = torch.linalg.qr(matrix @ probe).Q                        # (rows, width)
    for _ in range(RANDOMIZED_POWER_ITERS):
        side = matrix.T @ basis                                          # (cols, width)
        with lapack_threads():
            side = torch.linalg.qr(side).Q
        basis = matrix @ side
        with lapack_threads():
            basis = torch.linalg.qr(basis).Q
    # Rotate inside the subspace so the first ``rank`` columns are the leading directions.
    small = basis.T @ matrix                                             # (width, cols)
    return basis @ _leading_eigvecs(small, rank)


def tucker2(weight: torch.Tensor, ranks: Sequence[int], *, n_iter: int = TUCKER_HOOI_ITERS):
    """Tucker-2 of a ``(T, S, kh, kw)`` tensor: HOSVD start, then HOOI steps.

    Returns
    -------
    core : (R_out, R_in, kh, kw) tensor
    u_out : (T, R_out) tensor with orthonormal columns
    u_in : (S, R_in) tensor with orthonormal columns
    """
    rank_out, rank_in = ranks
    u_out = _leading_eigvecs(_unfold(weight, 0), rank_out)
    u_in = _leading_eigvecs(_unfold(weight, 1), rank_in)
    for _ in range(n_iter):
        # HOOI [5]: each factor from the weight projected on the other factor.
        u_out = _leading_eigvecs(_unfold(torch.einsum("tshw,si->tihw", weight, u_in), 0), rank_out)
        u_in = _leading_eigvecs(_unfold(torch.einsum("tshw,to->oshw", weight, u_out), 1), rank_in)
    core = torch.einsum("tshw,to,si->oihw", weight, u_out, u_in)
    return core, u_out, u_in


def tucker_decompose_conv(conv: nn.Conv2d, ranks: Sequence[int], *,
                          n_iter: int = TUCKER_HOOI_ITERS, stats: LayerStats | None = None,
                          data: "calibration_data.LayerData | None" = None) -> TuckerConv2d:
    """Tucker-2 decomposition of a convolution into three convolutions.

    Parameters
    ----------
    conv : nn.Conv2d
        Any non-grouped conv (any kernel, stride, padding incl. strings, dilation,
        padding mode, bias or not).
    ranks : (rank_out, rank_in)
        Ranks of the output and input channel modes (:mod:`ranks` chooses them).
    n_iter : int
        HOOI refinement steps after the HOSVD start (with ``stats``: alternations).
    stats : calibration.LayerStats, optional
        Moments of the layer's inputs on calibration data: the factors then minimise the
        layer's output error on that data instead of the weight error
        (:func:`tucker2_data_aware`), and the bias is refitted.
    data : calibration.LayerData, optional
        Instead of ``stats``: the layer's calibration inputs, from which the same fit is made
        on the input channels' and the core's moments (:func:`tucker2_on_data`, what
        :func:`decompose_model` does: a fraction of the full patch moments' cost).

    Returns
    -------
    TuckerConv2d
        ``1x1 S->R_in``, ``R_in->R_out`` core with the layer's kernel, stride,
        padding and dilation, ``1x1 R_out->T`` with the bias, on the layer's device
        and dtype.  At full ranks it reproduces the layer exactly.

    References
    ----------
    Kim et al. 2015 [1]_, De Lathauwer et al. 2000 [5]_.
    """
    _check_plain_conv(conv)
    module = TuckerConv2d(conv, ranks)
    with torch.no_grad():
        weight = conv.weight.detach().to(_work_dtype(conv.weight))
        if stats is not None and data is not None:
            raise ValueError("give the layer's moments (stats) or its calibration inputs (data), not both")
        approx_z = None
        if data is not None:
            core, u_out, u_in, stats = tucker2_on_data(conv, module.ranks, data, n_iter=n_iter)
            # The bias is refitted on z's means: z = (U_in (x) I_k)^T x^, mapped by U_out G.
            approx_z = u_out @ core.reshape(len(core), -1)
        elif stats is None:
            core, u_out, u_in = tucker2(weight, module.ranks, n_iter=n_iter)
        else:
            cov, cross_y = fit_moments(conv, stats)
            core, u_out, u_in = tucker2_data_aware(weight.double(), module.ranks, cov, cross_y, n_iter=n_iter)
        first, middle, last = module
        first.weight.copy_(u_in.T[:, :, None, None])   # (R_in, S, 1, 1)
        middle.weight.copy_(core)                       # (R_out, R_in, kh, kw)
        last.weight.copy_(u_out[:, :, None, None])      # (T, R_out, 1, 1)
        if conv.bias is not None:
            last.bias.copy_(conv.bias)
            if stats is not None:
                approx = approx_z if approx_z is not None else \
                    dense_weight(module).double().reshape(conv.out_channels, -1)
                last.bias.copy_(_refit_bias(conv, stats, approx @ stats.mean_hat))
    return module


# --------------------------------------------------------------------------------- CP
class CPDiverged(RuntimeError):
    """CP-ALS gave non-finite or degenerate (diverging, cancelling) components."""


def _khatri_rao(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker product: (I, R), (J, R) -> (I*J, R), row index i*J + j."""
    return (left[:, None, :] * right[None, :, :]).reshape(-1, left.shape[1])


# Cholesky is trusted while cond(gram) ~ (max L_ii / min L_ii)^2 stays below ~1e12 in float64.
CHOLESKY_MIN_DIAG_RATIO = 1e-6


def _solve_gram(mttkrp: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Least-squares factor update ``mttkrp @ pinv(gram)`` in float64 (gram is R x R).

    The Gram matrix (a Hadamard product of factor Grams) is symmetric positive
    semi-definite: a Cholesky solve is an order of magnitude cheaper than the SVD-based
    ``gelsd`` (four solves per ALS iteration) and is used while
    it is well conditioned; a singular or ill-conditioned Gram, as in degenerate CP,
    takes the minimum-norm ``gelsd`` solution.
    """
    gram64, rhs = gram.double(), mttkrp.double().T
    with lapack_threads():
        chol, info = torch.linalg.cholesky_ex(gram64)
        diag = chol.diagonal().abs()
        if int(info) == 0 and bool(diag.min() > CHOLESKY_MIN_DIAG_RATIO * diag.max()):
            sol = torch.cholesky_solve(rhs, chol)
        else:
            # Only here (a NaN Gram fails the test above, off the well-conditioned hot path):
            # LAPACK's gelsd fails on NaN with an internal error, not a diagnosis, so the ALS
            # stops as diverged and the caller's retry (then its Tucker-2 fallback) takes over.
            if not (bool(torch.isfinite(gram64).all()) and bool(torch.isfinite(rhs).all())):
                raise CPDiverged("non-finite CP factors")
            sol = torch.linalg.lstsq(gram64, rhs, driver="gelsd").solution
    return sol.T.to(mttkrp.dtype)


def cp_als(weight: torch.Tensor, rank: int, *, max_iter: int = CP_MAX_ITER, tol: float = CP_TOL,
           init: str = "svd", seed: int = 0) -> tuple[list[torch.Tensor], float]:
    """Rank-``rank`` CP of a 4-way ``(T, S, kh, kw)`` tensor by alternating least squares.

    The MTTKRPs are computed as products of unfoldings with small Khatri-Rao
    matrices, e.g. for the T mode ``(T, S*kh*kw) @ (S*kh*kw, R)``, and the spatial
    modes share one contraction with the two channel factors, so an iteration
    costs three ``T*S*kh*kw*R`` matrix products and never forms a large tensor.

    Parameters
    ----------
    init : {"svd", "random"}
        "svd" starts each factor from the leading left singular vectors of its
        unfolding (random columns where the rank exceeds the mode's size), as
        tensorly's ``parafac(init='svd')`` does; "random" from a seeded Gaussian.

    Returns
    -------
    factors : [A (T,R), B (S,R), C (kh,R), D (kw,R)] with the CP weights folded into A.
    rel_error : float, ``||W - [[A,B,C,D]]|| / ||W||``.

    Raises
    ------
    CPDiverged
        If a factor becomes non-finite, or a rank-one component's norm exceeds
        ``CP_DEGENERACY_RATIO`` times the weight's norm.

    References
    ----------
    Lebedev et al. 2014 [2]_; Kolda & Bader, "Tensor Decompositions and
    Applications", SIAM Review 51(3), 2009 (CP-ALS, MTTKRP).
    """
    T, S, H, W = weight.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    norm2 = weight.pow(2).sum()
    unf = [_unfold(weight, m).contiguous() for m in range(2)]  # (T, S*H*W), (S, T*H*W)
    factors = []
    for mode, size in enumerate(weight.shape):
        rand = torch.randn(size, rank, generator=gen, dtype=weight.dtype).to(weight.device)
        if init == "svd":
            k = min(rank, size)
            rand[:, :k] = _leading_eigvecs(_unfold(weight, mode), k)
        elif init != "random":
            raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
        factors.append(rand)
    A, B, C, D = factors
    prev_err = float("inf")
    rel_err = float("nan")
    for _ in range(max_iter):
        cd = _khatri_rao(C, D)                                   # (H*W, R)
        A = _solve_gram(unf[0] @ _khatri_rao(B, cd), (B.T @ B) * (C.T @ C) * (D.T @ D))
        B = _solve_gram(unf[1] @ _khatri_rao(A, cd), (A.T @ A) * (C.T @ C) * (D.T @ D))
        # Z[r, h*w] = sum_{t,s} W[t,s,h,w] A[t,r] B[s,r]: one (R,T)@(T,S*H*W) product.
        Z = torch.einsum("rsk,sr->rk", (A.T @ unf[0]).reshape(rank, S, H * W), B).reshape(rank, H, W)
        C = _solve_gram(torch.einsum("rhw,wr->hr", Z, D), (A.T @ A) * (B.T @ B) * (D.T @ D))
        mttkrp_d = torch.einsum("rhw,hr->wr", Z, C)
        gram_d = (A.T @ A) * (B.T @ B) * (C.T @ C)
        D = _solve_gram(mttkrp_d, gram_d)
        # ||W - W_hat||^2 = ||W||^2 - 2 <W, W_hat> + ||W_hat||^2, all from R x R terms.
        inner = (mttkrp_d * D).sum()
        fit2 = (gram_d * (D.T @ D)).sum()
        rel_err = float(torch.sqrt(torch.clamp(norm2 - 2 * inner + fit2, min=0) / norm2))
        if not math.isfinite(rel_err):
            raise CPDiverged("non-finite CP factors")
        if abs(prev_err - rel_err) < tol:
            break
        prev_err = rel_err
    factors = [A, B, C, D]
    if not all(torch.isfinite(f).all() for f in factors):
        raise CPDiverged("non-finite CP factors")
    component_norms = torch.stack([f.norm(dim=0) for f in factors]).prod(0)
    ratio = float(component_norms.max() / norm2.sqrt())
    if ratio > CP_DEGENERACY_RATIO:
        raise CPDiverged(f"degenerate CP components (largest is {ratio:.3g}x the weight's norm)")
    # Balance the norms over B, C, D (unit columns) and fold the scales into A.
    for f in (B, C, D):
        col = f.norm(dim=0).clamp_min(torch.finfo(f.dtype).tiny)
        f /= col
        A *= col
    return [A, B, C, D], rel_err


def cp_decompose_conv(conv: nn.Conv2d, rank: int, *, max_iter: int = CP_MAX_ITER,
                      tol: float = CP_TOL, init: str = "svd", seed: int = 0,
                      stats: LayerStats | None = None) -> CPConv2d:
    """CP decomposition of a convolution into four convolutions.

    Parameters
    ----------
    conv : nn.Conv2d
        Any non-grouped conv.
    rank : int
        CP rank R (:mod:`ranks` chooses it).
    max_iter, tol, init, seed
        CP-ALS options, see :func:`cp_als`.
    stats : calibration.LayerStats, optional
        Moments of the layer's inputs on calibration data: the output factor (the last 1x1
        conv) and the bias are then refitted by least squares to the layer's response on
        that data (:func:`cp_refit_output`), given the ALS input and spatial factors.

    Returns
    -------
    CPConv2d
        ``1x1 S->R``, depthwise ``(kh,1)``, depthwise ``(1,kw)``, ``1x1 R->T`` with
        the bias, on the layer's device and dtype.

    Raises
    ------
    CPDiverged
        When ALS fails (non-finite or degenerate); :func:`decompose_model` retries
        and falls back to Tucker-2.

    References
    ----------
    Lebedev et al. 2014 [2]_.
    """
    _check_plain_conv(conv)
    module = CPConv2d(conv, rank)
    with torch.no_grad():
        weight = conv.weight.detach().to(_work_dtype(conv.weight))
        (a, b, c, d), _ = cp_als(weight, module.rank, max_iter=max_iter, tol=tol, init=init, seed=seed)
        if stats is not None:
            cov, cross_y = fit_moments(conv, stats)
            a = cp_refit_output(b.double(), c.double(), d.double(), cov, cross_y).to(a.dtype)
            if not torch.isfinite(a).all():
                raise CPDiverged("non-finite output factor in the data-aware refit")
        first, vertical, horizontal, last = module
        first.weight.copy_(b.T[:, :, None, None])       # (R, S, 1, 1)
        vertical.weight.copy_(c.T[:, None, :, None])    # (R, 1, kh, 1)
        horizontal.weight.copy_(d.T[:, None, None, :])  # (R, 1, 1, kw)
        last.weight.copy_(a[:, :, None, None])          # (T, R, 1, 1)
        if conv.bias is not None:
            last.bias.copy_(conv.bias)
            if stats is not None:
                approx = dense_weight(module).double().reshape(conv.out_channels, -1)
                last.bias.copy_(_refit_bias(conv, stats, approx @ stats.mean_hat))
    return module


# ----------------------------------------------------------------------------- Linear
def svd_decompose_linear(linear: nn.Linear, rank: int, *, stats: LayerStats | None = None) -> SVDLinear:
    """Truncated SVD of a Linear layer: ``W ~ (U_r S_r^1/2)(S_r^1/2 V_r^T)``.

    Parameters
    ----------
    linear : nn.Linear
        An ``M -> N`` layer with weight ``(N, M)``.
    rank : int
        Kept singular values (:mod:`ranks` chooses them).
    stats : calibration.LayerStats, optional
        Moments of the layer's inputs on calibration data: the pair then minimises the
        output error on that data (:func:`svd_data_aware`) and the bias is refitted.

    Returns
    -------
    SVDLinear
        ``Linear(M->r, no bias)`` then ``Linear(r->N)`` with the bias; exact at
        full rank.

    References
    ----------
    Girshick 2015 [4]_, Nakajima et al. 2013 [3]_.
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
    module = SVDLinear(linear, rank)
    if stats is not None:
        with torch.no_grad():
            first, second, bias = svd_data_aware(linear, module.rank, stats)
            module[0].weight.copy_(first)   # (r, M)
            module[1].weight.copy_(second)  # (N, r)
            if bias is not None:
                module[1].bias.copy_(bias)
        return module
    with torch.no_grad():
        weight = linear.weight.detach().to(_work_dtype(linear.weight))  # (N, M)
        # The leading singular subspace from the Gram matrix of the shorter side:
        # fc6 of VGG16 is 4096 x 25088, whose full thin SVD costs minutes on a CPU
        # while a 4096 x 4096 Gram and its eigh take seconds.  Projecting on that
        # subspace keeps the result exact at full rank whatever the eigh's accuracy.
        if weight.shape[0] <= weight.shape[1]:
            u = _leading_subspace(weight, module.rank)      # (N, r)
            left, right = u, u.T @ weight                   # (N, r), (r, M)
            scale = right.norm(dim=1)                       # the singular values
        else:
            v = _leading_subspace(weight.T, module.rank)    # (M, r)
            left, right = weight @ v, v.T
            scale = left.norm(dim=0)
        # Split each singular value evenly between the two layers, as W = (U S^1/2)(S^1/2 V^T).
        root = scale.clamp_min(torch.finfo(scale.dtype).tiny).sqrt()
        if weight.shape[0] <= weight.shape[1]:
            left, right = left * root, right / root[:, None]
        else:
            left, right = left / root, right * root[:, None]
        module[0].weight.copy_(right)   # (r, M)
        module[1].weight.copy_(left)    # (N, r)
        if linear.bias is not None:
            module[1].bias.copy_(linear.bias)
    return module


# ------------------------------------------------------------------------ data-aware
# The factorizations above approximate the weight; those below approximate the layer's
# response on calibration data.  With x the layer's input in the original network and x^ its
# input in the network decomposed so far (calibration.LayerStats), a replacement W~ is
# chosen to minimise E||W x - W~ x^||^2 (Zhang et al. 2016 [7]_'s asymmetric
# reconstruction: each layer also makes up for what the layers before it lost).  Writing
# S^ = E[x^ x^^T] and C = E[x x^^T], for any W~ restricted to z = Q^T x^ (Q: the input
# factors) the best map is the regression M = W C Q (Q^T S^ Q)^-1, and the best rank-r
# map is U_r U_r^T M with U_r the leading eigenvectors of M (Q^T S^ Q) M^T -- a
# reduced-rank regression (Izenman 1975 [8]_), which for Q = I is the truncated SVD of
# W C S^(-1/2) in the metric of the data, the whitened SVD of SVD-LLM and BALF
# [9]_.  It needs only Q^T S^ Q and W C Q: small matrices, whatever the amount of data.
# The moments are shrunk towards the identity (OAS, calibration.LayerStats.shrinkage):
# with no information in the data the result is the data-free factorization.
FIT_JITTER = 1e-10  # relative ridge that keeps a shrunk covariance numerically positive definite
CHOLESKY_TRIES = 7  # ridges 0, 1e-10, 1e-8, ..., 1e-0 of the trace


def fit_moments(layer: nn.Module, stats: LayerStats, *, weight: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S^ + lam P, W C + lam W P)`` in float64: the shrunk input moments of ``layer`` and the
    cross-moment of its (bias-free) response with them.  Centered when the layer has a bias
    (the bias is refitted to the means), uncentered when not.  ``P`` is the identity for
    input-space moments; for output-space ones the samples are ``z = W x^``, ``P = W W^T`` and
    the response's own map is the identity.  ``weight``: the layer's map on the samples when
    they are orthonormal features ``Q^T x^`` of its patches (``W Q``, ``T x p``; the identity
    target then stands for the identity on the patches).
    """
    centered = layer.bias is not None
    cov, cross_y = stats.moments(centered)
    if weight is None:
        weight = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    if stats.space == "output":
        prior = weight @ weight.T
        lam = stats.shrinkage(centered, prior)
        return cov + lam * prior, cross_y + lam * prior
    lam = stats.shrinkage(centered)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return cov + lam * eye, cross_y + lam * weight


def _refit_bias(layer: nn.Module, stats: LayerStats, approx_mean: torch.Tensor) -> torch.Tensor:
    """The bias that matches the means, ``b + E[W x] - W~ E[x^]``; ``approx_mean`` is ``W~ E[x^]``
    (with output-space moments, ``x^`` stands for ``W x^`` and ``W~`` for the map applied to it)."""
    return (layer.bias.detach().double() + stats.mean_y - approx_mean).to(layer.bias.dtype)


def _top_eigvecs(sym: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading eigenvectors of a symmetric matrix (float64 eigh), as columns."""
    with lapack_threads():
        _, vecs = torch.linalg.eigh(0.5 * (sym + sym.T))
    return vecs[:, -rank:].flip(-1)


def cholesky_psd(sym: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a symmetric positive semi-definite matrix, adding a growing ridge until it
    factorizes (moments of few samples, summed in floating point, can be slightly indefinite)."""
    sym = 0.5 * (sym + sym.T)
    # Relative to the trace, which bounds every eigenvalue of a PSD matrix and so the rounding
    # errors of one (inputs with almost no variance give moments of 1e-20 and noise of that size).
    scale = float(torch.diagonal(sym).abs().sum())
    scale = scale if scale > 0 else 1.0
    eye = torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)
    jitter = 0.0
    with lapack_threads():
        for _ in range(CHOLESKY_TRIES):
            chol, info = torch.linalg.cholesky_ex(sym + jitter * scale * eye)
            if int(info) == 0:
                return chol
            jitter = FIT_JITTER if jitter == 0 else jitter * 100
    raise ValueError("calibration moments are not positive semi-definite (non-finite activations?)")


def _solve_spd(rhs: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``rhs @ cov^-1`` for a symmetric positive definite ``cov`` (float64)."""
    chol = cholesky_psd(cov)
    with lapack_threads():
        return torch.cholesky_solve(rhs.T, chol).T


def reduced_rank_fit(cross: torch.Tensor, cov: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` map ``U G`` minimising ``E||y - U G z||^2`` from moments.

    Parameters
    ----------
    cross : (T, P) tensor, ``E[y z^T]``
    cov : (P, P) tensor, ``E[z z^T]``, positive definite
    rank : int

    Returns
    -------
    U : (T, rank) with orthonormal columns, G : (rank, P).  ``U G`` is the regression
    ``M = cross cov^-1`` projected on the ``rank`` leading eigenvectors of the fitted
    response's moment ``M cov M^T = cross M^T`` (Izenman 1975 [8]_).

    References
    ----------
    Izenman 1975 [8]_; Zhang et al. 2016 [7]_ (the same solution for a layer's response).
    """
    # With cov = L L^T: M cov M^T = B B^T for B = cross L^-T = M L, so U spans B's leading left
    # singular vectors, found without a T x T eigendecomposition (randomized for a low rank:
    # seconds instead of a minute for VGG's 4096-wide FC layers), and G = U^T M = (U^T B) L^-1.
    chol = cholesky_psd(cov)
    with lapack_threads():
        b = torch.linalg.solve_triangular(chol, cross.T, upper=False).T            # (T, P)
    u = _leading_subspace(b, rank) if rank < b.shape[0] else _top_eigvecs(b @ b.T, rank)
    with lapack_threads():
        g = torch.linalg.solve_triangular(chol.T, b.T @ u, upper=True).T           # (rank, P)
    return u, g


def _input_factor(projected: torch.Tensor, chol: torch.Tensor, rank_in: int) -> torch.Tensor:
    """``U_in (S, R_in)``, orthonormal: the input-channel subspace that keeps the most of
    ``projected`` (a ``(T', S, kh, kw)`` weight) in the metric ``Sigma_S = L L^T`` of the input
    channels: ``span(L^-T V)`` for ``V`` the leading eigenvectors of ``L^T W_(1) W_(1)^T L``."""
    mode1 = _unfold(projected, 1)                                    # (S, T'*kh*kw)
    v = _top_eigvecs(chol.T @ (mode1 @ mode1.T) @ chol, rank_in)      # (S, R_in)
    with lapack_threads():
        back = torch.linalg.solve_triangular(chol.T, v, upper=True)  # L^-T V
        return torch.linalg.qr(back).Q


def _output_factor(weight: torch.Tensor, u_in: torch.Tensor, sigma_s: torch.Tensor, rank_out: int) -> torch.Tensor:
    """``U_out (T, R_out)`` for a given ``U_in``, from the weight and the channels' moment alone:
    the leading left singular vectors of ``W (U_in L_z (x) I_k)`` with ``L_z L_z^T = U_in^T Sigma_S
    U_in``, i.e. the output subspace that keeps the most of the *projected* response
    ``W (U_in U_in^T (x) I_k) x`` if the inputs were uncorrelated across kernel offsets (a surrogate
    for the alternation of :func:`tucker2_data_aware` that needs no other look at the data; the
    final ``U_out`` is the exact fit of :func:`tucker2_on_data`'s second look)."""
    chol_z = cholesky_psd(u_in.T @ sigma_s @ u_in)
    mapped = torch.einsum("tshw,si,ij->tjhw", weight, u_in, chol_z)    # (T, R_in, kh, kw)
    return _leading_eigvecs(_unfold(mapped, 0), rank_out)


def tucker2_on_data(conv: nn.Conv2d, ranks: Sequence[int], data: "calibration_data.LayerData", *,
                    n_iter: int = TUCKER_HOOI_ITERS):
    """Tucker-2 of ``conv``'s weight ``(T, S, kh, kw)`` fitted to its response on calibration data,
    in two looks at the layer's inputs instead of the ``(S*kh*kw)^2`` patch moments.

    1. The input channels' moment ``Sigma_S`` (:func:`calibration.channel_stats`, shrunk by OAS);
       ``U_in`` and ``U_out`` alternate on it and the weight as in :func:`tucker2_data_aware`,
       ``U_out`` by :func:`_output_factor`.
    2. The moments of ``z``, the patches of ``U_in^T x^`` (the core's own inputs: ``R_in*kh*kw``
       dimensions), and of the original response with them; the core and ``U_out`` are then the
       exact reduced-rank regression of the response on ``z`` (:func:`reduced_rank_fit`).

    Why: the patch moments cost ``N (S*kh*kw)^2`` products -- on VGG16 at 64 px about 1 TMAC and
    most of a data-aware decomposition's time -- while ``z``'s cost ``(R_in/S)^2`` of that
    (VBMF's ranks: a tenth to a third).  Only the alternation's output factor is an approximation:
    on the trained CIFAR-10 ResNet-56 (Tucker-2, 2x and 3x fewer MACs) the accuracy straight after
    decomposition matched the full-moment fit within the spread of seeds (benchmarks/RESULTS.md).
    At full ranks and ``x^ = x`` it reproduces the layer.

    Returns ``core, u_out, u_in`` as :func:`tucker2` does, and the :class:`LayerStats` of ``z``
    (the bias is refitted on their means).
    """
    rank_out, rank_in = (int(r) for r in ranks)
    weight = conv.weight.detach().double()
    T, S, kh, kw = weight.shape
    K = kh * kw
    centered = conv.bias is not None  # as fit_moments: a bias is refitted to the means
    channels = data.channels()
    sigma_s, _ = channels.moments(centered)
    sigma_s = sigma_s + channels.shrinkage(centered) * torch.eye(S, dtype=sigma_s.dtype, device=sigma_s.device)
    chol = cholesky_psd(sigma_s)
    u_out = None
    for step in range(n_iter + 1):
        projected = weight if u_out is None else torch.einsum("tshw,to->oshw", weight, u_out)
        u_in = _input_factor(projected, chol, rank_in)
        if step < n_iter:
            u_out = _output_factor(weight, u_in, sigma_s, rank_out)
    first = u_in.T[:, :, None, None]                                     # (R_in, S, 1, 1)
    # The core's inputs, exactly (no TF32, no half precision).
    stats = data.responses(lambda x: calibration_data.exact_conv(x, first), dim=rank_in * K)
    # The layer's map on z: W (U_in (x) I_k), (T, R_in*K), columns i*K + k as z's.
    w_z = torch.einsum("tsk,si->tik", weight.reshape(T, S, K), u_in).reshape(T, rank_in * K)
    cov, cross = fit_moments(conv, stats, weight=w_z)
    u_out, core = reduced_rank_fit(cross, cov, rank_out)
    return core.reshape(rank_out, rank_in, kh, kw), u_out, u_in, stats


def tucker2_data_aware(weight: torch.Tensor, ranks: Sequence[int], cov: torch.Tensor, cross_y: torch.Tensor, *,
                       n_iter: int = TUCKER_HOOI_ITERS):
    """Tucker-2 of a conv weight ``(T, S, kh, kw)`` that minimises the output error on data.

    ``cov`` is the shrunk ``S^`` of the layer's patches ``(S*kh*kw)^2`` and ``cross_y`` the
    cross-moment ``W C`` ``(T, S*kh*kw)`` (:func:`fit_moments`).  Alternates two steps:

    1. the input factor ``U_in``: the input-channel subspace that keeps the most of the
       (output-projected) weight in the metric of the input channels' second moment
       ``Sigma_S = L L^T``: the leading eigenvectors ``V`` of ``L^T W_(1) W_(1)^T L``, mapped
       back as ``span(L^-T V)`` (the data-free HOSVD step when ``Sigma_S = I``);
    2. given ``U_in``, the core and ``U_out`` jointly and exactly: the reduced-rank regression
       of the response on ``z = (U_in (x) I_k)^T x^`` (:func:`reduced_rank_fit`).

    At full ranks and ``x^ = x`` it reproduces ``W``.  Returns ``core (R_out, R_in, kh, kw),
    u_out (T, R_out), u_in (S, R_in)`` as :func:`tucker2` does.

    References
    ----------
    Zhang et al. 2016 [7]_, Izenman 1975 [8]_, Kim et al. 2015 [1]_.
    """
    rank_out, rank_in = (int(r) for r in ranks)
    T, S, kh, kw = weight.shape
    K = kh * kw
    cov4 = cov.reshape(S, K, S, K)
    sigma_s = torch.einsum("akbk->ab", cov4) / K
    chol = cholesky_psd(sigma_s)
    cross3 = cross_y.reshape(T, S, K)
    u_out = None
    for _ in range(n_iter + 1):
        projected = weight if u_out is None else torch.einsum("tshw,to->oshw", weight, u_out)
        u_in = _input_factor(projected, chol, rank_in)
        # z = (U_in (x) I_k)^T x^: its moments from the patch moments, never from data again.
        cov_z = torch.einsum("si,skrl,rj->ikjl", u_in, cov4, u_in).reshape(rank_in * K, rank_in * K)
        cross_z = torch.einsum("tsk,si->tik", cross3, u_in).reshape(T, rank_in * K)
        u_out, core = reduced_rank_fit(cross_z, cov_z, rank_out)
    return core.reshape(rank_out, rank_in, kh, kw), u_out, u_in


def cp_refit_output(b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, cov: torch.Tensor,
                    cross_y: torch.Tensor) -> torch.Tensor:
    """The output factor ``A (T, R)`` of a CP conv that best reproduces the response on data.

    With the input factor ``B (S, R)`` and the spatial factors ``C (kh, R)``, ``D (kw, R)``
    fixed, the CP layer computes ``A z`` with ``z = Phi^T x^`` and ``Phi[:, r] = b_r (x) c_r (x) d_r``;
    ``A`` is the least-squares regression of the response on ``z`` (no rank cut).
    """
    phi = torch.einsum("sr,hr,wr->shwr", b, c, d).reshape(-1, b.shape[1])   # (S*kh*kw, R)
    return _solve_spd(cross_y @ phi, phi.T @ cov @ phi)


def svd_data_aware(layer: nn.Module, rank: int, stats: LayerStats):
    """The factors ``(first (r, M), second (N, r), bias or None)`` of a Linear layer (or a 1x1
    conv, as ``(T, S)``) that minimise the output error on calibration data.

    Input-space moments: the reduced-rank regression on the inputs themselves.  Output-space
    moments (layers wider than ``calibration.MAX_STAT_DIM``): on ``W x^``, so the first
    factor is ``G W``.  The bias (when the layer has one) matches the means.
    """
    weight = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    cov, cross_y = fit_moments(layer, stats)
    u, g = reduced_rank_fit(cross_y, cov, rank)
    bias = None
    if layer.bias is not None:
        bias = _refit_bias(layer, stats, u @ (g @ stats.mean_hat))  # z = x^, or W x^ in output space
    first = g @ weight if stats.space == "output" else g
    dtype = layer.weight.dtype
    return first.to(dtype), u.to(dtype), bias


# ---------------------------------------------------------------------- whole models
@dataclass
class LayerReport:
    """One row of the decomposition report (see :func:`decompose_model`)."""

    name: str
    kind: str                      # "conv" or "linear"
    shape: tuple                   # weight shape of the original layer
    method: str                    # "tucker", "cp", "svd", "diagonal" or "-" when skipped
    ranks: tuple | None            # (R_out, R_in) for Tucker, (R,) for CP / SVD, (b,) diagonal
    params_before: int
    params_after: int
    macs_before: int               # per image, at the report's input size
    macs_after: int
    error: float | None = None     # ||W - W_hat|| / ||W|| of the layer's weight
    skipped: bool = False
    reason: str = ""
    seconds: float = 0.0
    why: str = ""                  # the rank rule's note from the plan

    def as_dict(self) -> dict:
        return asdict(self)


#: Elements per block of :func:`_norm`'s float32 partial sums.
NORM_BLOCK = 1024


def _norm(tensor: torch.Tensor) -> float:
    """Frobenius norm: float32 norms of blocks of NORM_BLOCK elements, their squares summed in float64.

    As accurate as a float64 copy (relative 1e-6 on a 4096 x 25088 FC weight, where one
    float32 reduction is off by 1%) and 20x faster: a float64 copy of that weight, or
    ``vector_norm(dtype=float64)``, took a third of compressing it.
    """
    flat = tensor.reshape(-1)
    whole = flat.numel() // NORM_BLOCK * NORM_BLOCK
    squares = torch.linalg.vector_norm(flat[:whole].view(-1, NORM_BLOCK), dim=1).double().square().sum()
    if whole < flat.numel():
        squares = squares + torch.linalg.vector_norm(flat[whole:]).double().square()
    return float(squares.sqrt())


def _relative_error(original: torch.Tensor, approx: torch.Tensor) -> float:
    original, approx = original.detach(), approx.detach()
    norm = _norm(original)
    return _norm(original - approx) / norm if norm > 0 else 0.0


def svd_decompose_conv1x1(conv: nn.Conv2d, rank: int, *, stats: LayerStats | None = None) -> SVDConv2d:
    """Truncated SVD of a 1x1 convolution (groups 1): the SVD of its ``(T, S)`` weight matrix,
    computed as :func:`svd_decompose_linear`'s; exact at full rank.  Any stride and padding.
    With ``stats`` (the layer's input moments on calibration data) the pair minimises the
    output error on that data instead (:func:`svd_data_aware`).
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
    module = SVDConv2d(conv, rank)
    with torch.no_grad():
        out_c, in_c = conv.out_channels, conv.in_channels
        linear = nn.Linear(in_c, out_c, bias=conv.bias is not None, device="meta")
        # The 1x1 kernel as a Linear weight (T, S) -- a view, nothing copied.
        linear.weight = nn.Parameter(conv.weight.detach().reshape(out_c, in_c), requires_grad=False)
        if conv.bias is not None:
            linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
        pair = svd_decompose_linear(linear, rank, stats=stats)
        module[0].weight.copy_(pair[0].weight.reshape(rank, in_c, 1, 1))
        module[1].weight.copy_(pair[1].weight.reshape(out_c, rank, 1, 1))
        if conv.bias is not None:
            module[1].bias.copy_(pair[1].bias)
    return module


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight that a decomposed module stands for (original layer's shape)."""
    if isinstance(module, TuckerConv2d):
        first, core, last = (m.weight.detach() for m in module)
        return torch.einsum("oihw,is,to->tshw", core, first[:, :, 0, 0], last[:, :, 0, 0])
    if isinstance(module, CPConv2d):
        first, vert, horiz, last = (m.weight.detach() for m in module)
        return torch.einsum("rs,rh,rw,tr->tshw", first[:, :, 0, 0], vert[:, 0, :, 0], horiz[:, 0, 0, :],
                            last[:, :, 0, 0])
    if isinstance(module, SVDLinear):
        return module[1].weight.detach() @ module[0].weight.detach()
    if isinstance(module, SVDConv2d):
        return (module[1].weight.detach()[:, :, 0, 0] @ module[0].weight.detach()[:, :, 0, 0])[:, :, None, None]
    if isinstance(module, DiagonalLinear):
        return module.to_dense()
    raise TypeError(f"not a decomposed module: {type(module).__name__}")


@torch.no_grad()
def restore_filter_norms(module: nn.Module, weight: torch.Tensor, *,
                         max_scale: float = MAX_FILTER_SCALE) -> nn.Module:
    """Scale each output filter of a decomposed ``module`` back towards its norm in ``weight``.

    A truncated Tucker-2, CP or SVD factorization is the best approximation in the
    Frobenius norm, and that approximation loses the energy it drops -- for a truncated
    SVD every row shrinks, and Tucker-2 and CP filters mostly do too, unevenly (on a
    trained VGG16 at VBMF ranks the deeper layers lose the most; benchmarks/RESULTS.md).  Through a
    plain network without BatchNorm those per-channel losses compound and shift the
    balance between channels, and the trained classifier reads the result as one class
    (chance accuracy straight after decomposition).  Restoring each filter's norm, the
    per-channel weight correction that post-training quantization applies to its own
    approximation error (Banner et al. 2019 [6]_), keeps most of the accuracy before
    any fine-tuning (benchmarks/RESULTS.md).  The direction of every filter is the
    best approximation's; only its length changes.  At full rank it is a no-op.

    The scale is capped at ``max_scale`` (:data:`MAX_FILTER_SCALE` = 2).  Where a row ``p`` of the
    approximation is the projection of the original row ``w`` (truncated SVD: each row
    projected on the kept right singular vectors, so ``<w, p> = |p|^2``),
    ``|w - s p|^2 = |w|^2 - s (2 - s) |p|^2``: up to ``s = 2`` the corrected row is never
    further from the original than the zero row.  A filter that kept less than half
    its norm (a fresh, mostly random FC layer cut to a few percent of its rank) is
    mostly noise to the factorization, and scaling it up further would amplify what
    is left rather than restore it.

    Parameters
    ----------
    module : TuckerConv2d, CPConv2d or SVDLinear
        Scaled in place through its last layer's rows (the bias is not touched).
    weight : Tensor
        The original dense weight (out_channels first).
    max_scale : float
        The largest factor a filter is scaled by (``inf``: full restoration).

    Returns
    -------
    The module.
    """
    last = module[-1]
    dims = tuple(range(1, weight.dim()))
    target = weight.detach().double().pow(2).sum(dims).sqrt()
    if isinstance(module, SVDLinear):
        # Row norms of B @ A without forming it: ||B[o] A||^2 = B[o] (A A^T) B[o]^T.
        left, right = module[0].weight.detach().double(), last.weight.detach().double()
        current = ((right @ (left @ left.T)) * right).sum(1).clamp_min(0).sqrt()
    else:
        current = dense_weight(module).double().pow(2).sum(dims).sqrt()
    # A filter the factorization dropped entirely (norm 0) stays at zero.
    scale = (target / current.clamp_min(torch.finfo(torch.float64).tiny)).clamp(max=max_scale)
    last.weight.mul_(scale.to(last.weight.dtype).view(-1, *([1] * (last.weight.dim() - 1))))
    return module


def _inside_decomposed(name: str, decomposed_names: Iterable[str]) -> bool:
    return any(name.startswith(d + ".") for d in decomposed_names)


def replace_layer(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (a qualified name at any depth) is."""
    model.set_submodule(name, new)


def count_params(module: nn.Module) -> int:
    """Parameters of one module (as :func:`report.count_params`)."""
    return sum(p.numel() for p in module.parameters())


def macs_at(module: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of one call of ``module`` on an input of ``input_shape`` (batch included, one image).

    Works on the meta device too, which is how :mod:`ranks` costs a factorization
    without building it.
    """
    total = 0

    def hook(mod, args, out):
        nonlocal total
        total += report.module_macs(mod, args[0], out)

    leaves = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear, DiagonalLinear))]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        param = next(module.parameters())
        with torch.no_grad():
            module(torch.zeros(tuple(input_shape), device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
    return total


def matrix_shape(layer: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of the matrix an SVD factorizes: a Linear's weight, a 1x1 conv's kernel."""
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels, layer.in_channels
    return layer.out_features, layer.in_features


def candidate_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d and Linear layer not inside an already decomposed module, in model order."""
    decomposed = [n for n, m in model.named_modules() if isinstance(m, DECOMPOSED_TYPES)]
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and n and not _inside_decomposed(n, decomposed)]


def cp_rank_limit(conv: nn.Conv2d) -> int:
    """The largest CP rank worth planning: above it a CP layer has more weights than ``conv``.

    ``R (T + S + kh + kw) < T S kh kw``, i.e. ``R < T S kh kw / (T + S + kh + kw)``.
    """
    return max(1, math.ceil(conv.weight.numel() / (conv.out_channels + conv.in_channels + sum(conv.kernel_size))))


def cp_fallback_ranks(conv: nn.Conv2d, rank: int) -> tuple[int, int]:
    """Tucker-2 ranks that stand in for a CP layer of ``rank`` whose ALS failed.

    Not a rank choice but a conversion at equal size, so that a plan's budget still holds:
    the largest common fraction ``f`` of the channels, ``(ceil(f T), ceil(f S))``, whose
    Tucker-2 layer has no more weights than the CP layer would have had.
    """
    out_c, in_c = conv.out_channels, conv.in_channels
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    budget = rank * (in_c + sum(conv.kernel_size) + out_c)
    best = (1, 1)
    for r_out in range(1, out_c + 1):  # at most a few hundred steps, once per failed layer
        r_in = max(1, math.ceil(r_out * in_c / out_c))
        if in_c * r_in + r_in * r_out * kernel + r_out * out_c > budget:
            break
        best = (r_out, min(r_in, in_c))
    return best


def decompose_model(
    model: nn.Module,
    plan: dict[str, dict],
    *,
    input_size: Sequence[int] = (3, 224, 224),
    cp_max_iter: int = CP_MAX_ITER,
    seed: int = 0,
    show_progress: bool = False,
    rescale: bool | None = None,
    calibration: Iterable | None = None,
    data_aware: bool = True,
    recalibrate_bn: bool | None = None,
    mean_correction: bool = False,
) -> list[LayerReport]:
    """Apply a decomposition plan to ``model`` in place.

    Parameters
    ----------
    model : nn.Module
        Any model; the plan's layer names are qualified names at any depth.
    plan : dict
        ``name -> entry`` as :func:`ranks.plan_decomposition` makes it (or a user
        edits it): ``{"method": "tucker", "ranks": [R_out, R_in]}``, ``{"method":
        "cp", "rank": R}``, ``{"method": "svd", "rank": r}``, ``{"method":
        "diagonal", "bandwidth": b}`` or ``{"method": "none", "reason": ...}``.
        Checked as a whole first (:func:`check_plan`): a plan that does not fit
        leaves the model untouched.
    input_size : (C, H, W)
        Image size at which MACs are counted.
    cp_max_iter, seed
        CP-ALS options.
    show_progress : bool
        A tqdm bar over the layers.
    rescale : bool, optional
        Scale each output filter of a Tucker-2, CP or SVD layer back to the norm it
        has in the original (:func:`restore_filter_norms`); False keeps the plain
        best approximation.  The report's ``error`` is that of the weights used.
        Default: on for the layers with data-free factors, off for data-aware ones (the
        data-aware fit already corrects each channel, mean included).  A layer stays
        data-free, with the reason in its row, when the calibration set gives it fewer
        samples than ``calibration.MIN_SAMPLES_PER_DIM`` per input dimension (:func:`calibration.data_free_reason`).
    calibration : iterable of batches, optional
        Input batches (tensors, or ``(inputs, labels)`` pairs as a DataLoader yields them),
        a few hundred images without augmentation.  Each Tucker-2, CP and SVD layer is then
        fitted, in forward order, to the original layer's response on these images, taking
        its inputs from the network decomposed so far (:func:`tucker2_on_data`,
        :func:`cp_refit_output`, :func:`svd_data_aware`; moments from
        :func:`calibration.channel_stats` and :func:`calibration.layer_stats`).  None: the
        data-free factorizations.
    data_aware : bool, default True
        With ``calibration``: False keeps the data-free factors and uses the data only for
        the BatchNorm correction.
    recalibrate_bn : bool, optional
        With ``calibration``: correct every BatchNorm's running statistics by the shift the
        decomposition causes on it (:func:`calibration.reestimate_batchnorm` with the original
        as reference).  Default: on for data-free factors, off for data-aware ones, as
        measured on the trained CIFAR-10 ResNet-56 (benchmarks/RESULTS.md, "Data-aware": the
        data-aware factors already keep the responses, and the correction moved them by
        -0.2 to -1.2 points; after data-free factors it recovers 8 to 42 points).
    mean_correction : bool, default False
        With ``calibration``: a layer that keeps data-free factors for lack of samples (VGG16's
        4096-wide FC layers below 1024 images) gets its bias shifted so that its mean output on
        the calibration images is the original layer's (:func:`_correct_mean`).  Off by default
        as measured: +5.6 points on the demo (FC layers three epochs from a fresh start),
        -1.5 on the trained VGG16 of the Fashion-MNIST benchmark (benchmarks/RESULTS.md).

    Returns
    -------
    list of LayerReport
        One row per plan entry, in model order.  A planned layer is still kept (with
        the reason) when it is not used in the forward pass at ``input_size``, its
        factorization would not be smaller or gives non-finite weights.  CP layers
        whose ALS fails are retried from random starts and then decomposed with
        Tucker-2 at :func:`cp_fallback_ranks`; the row says so.

    References
    ----------
    Kim et al. 2015 [1]_, Lebedev et al. 2014 [2]_, Girshick 2015 [4]_.
    """
    check_plan(model, plan)
    shapes = report.record_input_shapes(model, input_size)
    # Forward order first (a layer is fitted to inputs from the layers decomposed before it),
    # then layers the forward pass does not reach, in model order.
    forward = {n: i for i, n in enumerate(shapes)}
    order = {n: len(forward) + i for i, (n, _) in enumerate(model.named_modules())}
    work = sorted(plan.items(), key=lambda item: forward.get(item[0], order[item[0]]))
    batches = original = None
    if calibration is not None:
        import copy

        param = next(model.parameters())
        batches = calibration_data.collect(calibration, device=param.device, dtype=param.dtype)
        original = copy.deepcopy(model)  # the targets: every layer's response in the original network
    fit_data = batches is not None and data_aware
    # The samples a layer's moments get are counted at the calibration images' own size (a
    # library caller may calibrate at another size than the plan's input_size).
    data_shapes = (report.record_input_shapes(model, tuple(batches[0].shape[1:]))
                   if fit_data and tuple(batches[0].shape[1:]) != tuple(input_size) else shapes)
    # Each network's layer inputs, kept between layers (forward order): one pass, not one per layer.
    inputs = (calibration_data.LayerInputs(original, batches),
              calibration_data.LayerInputs(model, batches)) if fit_data else None
    if recalibrate_bn is None:
        recalibrate_bn = not fit_data
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a requirement
        tqdm = None
    iterator = tqdm(work, desc="decompose", unit="layer", disable=not show_progress) if tqdm else work
    rows: list[LayerReport] = []
    for name, entry in iterator:
        layer = model.get_submodule(name)
        kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        method = entry["method"]
        start = time.perf_counter()
        if method == "none":
            in_shape, macs = shapes.get(name, (None, 0))
            row, new = _skipped(name, kind, layer, macs, entry.get("reason") or "kept by the plan"), None
        elif name not in shapes:
            row, new = _skipped(name, kind, layer, 0, "not used in the forward pass"), None
        else:
            in_shape, macs = shapes[name]
            data, note = None, ""
            if fit_data and method != "diagonal":
                # Tucker-2's second look sees the core's inputs, R_in*kh*kw values per position.
                dim = (min(int(entry["ranks"][1]), layer.in_channels) * math.prod(layer.kernel_size)
                       if method == "tucker" else None)
                data, note = _data_for(original, model, name, layer, batches, data_shapes.get(name, shapes[name])[0],
                                       inputs, dim)
            # Filter norms are restored on data-free factors only (a data-aware fit already matches
            # each channel's response), unless the caller said otherwise.
            rescale_layer = data is None if rescale is None else rescale
            # Tucker-2 reads the data in two looks (tucker2_on_data); the others from the patch moments.
            stats = data.responses() if data is not None and method != "tucker" else None
            if method == "tucker":
                new = tucker_decompose_conv(layer, entry["ranks"], data=data)
                row, new = _finish(name, kind, layer, new, "tucker", tuple(entry["ranks"]), macs, in_shape,
                                   note, rescale=rescale_layer)
            elif method == "cp":
                row, new = _decompose_cp(name, layer, entry["rank"], cp_max_iter, seed, macs, in_shape,
                                         rescale_layer, stats, note)
            elif method == "svd":
                new = (svd_decompose_conv1x1(layer, entry["rank"], stats=stats) if kind == "conv" else
                       svd_decompose_linear(layer, entry["rank"], stats=stats))
                row, new = _finish(name, kind, layer, new, "svd", (entry["rank"],), macs, in_shape, note,
                                   rescale=rescale_layer)
            else:
                new = diagonal_decompose_linear(layer, bandwidth=entry["bandwidth"])
                row, new = _finish(name, kind, layer, new, "diagonal", (new.bandwidth,), macs, in_shape)
            if mean_correction and fit_data and data is None and new is not None and method != "diagonal":
                # Too few samples for the moments, enough for the means: keep the mean response.
                if _correct_mean(original, model, name, new, batches, inputs):
                    row.reason = "; ".join(x for x in (row.reason, "bias matched to the mean response") if x)
        if new is not None:
            new.train(layer.training)  # the replacement in the mode of the layer it replaces
            replace_layer(model, name, new)
        row.why = entry.get("why", "")
        row.seconds = time.perf_counter() - start
        rows.append(row)
        logger.debug("%s: %s", name, row)
    if batches is not None and recalibrate_bn:
        count = calibration_data.reestimate_batchnorm(model, batches, reference=original)
        if count:
            logger.info("re-estimated %d BatchNorm layers on %d calibration images", count,
                        sum(len(b) for b in batches))
    return rows


def _correct_mean(original: nn.Module, model: nn.Module, name: str, new: nn.Module, batches: list[torch.Tensor],
                  inputs) -> bool:
    """Shift the bias of ``new`` (data-free factors of ``name``) so that its mean output on the
    calibration inputs in ``model`` is the original layer's on its own: the per-channel mean
    correction of data-free compression (Nagel et al. 2019 [10]_'s bias correction, measured here on
    the demo: VGG16's FC layers at 5% of their rank, 70.6% -> 76.3% against 77.5%; on the trained
    VGG16 of the Fashion-MNIST benchmark it cost 1.5 points, hence opt-in).  False when the
    replacement has no bias to shift."""
    bias = getattr(new[-1], "bias", None) if isinstance(new, nn.Sequential) else None
    if bias is None:
        return False
    mean_original, mean_new = calibration_data.response_means(original, model, name, new, batches, inputs=inputs)
    with torch.no_grad():
        bias.add_((mean_original - mean_new).to(bias.dtype))
    return True


def _data_for(original: nn.Module, model: nn.Module, name: str, layer: nn.Module, batches: list[torch.Tensor],
              in_shape, inputs, dim: int | None = None) -> tuple["calibration_data.LayerData | None", str]:
    """The calibration inputs of one layer, or None with the reason it stays data-free."""
    reason = calibration_data.data_free_reason(layer, in_shape, sum(len(b) for b in batches), dim=dim)
    if reason:
        return None, reason
    return calibration_data.LayerData(original, model, name, batches, inputs), ""


def _skipped(name: str, kind: str, layer: nn.Module, macs: int, reason: str) -> LayerReport:
    params = count_params(layer)
    return LayerReport(name, kind, tuple(layer.weight.shape), "-", None, params, params, macs, macs,
                       skipped=True, reason=reason)


def _finish(name, kind, layer, new, method, ranks_tuple, macs_before, in_shape, note="", rescale=False) -> tuple:
    params_before, params_after = count_params(layer), count_params(new)
    if not all(torch.isfinite(p).all() for p in new.parameters()):
        return _skipped(name, kind, layer, macs_before, f"{method} gave non-finite weights"), None
    if params_after >= params_before:
        return _skipped(name, kind, layer, macs_before,
                        f"{method} at ranks {ranks_tuple} would not shrink the layer "
                        f"({params_after} >= {params_before} params)"), None
    if rescale and method != "diagonal":
        restore_filter_norms(new, layer.weight)
    row = LayerReport(name, kind, tuple(layer.weight.shape), method, ranks_tuple, params_before, params_after,
                      macs_before, macs_at(new, in_shape), error=_relative_error(layer.weight, dense_weight(new)),
                      reason=note)
    return row, new


def _decompose_cp(name, layer, rank, cp_max_iter, seed, macs_before, in_shape, rescale, stats=None, note=""):
    kind = "conv"
    # Check the size first: no point running ALS for a layer that would grow.
    cp_params = rank * (layer.in_channels + sum(layer.kernel_size) + layer.out_channels)
    if cp_params >= count_params(layer):
        return _skipped(name, kind, layer, macs_before, f"cp at rank {rank} would not shrink the layer "
                        f"({cp_params} >= {count_params(layer)} weights)"), None
    failures = []
    for attempt in range(CP_RETRIES + 1):
        init = "svd" if attempt == 0 else "random"
        try:
            new = cp_decompose_conv(layer, rank, max_iter=cp_max_iter, init=init, seed=seed + attempt, stats=stats)
            retried = f"CP retried after: {'; '.join(failures)}" if failures else ""
            return _finish(name, kind, layer, new, "cp", (rank,), macs_before, in_shape,
                           "; ".join(x for x in (note, retried) if x), rescale)
        except CPDiverged as exc:
            failures.append(f"{init} start: {exc}")
            logger.warning("%s: CP-ALS failed (%s)", name, exc)
    ranks_t = cp_fallback_ranks(layer, rank)
    fallback = f"CP failed ({'; '.join(failures)}); fell back to Tucker-2 at ranks {ranks_t}"
    warnings.warn(f"{name}: {fallback}", RuntimeWarning, stacklevel=3)
    new = tucker_decompose_conv(layer, ranks_t, stats=stats)
    return _finish(name, kind, layer, new, "tucker", ranks_t, macs_before, in_shape,
                   "; ".join(x for x in (note, fallback) if x), rescale)


# ---------------------------------------------------------------- plans (check, save, load)
PLAN_METHODS = ("tucker", "cp", "svd", "diagonal", "none")
# Keys an entry may hold besides "method": the rank field of its method, and text for people.
PLAN_ENTRY_KEYS = {"tucker": {"ranks"}, "cp": {"rank"}, "svd": {"rank"}, "diagonal": {"bandwidth"}, "none": set()}
PLAN_TEXT_KEYS = {"why", "reason"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def plan_entry_problem(name: Any, entry: Any) -> str | None:
    """What is wrong with the form of one plan entry, whatever the model (None when nothing)."""
    if not isinstance(name, str) or not name:
        return f"layer names must be non-empty text, got {str(name)[:60]!r}"
    if not isinstance(entry, dict):
        return f"layer {name!r}: an entry must be an object with a \"method\", got {type(entry).__name__}"
    method = entry.get("method")
    if not isinstance(method, str) or method not in PLAN_METHODS:
        return f"layer {name!r}: method must be one of {', '.join(PLAN_METHODS)}, got {str(method)[:40]!r}"
    extra = set(entry) - {"method"} - PLAN_ENTRY_KEYS[method] - PLAN_TEXT_KEYS
    missing = PLAN_ENTRY_KEYS[method] - set(entry)
    if extra or missing:
        what = f"unknown key {str(sorted(map(str, extra))[0])[:40]!r}" if extra else f"missing {sorted(missing)[0]!r}"
        return f"layer {name!r}: {what} for method {method!r}"
    for key in PLAN_TEXT_KEYS & set(entry):
        if not isinstance(entry[key], str):
            return f"layer {name!r}: {key!r} must be text"
    if method == "tucker":
        ranks = entry["ranks"]
        if not (isinstance(ranks, list) and len(ranks) == 2 and all(_is_int(r) and r >= 1 for r in ranks)):
            return f"layer {name!r}: tucker ranks must be two integers >= 1, [R_out, R_in], got {str(ranks)[:60]}"
    elif method != "none":
        key = "bandwidth" if method == "diagonal" else "rank"
        if not _is_int(entry[key]) or entry[key] < 1:
            return f"layer {name!r}: {method} {key} must be an integer >= 1, got {str(entry[key])[:60]}"
    return None


def _fit_problem(name: str, entry: dict, layer: nn.Module | None, *, shrink: bool = True) -> str | None:
    """What keeps a well-formed entry from fitting ``layer`` (None when it fits).  ``shrink``: a
    diagonal band must store fewer weights than the layer (a plan to apply); without it, any band
    the layer takes (a model file's structure, written by earlier versions too)."""
    if layer is None:
        return f"layer {name!r} is not in the model"
    method = entry["method"]
    if isinstance(layer, DECOMPOSED_TYPES):
        return f"layer {name!r} is already decomposed"
    if method == "none":
        return None
    if method in ("tucker", "cp") and not isinstance(layer, nn.Conv2d):
        return f"layer {name!r} is a {type(layer).__name__}; {method} applies to Conv2d layers"
    if method == "diagonal" and not isinstance(layer, nn.Linear):
        return f"layer {name!r} is a {type(layer).__name__}; {method} applies to Linear layers"
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return f"layer {name!r} is a grouped convolution (groups={layer.groups}); only 'none' fits"
    if method == "svd" and isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1):
        return f"layer {name!r} is a {layer.kernel_size[0]}x{layer.kernel_size[1]} convolution; svd applies to " \
               f"Linear layers and 1x1 convolutions"
    if method == "tucker":
        limits = (layer.out_channels, layer.in_channels)
        if any(r > lim for r, lim in zip(entry["ranks"], limits)):
            return f"layer {name!r}: tucker ranks {entry['ranks']} exceed the layer's channels {list(limits)}"
    elif method == "cp" and entry["rank"] > cp_rank_limit(layer):
        return f"layer {name!r}: cp rank {entry['rank']} exceeds {cp_rank_limit(layer)}, beyond which a CP " \
               f"layer is larger than the original"
    elif method == "svd" and entry["rank"] > min(matrix_shape(layer)):
        return f"layer {name!r}: svd rank {entry['rank']} exceeds min(out, in) = {min(matrix_shape(layer))}"
    elif method == "diagonal":
        limit = diagonal_bandwidth_limit(layer) if shrink else layer.in_features
        if entry["bandwidth"] > limit:
            if not shrink:
                return f"layer {name!r}: bandwidth {entry['bandwidth']} exceeds the layer's {layer.in_features} inputs"
            return (f"layer {name!r}: bandwidth {entry['bandwidth']} stores at least as many weights as the dense "
                    f"{layer.out_features}x{layer.in_features} layer (at most {limit} here)")
    return None


def diagonal_bandwidth_limit(layer: nn.Linear) -> int:
    """The widest band of a :class:`DiagonalLinear` that stores fewer weights than ``layer``:
    ``max(M, N) x b`` weights (and as many gathered inputs per sample in the forward pass)
    against the dense ``M x N`` (0 when no band does)."""
    return (layer.in_features * layer.out_features - 1) // max(layer.in_features, layer.out_features)


def check_plan(model: nn.Module, plan: Any, *, shrink: bool = True) -> None:
    """Raise ValueError (one line, naming the layer) when ``plan`` does not fit ``model``
    (``shrink``: see :func:`_fit_problem`)."""
    if not isinstance(plan, Mapping):
        raise ValueError(f"a plan must map layer names to entries, got {type(plan).__name__}")
    modules = dict(model.named_modules())
    decomposed = [n for n, m in modules.items() if isinstance(m, DECOMPOSED_TYPES)]
    for name, entry in plan.items():
        problem = plan_entry_problem(name, entry)
        if problem is None:
            layer = modules.get(name)
            if layer is not None and _inside_decomposed(name, decomposed):
                # A factor of a decomposed layer: decomposing it again would need nested plans,
                # which model files cannot rebuild.
                problem = f"layer {name!r} is part of an already decomposed layer"
            elif layer is not None and not isinstance(layer, (nn.Conv2d, nn.Linear, *DECOMPOSED_TYPES)):
                problem = f"layer {name!r} is a {type(layer).__name__}, not a Conv2d or Linear layer"
            else:
                problem = _fit_problem(name, entry, layer, shrink=shrink)
        if problem:
            raise ValueError(problem)


def model_plan(model: nn.Module) -> dict[str, dict]:
    """The decomposition plan of a model: qualified name -> ``plan_entry()``.

    Together with the architecture it is all that is needed to rebuild the
    module structure before loading a state_dict (see :func:`apply_plan`).
    """
    return {name: m.plan_entry() for name, m in model.named_modules() if isinstance(m, DECOMPOSED_TYPES)}


def apply_plan(model: nn.Module, plan: dict[str, dict]) -> nn.Module:
    """Replace the layers named in ``plan`` by empty decomposed modules of the same structure.

    The weights are then filled by ``load_state_dict``.  Raises ``ValueError`` (from
    :func:`check_plan`) when the plan does not fit the model; "none" entries are ignored.
    """
    check_plan(model, plan, shrink=False)  # a model file's structure, whatever made it
    for name, entry in plan.items():
        if entry["method"] != "none":
            replace_layer(model, name, empty_replacement(model.get_submodule(name), entry))
    return model


def empty_replacement(layer: nn.Module, entry: dict) -> nn.Module:
    """The decomposed module of a plan entry for ``layer``, default-initialised on the layer's
    device and dtype: the structure a state_dict is loaded into, or whose cost is counted or timed."""
    method = entry["method"]
    if method == "tucker":
        return TuckerConv2d(layer, entry["ranks"])
    if method == "cp":
        return CPConv2d(layer, entry["rank"])
    if method == "svd":
        return SVDConv2d(layer, entry["rank"]) if isinstance(layer, nn.Conv2d) else SVDLinear(layer, entry["rank"])
    if method == "diagonal":
        return DiagonalLinear(layer.in_features, layer.out_features, bandwidth=int(entry["bandwidth"]),
                              bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype)
    raise ValueError(f"no replacement for method {method!r}")
