"""Choose the ranks of a decomposition: the one place in the tool where a rank is decided.

:func:`plan_decomposition` turns a :class:`Policy` into a *plan*, and
:func:`decompositions.decompose_model` applies a plan.  A plan is plain data, the dict
that model files store (``qualified layer name -> entry``)::

    {"features.2":  {"method": "tucker", "ranks": [21, 20], "why": "VBMF"},
     "features.28": {"method": "cp", "rank": 64},
     "classifier.0": {"method": "svd", "rank": 128},
     "classifier.3": {"method": "diagonal", "bandwidth": 1},
     "features.0":  {"method": "none", "reason": "first conv (image channels) kept"}}

so a user can read, edit and replay what the tool chose (:func:`write_plan`,
:func:`read_plan`, ``main.py --save_plan / --plan``).  ``ranks`` of a Tucker-2 entry are
``(R_out, R_in)``; ``why`` and ``reason`` are for people and change nothing.

Rank rules (a :class:`Policy` picks one for the convs and one for the FC layers):

* VBMF (default): the EVBMF rank of each unfolding (Kim et al. 2015 [1]_, Nakajima et
  al. 2013 [2]_), weakened by ``k`` as in MUSCO (Gusak et al. 2019 [3]_):
  ``R_w = R - k (R - R_vbmf)`` with ``R`` the full rank; ``k = 1`` is plain VBMF,
  ``k = 0`` keeps every layer, ``k > 1`` goes beyond VBMF (clipped at rank 1).
* a fixed fraction of the channels (``rank_ratio``, ``fc_rank_ratio``) or a fixed SVD
  rank (``fc_rank``).
* a budget (``target_macs`` / ``target_params``): the whole model ``R`` times smaller,
  within 3%, ranks chosen jointly across every decomposed layer from error bounds that
  the singular values give: the smallest sum of their squares (default) or the smallest
  worst layer's, see :func:`_budget_plan`.

References
----------
.. [1] Kim, Y.-D. et al. "Compression of Deep Convolutional Neural Networks for Fast and
   Low Power Mobile Applications", ICLR 2016, arXiv:1511.06530.
.. [2] Nakajima, S. et al. "Global analytic solution of fully-observed variational
   Bayesian matrix factorization", JMLR 14, 2013.
.. [3] Gusak, J. et al. "Automated Multi-Stage Compression of Neural Networks" (MUSCO),
   ICCV Workshops 2019, arXiv:1903.09973.
.. [4] Liebenwein, L. et al. "Compressing Neural Networks: Towards Determining the
   Optimal Layer-wise Decomposition" (ALDS), NeurIPS 2021, arXiv:2107.11442.
.. [5] De Lathauwer, L. et al. "A multilinear singular value decomposition", SIAM J.
   Matrix Anal. Appl. 21(4), 2000 (the truncated HOSVD error bound).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy.interpolate import RegularGridInterpolator
from torch import nn

import decompositions as D
import inference
import latency
import report
import vbmf
from diagonal import DIAGONAL_BANDWIDTH
from errors import UserError
from report import short_list
from threads import lapack_threads

logger = logging.getLogger(__name__)

__all__ = ["Policy", "plan_decomposition", "estimate_tucker_ranks", "estimate_cp_rank", "weaken",
           "check_plan", "plan_cost", "structural", "read_plan", "write_plan", "BudgetError",
           "svd_rank_for_params", "PLAN_FORMAT", "PLAN_VERSION", "PLAN_METHODS"]

PLAN_FORMAT = "lowrank-cnn-plan"
PLAN_VERSION = 1
# A plan file is a few kB per layer; anything far larger is not one (and is not read whole).
MAX_PLAN_BYTES = 8 * 1024 * 1024
# Bisection steps on the squared error of the budget rule: 2 / 2**60 is far below the
# smallest change of any layer's error bound.
BUDGET_BISECTION_STEPS = 60
# The largest squared relative error bound a Tucker-2 layer can have: two tails of 1.
MAX_ERROR2 = 2.0
# Range (log10) of the Lagrange multiplier of the "sum" budget rule, for costs counted as
# shares of the whole model and squared relative errors in [0, 2]: from "any saving is
# worth nothing" to "any saving is worth everything" (at 1e12, one MAC of a 1e9-MAC model
# still outweighs the largest error difference, 2).
LAGRANGE_LOG10 = (-6.0, 12.0)
BUDGET_RULES = ("sum", "minimax")
# At most this many single-layer upgrades spend what the bisection leaves of a budget
# (each moves one layer along its Pareto front, usually by many ranks at once).
BUDGET_FILL_STEPS = 10_000
#: A budget is met when the whole model is between R and R (1 + this) times smaller.
BUDGET_TOLERANCE = 0.03
# Relative slack when comparing a planned cost with the allowed one (float rounding only).
COST_RTOL = 1e-12
# The bisection stops when its interval is this narrow (in the rule's parameter, in [0, 1]).
BISECTION_XTOL = 1e-15
# Options whose error removed per unit of cost is within this fraction of the best count as tied.
FILL_SCORE_RTOL = 1e-6


class BudgetError(UserError):
    """The requested budget cannot be met (the message names the best reachable ratio).

    ``reachable`` holds that ratio when the budget is out of reach; ``floor`` the least ratio
    that can be planned when layers with fixed ranks already give more than was asked (None
    otherwise).
    """

    reachable: float | None = None
    floor: float | None = None


# ---------------------------------------------------------------------------- VBMF
def _unfold(weight: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: ``(shape[mode], prod(other dims))``."""
    return weight.movedim(mode, 0).reshape(weight.shape[mode], -1)


def estimate_tucker_ranks(conv: nn.Conv2d) -> tuple[int, int]:
    """EVBMF ranks ``(R_out, R_in)`` of the out- and in-channel unfoldings of a conv weight.

    The weight ``(T, S, kh, kw)`` is unfolded along mode 0 ``(T, S*kh*kw)`` and mode 1
    ``(S, T*kh*kw)``.  Either rank may be 0: EVBMF found only noise on that mode.

    References
    ----------
    Kim et al. 2015 [1]_ (rank selection by VBMF), Nakajima et al. 2013 [2]_.
    """
    weight = conv.weight.detach()
    return vbmf.estimate_rank(_unfold(weight, 0)), vbmf.estimate_rank(_unfold(weight, 1))


def estimate_cp_rank(conv: nn.Conv2d) -> int:
    """A VBMF-based CP rank: the larger of the two EVBMF Tucker ranks.

    A CP decomposition of rank R has multilinear ranks at most R, so R must be at least
    the larger multilinear rank that the data supports; we take exactly that.
    """
    return max(estimate_tucker_ranks(conv))


def weaken(rank_vbmf: int, full: int, k: float) -> int:
    """MUSCO's weakened rank ``R - k (R - R_vbmf)``, rounded, between 1 and ``R``.

    ``k = 0`` gives the full rank ``R``, ``k = 1`` exactly the VBMF rank, ``k > 1`` goes
    below VBMF, clipped at 1.  A VBMF rank of 0 (EVBMF found only noise, so plain VBMF
    keeps the layer) stays 0 for every ``k``: weakening moves towards keeping the layer
    and never compresses what VBMF keeps, which keeps the ranks monotone in ``k``.
    """
    if rank_vbmf == 0:
        return 0
    # In floats first: a huge k must clip to 1, not overflow round().
    value = max(1.0, min(float(full), full - k * (full - rank_vbmf)))
    return int(round(value))


# --------------------------------------------------------------------------- policy
@dataclass(frozen=True)
class Policy:
    """How to choose ranks; see the module docstring.

    Parameters
    ----------
    conv : {"tucker", "cp", "none", "auto"}
        Conv decomposition ("none": convs stay as they are; "auto", with a budget: Tucker-2,
        CP or keep for each layer, whichever removes the most error per unit of cost, see
        :func:`_budget_plan`).
    fc : {"none", "svd", "diagonal"}
        Compression of the Linear layers; the last one (the classifier) stays dense
        unless ``keep_last_linear=False``.
    rank_ratio : float in (0, 1], optional
        Conv ranks as a fraction of the channels instead of VBMF: Tucker
        ``round(ratio T), round(ratio S)``, CP ``round(ratio max(T, S))``.
    vbmf_weaken : float >= 0
        MUSCO's ``k`` for every VBMF rank (:func:`weaken`); 1 is plain VBMF.
    fc_rank, fc_rank_ratio : optional
        SVD rank of every compressed Linear layer, absolute or as a fraction of
        ``min(M, N)``; VBMF (weakened by ``vbmf_weaken``) when neither is given.
    fc_bandwidth : int
        Bandwidth of the diagonal FC structure.
    target_macs, target_params : float > 1, optional
        A budget: the whole model this many times smaller in MACs (at the plan's input
        size) or in parameters, within :data:`BUDGET_TOLERANCE`; at most one of the three.
        It chooses the conv ranks and, unless ``fc_rank`` / ``fc_rank_ratio`` fix them,
        the SVD ranks of the FC layers.
    target_latency : float > 1, optional
        A budget in measured time: the whole model this many times faster on the backend
        of the :class:`latency.LatencyTable` given to :func:`plan_decomposition`, at the
        plan's input size and the table's batch (layers timed at a grid of ranks, the
        planned model timed whole, :func:`_latency_plan`).
    skip : mapping name -> reason
        Layers to keep as they are, with the reason the report gives.
    keep_last_linear : bool
        Keep the last Linear layer (the classifier) dense.
    budget_rule : {"sum", "minimax"}
        How a budget spreads over the layers (see :func:`_budget_plan`): the smallest sum
        of squared error bounds (default) or the smallest worst-layer bound.
    rank_multiple : int >= 2, optional
        Ranks the kernels like: every rank of a mode with at least two blocks of this many
        channels is a multiple of it (onnxruntime's NCHWc blocks are 16 channels on AVX-512,
        tensor cores like multiples of 8).  Fixed rules (VBMF, ratios, fixed FC ranks) round
        up, which costs no accuracy; a budget chooses among the aligned ranks only, so the
        plan's MACs are the ones the model runs (with 16, the ONNX export's
        ``inference.ONNX_RANK_MULTIPLE``, those ranks need no zero padding there).
    """

    conv: str = "tucker"
    fc: str = "none"
    rank_ratio: float | None = None
    vbmf_weaken: float = 1.0
    fc_rank: int | None = None
    fc_rank_ratio: float | None = None
    fc_bandwidth: int = DIAGONAL_BANDWIDTH
    target_macs: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    skip: Mapping[str, str] = field(default_factory=dict)
    keep_last_linear: bool = True
    budget_rule: str = "sum"
    rank_multiple: int | None = None

    def __post_init__(self) -> None:
        if self.conv not in (*D.CONV_METHODS, "auto"):
            raise ValueError(f"conv must be one of {(*D.CONV_METHODS, 'auto')}, got {self.conv!r}")
        targets = [n for n in ("target_macs", "target_params", "target_latency") if getattr(self, n) is not None]
        if self.conv == "auto" and not targets:
            raise ValueError("conv='auto' (Tucker-2, CP or keep, per layer) chooses under a budget: give "
                             "target_macs, target_params or target_latency")
        if self.fc not in D.FC_METHODS:
            raise ValueError(f"fc must be one of {D.FC_METHODS}, got {self.fc!r}")
        for what, value in (("rank_ratio", self.rank_ratio), ("fc_rank_ratio", self.fc_rank_ratio)):
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{what} must be in (0, 1], got {value}")
        if not (math.isfinite(self.vbmf_weaken) and self.vbmf_weaken >= 0):
            raise ValueError(f"vbmf_weaken must be a finite number >= 0, got {self.vbmf_weaken}")
        if self.fc_rank is not None and self.fc_rank < 1:
            raise ValueError(f"fc_rank must be >= 1, got {self.fc_rank}")
        if self.fc_bandwidth < 1:
            raise ValueError(f"fc_bandwidth must be >= 1, got {self.fc_bandwidth}")
        for what in targets:
            value = getattr(self, what)
            if value is not None and not (math.isfinite(value) and value > 1):
                raise ValueError(f"{what} must be a finite ratio > 1, got {value}")
        if self.rank_multiple is not None and (isinstance(self.rank_multiple, bool) or not isinstance(
                self.rank_multiple, int) or self.rank_multiple < 2):
            raise ValueError(f"rank_multiple must be an integer >= 2 or None, got {self.rank_multiple!r}")
        if self.budget_rule not in BUDGET_RULES:
            raise ValueError(f"budget_rule must be one of {BUDGET_RULES}, got {self.budget_rule!r}")
        if len(targets) > 1:
            raise ValueError(f"give one budget, not {' and '.join(targets)}")
        if self.budget is not None:
            # A fixed FC rank (fc_rank / fc_rank_ratio) may stay: those layers then count as a
            # fixed cost and the budget allocates the rest.  Conv ranks are the budget's.
            fixed = [n for n, v in (("rank_ratio", self.rank_ratio),) if v is not None]
            fixed += ["vbmf_weaken"] if self.vbmf_weaken != 1 else []
            if fixed:
                raise ValueError(f"a budget chooses the conv ranks; it cannot be combined with {', '.join(fixed)}")
        vbmf_convs = self.conv != "none" and self.rank_ratio is None
        vbmf_fc = self.fc == "svd" and self.fc_rank is None and self.fc_rank_ratio is None
        if self.vbmf_weaken != 1 and self.budget is None and not (vbmf_convs or vbmf_fc):
            raise ValueError("vbmf_weaken weakens VBMF ranks, and these settings choose none by VBMF "
                             "(rank_ratio, fc_rank or fc_rank_ratio fix them)")
        object.__setattr__(self, "skip", dict(self.skip))

    @property
    def budget(self) -> tuple[str, float] | None:
        """``("macs", R)``, ``("params", R)``, ``("latency", R)`` or None."""
        if self.target_macs is not None:
            return "macs", float(self.target_macs)
        if self.target_params is not None:
            return "params", float(self.target_params)
        if self.target_latency is not None:
            return "latency", float(self.target_latency)
        return None


# ---------------------------------------------------------------------------- sites
@dataclass
class _Site:
    """One layer the policy looks at, with what the planner needs to know about it."""

    name: str
    layer: nn.Module
    kind: str                   # "conv" or "linear"
    method: str                 # what the policy asks for: tucker, cp, svd, diagonal
    in_shape: torch.Size | None  # None: not reached by a forward pass
    macs: int
    params: int
    calls: int = 1              # times the forward pass calls it


def _sites(model: nn.Module, policy: Policy, input_size: Sequence[int]) -> list[_Site]:
    """The layers the policy decomposes, in model order (already decomposed ones excluded)."""
    calls: dict[str, int] = {}
    shapes = report.record_input_shapes(model, input_size, calls=calls)
    sites = []
    candidates = D.candidate_layers(model)
    linears = [n for n, m in candidates if isinstance(m, nn.Linear)]
    for name, layer in candidates:
        kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        method = policy.conv if kind == "conv" else policy.fc
        if method == "none":
            continue
        if kind == "conv" and tuple(layer.kernel_size) == (1, 1):
            method = "svd"  # a 1x1 conv is a per-pixel Linear: a pair of 1x1 convs, not a Tucker-2 of 1x1 kernels
        if kind == "linear" and policy.keep_last_linear and name == linears[-1]:
            method = "keep-last"
        in_shape, macs = shapes.get(name, (None, 0))
        sites.append(_Site(name, layer, kind, method, in_shape, macs, D.count_params(layer), calls.get(name, 0)))
    return sites


def _site_reason(site: _Site, policy: Policy) -> str | None:
    """Why a site is kept whatever the rank rule, or None."""
    if site.name in policy.skip:
        return policy.skip[site.name] or "excluded by the caller"
    if site.method == "keep-last":
        return "last Linear (classifier) kept dense"
    if site.in_shape is None:
        return "not used in the forward pass"
    if site.calls > 1:
        # Its cost and its inputs are those of one call: a budget would count the others wrong.
        return f"called {site.calls} times in a forward pass (shared weights)"
    if site.kind == "conv" and site.layer.groups != 1:
        return f"grouped convolution (groups={site.layer.groups})"
    if site.method in ("tucker", "cp", "svd", "auto") and min(site.layer.weight.shape[:2]) < 2:
        return f"too small to factorize (weight {tuple(site.layer.weight.shape)})"
    return None


def _none(reason: str) -> dict:
    return {"method": "none", "reason": reason}


def _entry(site: _Site, ranks: Sequence[int], why: str) -> dict:
    """A plan entry for ``site`` at ``ranks``, or a "none" entry when it would not shrink."""
    ranks = [int(r) for r in ranks]
    if min(ranks) == 0:
        return _none(f"EVBMF found only noise (ranks {tuple(ranks)})" if why.startswith("VBMF")
                     else f"rank 0 ({why})")
    if site.method == "tucker":
        entry = {"method": "tucker", "ranks": ranks}
    else:
        entry = {"method": site.method, "rank": ranks[0]}
    params = _cost_model(site).params(ranks)
    if params >= site.params:
        return _none(f"{site.method} at ranks {tuple(ranks)} would not shrink the layer "
                     f"({params} >= {site.params} params)")
    entry["why"] = why
    return entry


def _mode_sizes(site: _Site) -> tuple[int, ...]:
    """The channel count each of a site's ranks cuts: Tucker-2 (out, in), CP the larger of the
    two, an SVD the smaller side of its matrix."""
    if site.method == "tucker":
        return site.layer.weight.shape[0], site.layer.weight.shape[1]
    if site.method == "cp":
        return (max(site.layer.weight.shape[:2]),)
    return (min(D.matrix_shape(site.layer)),)


def _blocked(size: int, multiple: int | None) -> bool:
    """Whether a mode of ``size`` channels takes ranks in blocks: at least two of them."""
    return multiple is not None and size >= 2 * multiple


def _aligned(site: _Site, entry: dict, multiple: int | None) -> dict:
    """``entry`` with its ranks rounded up to multiples of ``multiple`` (``Policy.rank_multiple``),
    re-checked: a layer that would no longer shrink is kept."""
    if multiple is None or entry["method"] not in ("tucker", "cp", "svd"):
        return entry
    ranks = entry["ranks"] if entry["method"] == "tucker" else [entry["rank"]]
    rounded = [min(n, -(-r // multiple) * multiple) if _blocked(n, multiple) else r
               for r, n in zip(ranks, _mode_sizes(site))]
    if rounded == list(ranks):
        return entry
    return _entry(site, rounded, f"{entry['why']}, rounded up to multiples of {multiple}")


def _ratio_rank(ratio: float, size: int) -> int:
    return max(1, min(size, round(ratio * size)))


def _rule_entry(site: _Site, policy: Policy, vbmf_cache: dict) -> dict:
    """The entry of a site under the fixed (non-budget) rules."""
    layer, k = site.layer, policy.vbmf_weaken
    if site.method == "diagonal":
        limit = D.diagonal_bandwidth_limit(layer)
        if limit < 1:
            return {"method": "none", "reason": f"no diagonal band is smaller than the {layer.out_features}x"
                                                f"{layer.in_features} layer"}
        if policy.fc_bandwidth > limit:
            return {"method": "none", "reason": f"a band of {policy.fc_bandwidth} would store at least as many "
                                                f"weights as the dense layer (at most {limit})"}
        return {"method": "diagonal", "bandwidth": policy.fc_bandwidth}
    if site.kind == "conv" and site.method == "svd":  # a 1x1 conv: the conv rules, one rank
        return _svd_entry(site, policy, vbmf_cache, ratio=policy.rank_ratio)
    if site.kind == "conv":
        out_c, in_c = layer.out_channels, layer.in_channels
        if policy.rank_ratio is not None:
            why = f"ratio {policy.rank_ratio:g}"
            if site.method == "tucker":
                return _entry(site, (_ratio_rank(policy.rank_ratio, out_c), _ratio_rank(policy.rank_ratio, in_c)), why)
            return _entry(site, (_ratio_rank(policy.rank_ratio, max(out_c, in_c)),), why)
        if k == 0:
            return _none("--vbmf_weaken 0 keeps every layer at full rank")
        r_out, r_in = _vbmf_ranks(site, vbmf_cache)
        why = "VBMF" if k == 1 else f"VBMF {r_out}x{r_in} weakened by k={k:g}"
        if site.method == "tucker":
            return _entry(site, (weaken(r_out, out_c, k), weaken(r_in, in_c, k)), why)
        return _entry(site, (weaken(max(r_out, r_in), max(out_c, in_c), k),), why)
    return _svd_entry(site, policy, vbmf_cache, ratio=policy.fc_rank_ratio, fixed=policy.fc_rank)


def _svd_entry(site: _Site, policy: Policy, vbmf_cache: dict, *, ratio: float | None,
               fixed: int | None = None) -> dict:
    """One SVD rank (a Linear layer's, a 1x1 conv's): fixed, a ratio of min(out, in), or (weakened) VBMF."""
    full, k = min(D.matrix_shape(site.layer)), policy.vbmf_weaken
    if fixed is not None:
        return _entry(site, (min(fixed, full),), f"fixed rank {fixed}")
    if ratio is not None:
        return _entry(site, (_ratio_rank(ratio, full),), f"ratio {ratio:g}")
    if k == 0:
        return _none("--vbmf_weaken 0 keeps every layer at full rank")
    rank = _vbmf_ranks(site, vbmf_cache)[0]
    return _entry(site, (weaken(rank, full, k),), "VBMF" if k == 1 else f"VBMF {rank} weakened by k={k:g}")


def _spectra(site: _Site, cache: dict) -> list[vbmf.VBMFResult]:
    """EVBMF of the matrices a site's ranks come from: two unfoldings of a conv, a Linear's weight.

    EVBMF computes every singular value on the way (``observed_singular_values``), so
    the VBMF ranks and the budget rule's error bounds share one SVD per matrix.
    """
    if site.name not in cache:
        weight = site.layer.weight.detach()
        if site.method == "svd":  # a Linear's weight, a 1x1 conv's (T, S) kernel
            matrices = [weight.reshape(weight.shape[0], -1)]
        else:
            matrices = [_unfold(weight, 0), _unfold(weight, 1)]
        with lapack_threads():
            cache[site.name] = [vbmf.evbmf(m) for m in matrices]
    return cache[site.name]


def _vbmf_ranks(site: _Site, cache: dict) -> tuple[int, ...]:
    return tuple(int(r.rank) for r in _spectra(site, cache))


# --------------------------------------------------------------------------- costs
@dataclass
class _CostModel:
    """Exact params and MACs of a site's factorized module as a function of its ranks.

    Every factorized module's cost is ``d + a r_in + c r_out + b r_in r_out`` (Tucker-2)
    or ``d + a r`` (CP, SVD): fitted from the module itself, built on the meta device
    at ranks 1 and 2, so the budget counts exactly what :mod:`report` counts, for any
    geometry (stride, padding, dilation) without a formula of its own.
    """

    params_coef: tuple[float, ...]
    macs_coef: tuple[float, ...]

    @staticmethod
    def _eval(coef, ranks) -> np.ndarray:
        if len(coef) == 4:
            d, a, c, b = coef
            r_out, r_in = ranks
            return d + a * np.asarray(r_in) + c * np.asarray(r_out) + b * np.asarray(r_in) * np.asarray(r_out)
        d, a = coef
        return d + a * np.asarray(ranks[0])

    def params(self, ranks) -> int | np.ndarray:
        out = self._eval(self.params_coef, ranks)
        return int(round(float(out))) if np.ndim(out) == 0 else np.rint(out)

    def macs(self, ranks) -> int | np.ndarray:
        out = self._eval(self.macs_coef, ranks)
        return int(round(float(out))) if np.ndim(out) == 0 else np.rint(out)


def _cost_model(site: _Site) -> _CostModel:
    cached = getattr(site, "_costs", None)
    if cached is not None:
        return cached
    layer = site.layer
    with torch.device("meta"):
        if site.kind == "conv":
            probe = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                              padding=layer.padding, dilation=layer.dilation, padding_mode=layer.padding_mode,
                              bias=layer.bias is not None)
        else:
            probe = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    in_shape = site.in_shape if site.in_shape is not None else None

    def cost(ranks):
        module = D.empty_replacement(probe, _rank_entry(site.method, ranks))
        macs = D.macs_at(module, in_shape) if in_shape is not None else 0
        return D.count_params(module), macs

    if site.method == "tucker":
        # (r_out, r_in) at (1,1), (2,1), (1,2), (2,2) -> the four coefficients.
        f11, f21, f12, f22 = (cost(r) for r in ((1, 1), (2, 1), (1, 2), (2, 2)))
        coefs = []
        for i in range(2):
            b = f22[i] - f21[i] - f12[i] + f11[i]
            c = f21[i] - f11[i] - b
            a = f12[i] - f11[i] - b
            coefs.append((f11[i] - a - b - c, a, c, b))
    else:
        f1, f2 = cost((1,)), cost((2,))
        coefs = [(f1[i] - (f2[i] - f1[i]), f2[i] - f1[i]) for i in range(2)]
    model = _CostModel(tuple(coefs[0]), tuple(coefs[1]))
    site._costs = model
    return model


def _diagonal_cost(site: _Site, bandwidth: int) -> tuple[int, int]:
    layer = site.layer
    with torch.device("meta"):
        module = D.DiagonalLinear(layer.in_features, layer.out_features, bandwidth=bandwidth,
                                  bias=layer.bias is not None)
    return D.count_params(module), D.macs_at(module, site.in_shape)


# ------------------------------------------------------------------------- latency
def _rank_entry(method: str, ranks: Sequence[int]) -> dict:
    """A plan entry of a factorizing method at ``ranks`` ((R_out, R_in) for Tucker-2, (R,) else)."""
    return {"method": method, "ranks": list(ranks)} if method == "tucker" else {"method": method, "rank": ranks[0]}


def _timed_children(module: nn.Module, in_shape: Sequence[int], table) -> float:
    """Sum of the table's times of a decomposed module's layers, each at its own input shape.

    Timing the small layers one by one (not the chain) lets every grid point share the
    layers it has in common with the others: a Tucker-2 layer's first 1x1 conv depends on
    ``R_in`` only, its last on ``R_out`` only.
    """
    shapes: dict[int, tuple[int, ...]] = {}
    children = list(module)

    def record(i: int):
        def hook(mod, args) -> None:  # returns None: a pre-hook's return value would replace the input
            shapes.setdefault(i, tuple(args[0].shape[1:]))
        return hook

    hooks = [child.register_forward_pre_hook(record(i)) for i, child in enumerate(children)]
    try:
        with torch.no_grad():
            probe = next(module.parameters())
            module(torch.zeros(1, *in_shape, device=probe.device, dtype=probe.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return sum(table.ms(child, shapes[i]) for i, child in enumerate(children))


class _SiteLatency:
    """Measured milliseconds of one layer and of its replacement at any ranks (interpolated).

    The replacement is timed at :func:`latency.rank_grid` ranks (Tucker-2: every pair of the
    two grids), padded as the backend runs it (onnxruntime: ranks to channel blocks of 16,
    ``inference.pad_ranks``); a rank in between takes the linear interpolation of its padded
    rank between the grid points around it.
    """

    def __init__(self, site: _Site, table, *, cp_measured: bool = False) -> None:
        # pad_ranks pads the ranks of conv replacements only (an SVD Linear's rank is not a channel count).
        self.multiple = table.rank_multiple if site.kind == "conv" else None
        in_shape = tuple(site.in_shape[1:])
        self.keep = table.ms(site.layer, in_shape)
        weight = site.layer.weight
        if site.method == "tucker":
            fulls = [weight.shape[0], weight.shape[1]]
        elif site.method == "cp":
            # Up to the highest rank the budget may choose, as the backend pads it (a rank just
            # under the cap runs as the block above): no time spent on ranks never options.
            top = _cp_max_rank(site.layer, measured=cp_measured)
            if self.multiple:
                top = min(D.cp_rank_limit(site.layer), -(-top // self.multiple) * self.multiple)
            fulls = [top]
        else:
            # Ranks past the break-even (as many weights as the layer) are never options.
            t, s = D.matrix_shape(site.layer)
            fulls = [min(min(t, s), math.ceil(t * s / (t + s)))]
        self.grids = [np.asarray(latency.rank_grid(f)) for f in fulls]
        mesh = np.meshgrid(*self.grids, indexing="ij")
        times = np.zeros(mesh[0].shape)
        for index in np.ndindex(times.shape):
            module = D.empty_replacement(site.layer, _rank_entry(site.method, [int(m[index]) for m in mesh]))
            if self.multiple:
                module = inference.pad_ranks(module, self.multiple)
            times[index] = _timed_children(module, in_shape, table)
        self._interp = RegularGridInterpolator(tuple(g.astype(float) for g in self.grids), times)

    def __call__(self, ranks: Sequence[np.ndarray]) -> np.ndarray:
        points = []
        for r, grid in zip(ranks, self.grids):
            r = np.asarray(r)
            if self.multiple:
                r = -(-r // self.multiple) * self.multiple
            points.append(np.clip(r, grid[0], grid[-1]).astype(float))
        return self._interp(np.stack(points, axis=-1))


def _site_latency(site: _Site, table, *, cp_measured: bool = False) -> _SiteLatency | None:
    """The site's latency model, built once per table (the grid is the slow part).
    ``cp_measured``: the CP ranks' errors are measured (conv="auto"), so they span the whole range."""
    if site.in_shape is None:
        return None
    key = (site.method, site.method == "cp" and cp_measured, latency.signature(site.layer, tuple(site.in_shape[1:])))
    if key not in table.site_models:
        table.site_models[key] = _SiteLatency(site, table, cp_measured=cp_measured)
    return table.site_models[key]


def _other_layers_ms(model: nn.Module, input_size: Sequence[int], table, handled: set[str]) -> float:
    """The table's times of every conv and Linear layer not in ``handled`` (kept, or not a site)."""
    shapes = report.record_input_shapes(model, input_size)
    return sum(table.ms(layer, tuple(shapes[name][0][1:])) for name, layer in D.candidate_layers(model)
               if name not in handled and name in shapes)


def _entry_latency(site: _Site, entry: dict, table) -> float:
    """Measured milliseconds of a fixed plan entry's replacement (a diagonal or fixed-rank FC layer)."""
    in_shape = tuple(site.in_shape[1:])
    module = D.empty_replacement(site.layer, entry)
    if entry["method"] == "diagonal":
        return table.ms(module, in_shape)
    if site.kind == "conv" and table.rank_multiple:
        module = inference.pad_ranks(module, table.rank_multiple)
    return _timed_children(module, in_shape, table)


# -------------------------------------------------------------------------- budget
def _tails(result: vbmf.VBMFResult, full: int) -> np.ndarray:
    """``tail[r]``: the share of ``||W||^2`` beyond the ``r`` leading singular values, r = 0..full."""
    s2 = np.asarray(result.observed_singular_values, dtype=np.float64) ** 2
    total = s2.sum()
    tail = np.zeros(full + 1)
    if total > 0:
        # Suffix sums, so that tail[len(s2)] (and beyond) is exactly 0.
        suffix = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]]) / total
        n = min(full, len(s2))
        tail[:n + 1] = suffix[:n + 1]
    return tail


def _pareto_front(ranks: tuple[np.ndarray, ...], bound2: np.ndarray, value: np.ndarray):
    """The options no other one beats in both cost and error: ``(ranks, bound2, value)`` by cost.

    By cost, then bound, each option is kept whose bound is below every cheaper one's.  A
    Tucker-2 layer's T x S options shrink to a few hundred.  Options with no finite error (CP
    ranks whose every ALS probe diverged) are none: neither rule could choose them, and the
    "most these layers can give" must not count them.
    """
    finite = np.isfinite(bound2)
    ranks, bound2, value = tuple(r[finite] for r in ranks), bound2[finite], value[finite]
    order = np.lexsort((bound2, value))
    ranks, bound2, value = tuple(r[order] for r in ranks), bound2[order], value[order]
    front = np.ones(len(value), dtype=bool)
    if len(value):
        front[1:] = bound2[1:] < np.minimum.accumulate(bound2)[:-1]
    return tuple(r[front] for r in ranks), bound2[front], value[front]


#: Under a budget without measured CP errors (conv="cp"), CP ranks go up to this fraction of
#: ``cp_rank_limit`` only.  The proxy (``_BudgetSite._cp_bound2``) falls to 0 at the limit, but
#: CP-ALS does not: on the trained VGG16 of the CIFAR-10 benchmark (layers of 64x64 to 512x512
#: channels) the proxy was at or above ALS's squared error at every fraction up to 0.9
#: (e.g. 0.030 against 0.006 on a 512x512 layer) and below it at 1.0 (0 against 0.0001-0.0022;
#: 30-100 ALS iterations; benchmarks/RESULTS.md has the table).
#: Without the cap, a budget chose ranks within 0.2% of the limit on layers whose MACs are cheap
#: (2287 of 2291 on 2x2 maps at 32 px): nothing saved, a real error, and the slowest ALS there is.
CP_PROXY_MAX_FRACTION = 0.9


def _cp_max_rank(layer: nn.Module, *, measured: bool) -> int:
    """The highest CP rank a budget considers: where the CP layer is as large as the original
    (beyond, it never pays), or with the proxy for CP's error (not ``measured``) only up to
    :data:`CP_PROXY_MAX_FRACTION` of that."""
    limit = D.cp_rank_limit(layer)
    return limit if measured else max(1, math.floor(CP_PROXY_MAX_FRACTION * limit))


@dataclass
class _BudgetSite:
    """One layer's options under a budget: every rank choice that shrinks it, with its cost and error bound."""

    site: _Site
    costs: _CostModel
    tails: list[np.ndarray]
    metric: str
    cp_errors2: np.ndarray | None = None  # measured CP errors by rank (conv="auto"), instead of the proxy
    multiple: int | None = None  # Policy.rank_multiple: only ranks in blocks are options
    latency: _SiteLatency | None = None  # metric "latency": measured milliseconds by rank

    def __post_init__(self) -> None:
        site = self.site
        if site.method == "tucker":
            t_out, t_in = self.tails
            r_out, r_in = np.meshgrid(np.arange(1, len(t_out)), np.arange(1, len(t_in)), indexing="ij")
            ranks = (r_out.ravel(), r_in.ravel())
            bound2 = t_out[ranks[0]] + t_in[ranks[1]]
        else:
            full = (_cp_max_rank(site.layer, measured=self.cp_errors2 is not None) if site.method == "cp"
                    else min(D.matrix_shape(site.layer)))
            ranks = (np.arange(1, full + 1),)
            if site.method != "cp":
                bound2 = self.tails[0][ranks[0]]
            elif self.cp_errors2 is not None:
                bound2 = self.cp_errors2[np.minimum(ranks[0], len(self.cp_errors2) - 1)]
            else:
                bound2 = self._cp_bound2(ranks[0])
        params = self.costs.params(ranks)
        if self.metric == "latency":
            # A layer the forward pass never reaches has no time to save: no options, kept.
            value = self.latency(ranks) if self.latency is not None else np.zeros(len(ranks[0]))
            self.keep = self.latency.keep if self.latency is not None else 0.0
        else:
            value = (self.costs.macs(ranks) if self.metric == "macs" else params).astype(float)
            self.keep = site_cost(site, self.metric)
        useful = (params < site.params) & (value < self.keep)
        for r, size in zip(ranks, _mode_sizes(site)):
            if _blocked(size, self.multiple):
                useful &= r % self.multiple == 0
        self.ranks, self.bound2s, self.values = _pareto_front(tuple(r[useful] for r in ranks), bound2[useful],
                                                              value[useful])

    def choose(self, rule: str, level: float) -> tuple[tuple[int, ...] | None, float, float]:
        """(ranks or None to keep, cost, error bound^2) at a level of the rule.

        ``minimax``: the cheapest option whose squared error bound is at most ``level``.
        ``sum``: the option minimising ``bound^2 + level * cost`` (cost as a share of the
        whole model), the Lagrangian of the smallest total squared error.
        """
        if not len(self.values):
            return None, self.keep, 0.0
        if rule == "minimax":
            candidates = np.where(self.bound2s <= level, self.values, np.inf)
            best = int(np.argmin(candidates))
            if not np.isfinite(candidates[best]):
                return None, self.keep, 0.0
        else:
            objective = self.bound2s + level * self.values
            best = int(np.argmin(objective))
            if objective[best] >= level * self.keep:
                return None, self.keep, 0.0
        return tuple(int(r[best]) for r in self.ranks), float(self.values[best]), float(self.bound2s[best])

    def _cp_bound2(self, r: np.ndarray) -> np.ndarray:
        """An error proxy for CP rank ``r``; CP has no error bound from singular values.

        The proxy maps ``r`` to the fraction ``f = r / R_eq`` of the rank ``R_eq`` at
        which the CP layer has as many weights as the original, and takes the Tucker-2
        bound at ``(ceil(f T), ceil(f S))``: 0 where CP stops saving anything, the
        bound of rank 1 channels at the other end, and the same ordering of layers by
        how fast their spectra decay as for Tucker-2.  (Bounding by the multilinear
        ranks ``min(r, T)`` alone would call a CP layer exact at ``r = max(T, S)``,
        which it is not: the CP rank of a generic ``T x S x k x k`` tensor is far higher.)
        """
        layer = self.site.layer
        t_out, t_in = self.tails
        f = np.minimum(1.0, r / D.cp_rank_limit(layer))
        r_out = np.clip(np.ceil(f * layer.out_channels).astype(int), 1, len(t_out) - 1)
        r_in = np.clip(np.ceil(f * layer.in_channels).astype(int), 1, len(t_in) - 1)
        return t_out[r_out] + t_in[r_in]


    def method_of(self, ranks: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
        """The plan method and ranks of one of this site's options."""
        return self.site.method, ranks


#: CP-ALS runs at this many ranks per layer (geometrically spaced) to measure CP's error for
#: conv="auto"; the errors in between are interpolated on a log scale of the rank.
CP_PROBE_RANKS = 8
#: ALS iterations of each probe: the error has settled to within a few percent by then.
CP_PROBE_ITERS = 30


def _cp_errors2(site: _Site, cache: dict) -> np.ndarray:
    """Measured squared relative errors of CP at every rank 1 .. cp_rank_limit (index = rank).

    CP has no error bound from singular values, so under conv="auto" CP-ALS runs at
    :data:`CP_PROBE_RANKS` ranks; with calibration data the error is the output error on it
    (the output factor refitted, ``||(W - W~) L|| / ||W L||`` with ``L L^T`` the input moment),
    as the Tucker-2 bounds of the same plan are.  A probe whose ALS fails counts as no better
    than the next lower rank.
    """
    layer = site.layer
    weight = layer.weight.detach().double()
    limit = D.cp_rank_limit(layer)
    probes = np.unique(np.geomspace(1, max(1, limit - 1), CP_PROBE_RANKS).round().astype(int))
    metric, cov = cache.get((site.name, "metric"), (None, None))
    matrix = weight.reshape(weight.shape[0], -1)
    target = matrix @ metric if metric is not None else matrix
    norm2 = float(target.pow(2).sum())
    cross = matrix @ cov if metric is not None else None
    errors = []
    for rank in probes:
        try:
            (a, b, c, d), _ = D.cp_als(weight, int(rank), max_iter=CP_PROBE_ITERS)
        except D.CPDiverged:
            errors.append(np.nan)
            continue
        if metric is not None:
            a = D.cp_refit_output(b, c, d, cov, cross)
        approx = torch.einsum("tr,sr,hr,wr->tshw", a, b, c, d).reshape(matrix.shape)
        approx = approx @ metric if metric is not None else approx
        errors.append(float((target - approx).pow(2).sum()) / norm2 if norm2 > 0 else 0.0)
    errors = np.asarray(errors)
    ok = np.isfinite(errors)
    ranks = np.arange(limit + 1)
    if not ok.any():
        return np.full(limit + 1, np.inf)
    curve = np.interp(np.log(np.maximum(ranks, 1)), np.log(probes[ok]), errors[ok])
    curve[0] = 1.0
    return np.minimum.accumulate(curve)   # a higher rank is never worse than a lower one


class _MixedBudgetSite(_BudgetSite):
    """conv="auto": the Tucker-2 and the CP options of one layer on one Pareto front.

    An option's ranks are ``(R_out, R_in)`` for Tucker-2 and ``(R, 0)`` for CP; the front keeps
    whichever method is more exact at each cost, so the allocation picks Tucker-2, CP or keep
    per layer by error per unit of cost.
    """

    def __init__(self, tucker: _BudgetSite, cp: _BudgetSite) -> None:
        self.site, self.costs, self.tails, self.metric = tucker.site, tucker.costs, tucker.tails, tucker.metric
        self.keep = tucker.keep
        ranks = (np.concatenate([tucker.ranks[0], cp.ranks[0]]),
                 np.concatenate([tucker.ranks[1], np.zeros(len(cp.ranks[0]), dtype=int)]))
        self.ranks, self.bound2s, self.values = _pareto_front(ranks, np.concatenate([tucker.bound2s, cp.bound2s]),
                                                              np.concatenate([tucker.values, cp.values]))

    def method_of(self, ranks: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
        return ("cp", (ranks[0],)) if ranks[1] == 0 else ("tucker", ranks)


def _budget_site(site: _Site, cache: dict, metric: str, multiple: int | None = None,
                 table=None) -> _BudgetSite:
    """A movable layer's options under a budget (``table``: the latency table of a latency budget)."""
    def timing(s: _Site, *, cp_measured: bool = False) -> _SiteLatency | None:
        return _site_latency(s, table, cp_measured=cp_measured) if metric == "latency" else None

    if site.method == "auto":
        tucker, cp = (_Site(site.name, site.layer, site.kind, m, site.in_shape, site.macs, site.params)
                      for m in ("tucker", "cp"))
        tucker_site = _budget_site(tucker, cache, metric, multiple, table)
        cp_site = _BudgetSite(cp, _cost_model(cp), tucker_site.tails, metric, cp_errors2=_cp_errors2(cp, cache),
                              multiple=multiple, latency=timing(cp, cp_measured=True))
        return _MixedBudgetSite(tucker_site, cp_site)
    full = [site.layer.weight.shape[0], site.layer.weight.shape[1]] if site.method in ("tucker", "cp") else \
        [min(D.matrix_shape(site.layer))]
    tails = [_tails(r, f) for r, f in zip(_spectra(site, cache), full)]
    return _BudgetSite(site, _cost_model(site), tails, metric, multiple=multiple, latency=timing(site))


def site_cost(site: _Site, metric: str) -> float:
    return float(site.macs if metric == "macs" else site.params)


def _budget_plan(model: nn.Module, sites: list[_Site], policy: Policy, input_size: Sequence[int],
                 cache: dict, plan: dict, *, table=None, target: float | None = None,
                 total: float | None = None, reference: float | None = None) -> None:
    """Fill ``plan`` for a budget: ranks for every movable layer, the total within the budget.

    The error of a rank choice is bounded from the singular values that VBMF already
    computes: exactly ``sqrt(tail(r) / ||W||^2)`` for an SVD (Eckart-Young), and for
    Tucker-2 the truncated-HOSVD bound ``sqrt(tail_out(R_out) + tail_in(R_in))`` over
    both unfoldings (De Lathauwer et al. 2000 [5]_; HOOI only improves on it).  So a
    rule needs no decomposition and no data.  Two rules:

    * ``sum`` (default): the smallest sum of squared error bounds, by its Lagrangian:
      every layer minimises ``bound^2 + lambda * cost`` (the classic rate-distortion
      allocation), with a bisection on ``lambda``.  It cuts where a rank saves the most
      cost per unit of error.
    * ``minimax`` (ALDS, Liebenwein et al. 2021 [4]_, which minimises the largest
      per-layer relative error under a global budget): for an error level ``e``, every
      layer takes its cheapest ranks whose error bound is at most ``e``; the total cost
      only falls as ``e`` grows, so a bisection on ``e`` finds the smallest ``e``.

    The default is the one measured better at moderate budgets (benchmarks/RESULTS.md,
    "Budgets": on the trained VGG16 ``sum`` kept more accuracy straight after
    decomposition than ``minimax`` and than uniform ranks at 3x and 5x fewer MACs, the
    rules being level after fine-tuning); at 8x ``minimax`` was better: pass
    ``budget_rule="minimax"`` for aggressive budgets.
    """
    metric, asked = policy.budget
    target = asked if target is None else target  # a latency budget's corrected request (_latency_plan)
    if metric == "latency":
        # total: the original model's measured time as the table times layers (int8 when it
        # quantizes); reference: the time the request is relative to (the float32 original).
        total = float(total)
        reference = total if reference is None else float(reference)
    else:
        total = reference = float(report.count_macs(model, input_size) if metric == "macs"
                                  else report.count_params(model))
    movable: list[_BudgetSite] = []
    fixed = total
    entries_ms, entries_keep_ms = 0.0, 0.0  # latency: the fixed entries' replacements, and their originals
    for site in sites:
        if site.name in plan:
            # Layers with a fixed entry (diagonal, a fixed FC rank) count at their planned cost.
            entry = plan[site.name]
            if entry["method"] == "none":
                continue
            if metric == "latency":
                if site.in_shape is not None:
                    entries_ms += _entry_latency(site, entry, table)
                    entries_keep_ms += table.ms(site.layer, tuple(site.in_shape[1:]))
                continue
            if entry["method"] == "diagonal":
                params, macs = _diagonal_cost(site, entry["bandwidth"])
            else:
                costs = _cost_model(site)
                ranks = entry["ranks"] if entry["method"] == "tucker" else [entry["rank"]]
                params, macs = costs.params(ranks), costs.macs(ranks)
            fixed += (macs if metric == "macs" else params) - site_cost(site, metric)
            continue
        option = _budget_site(site, cache, metric, policy.rank_multiple, table)
        movable.append(option)
        fixed -= option.keep
    if metric == "latency":
        fixed += entries_ms - entries_keep_ms
        if fixed < 0:
            # Layers timed alone add up to more than the whole model (each pays its own call and
            # layout reorders): the time model is then the sum of every conv and Linear layer timed
            # alone (kept ones too), and the measured check of _latency_plan corrects the rest.
            fixed = entries_ms + _other_layers_ms(model, input_size, table, {m.site.name for m in movable} | {
                s.name for s in sites if s.name in plan and plan[s.name]["method"] != "none"})
            modelled = fixed - entries_ms + entries_keep_ms + sum(m.keep for m in movable)
            reference, total = reference * modelled / total, modelled
    allowed = reference / target
    rule = policy.budget_rule
    # One parameter x in [0, 1] for both rules; the total cost only falls as x grows.
    # minimax: the squared error level; sum: the Lagrange multiplier, on a log scale, of
    # costs measured as shares of the whole model.
    levels = {"minimax": lambda x: x * MAX_ERROR2,
              "sum": lambda x: 10.0 ** (LAGRANGE_LOG10[0] + x * (LAGRANGE_LOG10[1] - LAGRANGE_LOG10[0])) / total}
    level_of = levels[rule]

    def spend(x: float) -> float:
        return fixed + sum(m.choose(rule, level_of(x))[1] for m in movable)

    # The most the layers can give, whatever the rule: each at its cheapest option.
    least = fixed + sum(min(m.keep, float(m.values.min()) if len(m.values) else m.keep) for m in movable)
    if least > allowed * (1 + COST_RTOL):
        best = math.floor(reference / least * 1000) / 1000  # rounded down: asking for it succeeds
        most = (f"the most these layers can give is {best:g}x" if best > 1 else
                "these layers cannot reduce it at all")  # a ratio of 1 cannot be asked for
        error = BudgetError(f"a {target:g}x reduction in {_metric_name(metric)} is out of reach: {most} (each "
                            f"decomposed layer at its cheapest rank; the first conv, the classifier and other kept "
                            f"or fixed layers count as they are)")
        error.reachable = best
        raise error
    untouched = fixed + sum(m.keep for m in movable)
    if untouched < allowed / (1 + BUDGET_TOLERANCE):
        fixed_names = [s.name for s in sites if s.name in plan and plan[s.name]["method"] != "none"]
        gain = "faster" if metric == "latency" else f"smaller in {_metric_name(metric)}"
        error = BudgetError(f"the layers with fixed ranks ({short_list(fixed_names)}) already make the model "
                            f"{reference / untouched:.3g}x {gain}, more than the {target:g}x "
                            f"asked for: ask for more, or let the budget choose their ranks")
        error.floor = reference / untouched
        raise error
    low, high = 0.0, 1.0
    if spend(low) <= allowed:
        high = low
    elif spend(high) > allowed * (1 + COST_RTOL):
        raise BudgetError(f"could not plan {_reduction(target, metric)} with the {rule} rule; "
                          f"try --budget_rule {'minimax' if rule == 'sum' else 'sum'}")
    for _ in range(BUDGET_BISECTION_STEPS):
        if high - low <= BISECTION_XTOL:
            break
        mid = 0.5 * (low + high)
        if spend(mid) <= allowed:
            high = mid
        else:
            low = mid
    choice = {m.site.name: m.choose(rule, level_of(high)) for m in movable}
    spent = fixed + sum(c[1] for c in choice.values())
    # The level moves the total in steps: layers whose options tie switch together (layers
    # still at their random start all have flat spectra), and the Lagrangian of "sum" only
    # ever picks options on each layer's convex hull of (cost, error).  One step can leave
    # more than the 3% the budget allows unspent: spend it greedily, each time on the
    # richer option that removes the most squared error per unit of cost and still fits.
    for _ in range(BUDGET_FILL_STEPS):
        best = None
        for m in movable:
            ranks_, value, bound2 = choice[m.site.name]
            if ranks_ is None:
                continue
            room = allowed - spent
            gain = np.append(bound2 - m.bound2s, bound2)            # the last one: keep the layer
            extra = np.append(m.values - value, m.keep - value)
            fits = (extra > 0) & (extra <= room) & (gain > 0)
            if not fits.any():
                continue
            score = np.where(fits, gain / np.where(fits, extra, 1.0), -np.inf)
            top = score.max()
            # Among this layer's options as good per unit of cost (a straight stretch of the
            # front: flat spectra), take the richest, so the fill moves in one step, not one
            # rank at a time.
            i = int(np.argmax(np.where(score >= top * (1 - FILL_SCORE_RTOL), gain, -np.inf)))
            if best is None or top > best[0]:
                best = (top, m, i)
        if best is None:
            break
        _, m, i = best
        new = (None, m.keep, 0.0) if i == len(m.values) else (
            tuple(int(r[i]) for r in m.ranks), float(m.values[i]), float(m.bound2s[i]))
        spent += new[1] - choice[m.site.name][1]
        choice[m.site.name] = new
    worst = 0.0
    for m in movable:
        ranks_, _, bound2 = choice[m.site.name]
        if ranks_ is None:
            plan[m.site.name] = _none("budget: kept, no factorization pays at this budget")
            continue
        worst = max(worst, bound2)
        method, ranks_ = m.method_of(ranks_)
        entry = _rank_entry(method, ranks_)
        entry["why"] = f"budget {asked:g}x {_metric_name(metric)} ({rule}): error bound {math.sqrt(bound2):.3f}"
        plan[m.site.name] = entry
    logger.info("budget %gx %s (%s): largest layer error bound %.3f, planned %.4gx", target, _metric_name(metric),
                rule, math.sqrt(worst), reference / spent)
    # A latency plan is checked by timing it (_latency_plan); its modelled times move in steps
    # of whole channel blocks, so only falling short of the request is an error here.
    upper = math.inf if metric == "latency" else target * (1 + BUDGET_TOLERANCE)
    if not target <= reference / spent * (1 + COST_RTOL) <= upper:
        # Not expected (the fill spends the budget down to one rank of one layer); say so
        # rather than hand back a plan that misses the request.
        raise BudgetError(f"could not plan {_reduction(target, metric)} within "
                          f"{BUDGET_TOLERANCE:.0%}: the nearest plan found gives {reference / spent:.3g}x")


#: A latency budget is met when the planned model measures within this share of the request.
LATENCY_TOLERANCE = 0.10
#: Plans tried for a latency budget: each corrects the request by what the last ones measured.
LATENCY_ROUNDS = 4
#: The smallest corrected request of a latency budget, as a saving above 1 (when layers timed
#: alone overestimate the planned model, a correction can ask for less than the target).
LATENCY_MIN_REQUEST = 0.01
#: Bounds on the secant's slope (measured vs planned speed-up, log-log): timing noise between
#: two close plans must not send the next request far away.
LATENCY_SLOPE_RANGE = (0.25, 4.0)


def _latency_plan(model: nn.Module, sites: list[_Site], policy: Policy, input_size: Sequence[int],
                  cache: dict, plan: dict, table) -> None:
    """Fill ``plan`` for a latency budget and check it by timing the planned model.

    The ranks come from :func:`_budget_plan` with measured layer times as the cost. Layers
    timed alone do not add up exactly to the model's time (onnxruntime fuses the ReLUs,
    reorders layouts once per chain, not once per layer), so the planned structure
    (default weights: time does not depend on their values) is timed whole, and when it
    misses the request by more than :data:`LATENCY_TOLERANCE` the request is corrected by
    the ratio missed and planned again, up to :data:`LATENCY_ROUNDS` plans; the plan that
    measured closest to the request is kept, and ``table.report`` says what it reached.
    A table that times in int8 (``table.quantize``) plans the int8 model: layers and plans
    are timed quantized, the request stays relative to the float32 original.
    """
    # Timing draws random inputs and default-initialised layers only where the cache misses:
    # the caller's random stream must not depend on what the cache held (fine-tuning after).
    # The layers are built where the model is, the inputs where the table times (an int8 table
    # on the CPU for a model on a GPU): both generators are restored.
    where = {table.device, *(p.device for p in model.parameters())}
    devices = sorted({d for d in where if d.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=devices):
        try:
            _latency_rounds(model, sites, policy, input_size, cache, plan, table)
        finally:
            table.save()  # what was timed is kept even when the budget fails or is interrupted
    if not table.report["within_tolerance"]:
        logger.warning("--target_latency %g: the nearest plan found measures %.3gx faster (%s), not within "
                       "%.0f%% of the request", table.report["target"], table.report["reached"], table.describe(),
                       LATENCY_TOLERANCE * 100)


def _latency_rounds(model: nn.Module, sites: list[_Site], policy: Policy, input_size: Sequence[int],
                    cache: dict, plan: dict, table) -> None:
    import copy

    target = policy.budget[1]
    # The request is relative to the float32 original; a table that times int8 also times the
    # int8 original: the total of its own time model, whose layers it measures in int8.
    original_run = table.model_runner(model, input_size, float32=True)
    quantized = table.quantize != "none"
    if quantized:
        original, total = table.compare_ms(original_run, table.model_runner(model, input_size))
    else:
        original, = table.compare_ms(original_run)
        total = original
    if quantized and original / total >= target * (1 - LATENCY_TOLERANCE):
        raise BudgetError(f"{table.quantize} alone makes the original {original / total:.3g}x faster ("
                          f"{table.describe()}), which meets the {target:g}x asked for: nothing to decompose; ask for "
                          f"more")
    asked, tried, history, refused, edges = target, [], [], None, set()
    while len(tried) < LATENCY_ROUNDS:  # plans timed; each edge below adds one untimed request at most
        trial = dict(plan)
        try:
            _budget_plan(model, sites, policy, input_size, cache, trial, table=table, target=asked, total=total,
                         reference=original)
        except BudgetError as exc:
            # A request beyond the time model's reach: once, the most it can give, timed whole
            # before the request is refused (the first one too): layers timed alone can
            # understate what the whole model gains (each pays its own call, in int8 its own
            # quantize and dequantize, which a chain of layers fuses away: on VGG16 the float32
            # layers allowed 9.66x and the plan measured 10.9x; benchmarks/RESULTS.md).  A
            # corrected request below what fixed layers (or int8 alone) already give: once, the
            # plan at that floor.  The user's own request below it is theirs to change.
            edge, side = (exc.reachable, "limit") if exc.reachable is not None else (exc.floor, "floor")
            usable = (edge is not None and side not in edges and edge > 1 + LATENCY_MIN_REQUEST
                      and (edge < asked if side == "limit" else edge > asked and bool(tried)))
            if not usable:
                if not tried:
                    raise refused or exc  # what was asked, not the limit tried after it
                break
            refused = exc if side == "limit" else refused
            edges.add(side)
            asked = edge
            continue
        skeleton = D.apply_plan(copy.deepcopy(model), {n: e for n, e in trial.items() if e["method"] != "none"})
        # The original and the plan in interleaved rounds: a drift of the machine hits both.
        before, after = table.compare_ms(original_run, table.model_runner(skeleton, input_size))
        reached = before / after
        logger.info("latency budget %gx: planned for %.3gx, measured %.3gx", target, asked, reached)
        within = abs(reached / target - 1) <= LATENCY_TOLERANCE
        # Kept: a plan within the tolerance before any outside it, then the closest in log ratio.
        tried.append(((not within, abs(math.log(reached / target))), reached, trial, before, after))
        if within:
            break
        history.append((math.log(asked), math.log(reached)))
        # A request must stay above 1 (a budget saves something); no new request: stop.
        following = max(math.exp(_next_request(history, math.log(target))), 1 + LATENCY_MIN_REQUEST)
        if math.isclose(following, asked):
            break
        asked = following
    _, reached, best, before, after = min(tried, key=lambda t: t[0])
    fastest = max(t[1] for t in tried)
    if refused is not None and fastest < target * (1 - LATENCY_TOLERANCE):
        # At the time model's limit and still short when measured: out of reach, like a MACs
        # budget beyond what the layers can give.
        error = BudgetError(f"a {target:g}x reduction in latency is out of reach: with each decomposed layer at "
                            f"its cheapest rank ({refused.reachable:g}x by the layers' times) the fastest plan "
                            f"measured {fastest:.3g}x ({table.describe()}; the first conv, the classifier and other "
                            f"kept or fixed layers count as they are)")
        error.reachable = refused.reachable
        raise error
    plan.update(best)
    table.report = {"target": target, "reached": reached, "within_tolerance": abs(reached / target - 1)
                    <= LATENCY_TOLERANCE, "original_ms": before, "planned_ms": after,
                    "plans_tried": len(tried), "backend": table.backend, "batch": table.batch,
                    "quantize": table.quantize, "layers_timed": table.measured}


def _reduction(target: float, metric: str) -> str:
    return f"{target:g}x lower latency" if metric == "latency" else f"{target:g}x fewer {_metric_name(metric)}"


def _next_request(history: list[tuple[float, float]], goal: float) -> float:
    """The next log request of a latency budget from ``(log planned, log measured)`` pairs.

    Between the closest plans on either side of the goal when there are both (regula falsi),
    else along the secant of the last two (the first correction assumes the measured
    speed-up proportional to the planned one); the slope is bounded so that timing noise
    between two close plans cannot send the request far away.
    """
    below = [h for h in history if h[1] < goal]
    above = [h for h in history if h[1] >= goal]
    if below and above:
        (x0, y0), (x1, y1) = max(below, key=lambda h: h[1]), min(above, key=lambda h: h[1])
    elif len(history) > 1:
        (x0, y0), (x1, y1) = history[-2], history[-1]
    else:
        return history[-1][0] + goal - history[-1][1]
    slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 1.0
    slope = min(max(slope, LATENCY_SLOPE_RANGE[0]), LATENCY_SLOPE_RANGE[1])
    step = x1 + (goal - y1) / slope
    if below and above:  # the bounded slope must not leave the bracket
        step = min(max(step, min(x0, x1)), max(x0, x1))
    return step


def _metric_name(metric: str) -> str:
    return {"macs": "MACs", "params": "parameters", "latency": "latency"}[metric]


# ---------------------------------------------------------------------------- plan
def _data_matrices(site: _Site, stats, metrics: dict | None = None) -> list[torch.Tensor]:
    """The matrices whose spectra give a site's output error on data (the original's own inputs).

    With ``L L^T`` the (shrunk) moment of the layer's input patches, ``W L`` has the singular
    values of the layer's response ``E[y y^T] = W L L^T W^T``: its tail beyond rank ``r`` is
    exactly the output error of the best rank-``r`` map (the whitened SVD of SVD-LLM / BALF).
    For Tucker-2 the second matrix is the input-channel unfolding in the metric of the input
    channels' moment, ``L_S^T W_(1)``, the choice :func:`decompositions.tucker2_data_aware` makes.
    """
    layer = site.layer
    weight = layer.weight.detach().double()
    cov, _ = D.fit_moments(layer, stats)
    chol = D.cholesky_psd(cov)
    if metrics is not None:
        metrics[(site.name, "metric")] = chol, cov
    matrices = [weight.reshape(weight.shape[0], -1) @ chol]
    if site.method != "svd":
        out_c, in_c, kh, kw = weight.shape
        k = kh * kw
        sigma_s = torch.einsum("akbk->ab", cov.reshape(in_c, k, in_c, k)) / k
        matrices.append(D.cholesky_psd(sigma_s).T @ _unfold(weight, 1))
    return matrices


def _data_spectra(model: nn.Module, sites: list[_Site], policy: Policy, calibration: Any, cache: dict, *,
                  show_progress: bool) -> None:
    """Fill ``cache`` with the data-aware EVBMF results of every site a rank rule will look at."""
    import calibration as calibration_data

    param = next(model.parameters())
    batches = calibration_data.collect(calibration, device=param.device, dtype=param.dtype)
    fixed_fc = policy.fc_rank is not None or policy.fc_rank_ratio is not None

    def uses_spectra(site: _Site) -> bool:
        if site.kind == "linear" and fixed_fc or site.kind == "conv" and policy.rank_ratio is not None:
            return False
        return policy.budget is not None or policy.vbmf_weaken != 0

    images = sum(len(b) for b in batches)
    todo = [s for s in sites if s.name not in cache and _site_reason(s, policy) is None
            and s.method in ("tucker", "cp", "svd", "auto") and uses_spectra(s) and not calibration_data.output_space(s.layer)
            and not calibration_data.data_free_reason(s.layer, s.in_shape, images)]
    if show_progress:
        from tqdm.auto import tqdm
        todo = tqdm(todo, desc="calibrate ranks", unit="layer")
    inputs = calibration_data.LayerInputs(model, batches)  # kept between sites (in forward order)
    for site in todo:
        stats = calibration_data.layer_stats(model, model, site.name, batches, inputs=(inputs, inputs))
        with lapack_threads():
            # conv="auto" measures CP's error in the same metric (_cp_errors2)
            metrics = cache if site.method == "auto" else None
            cache[site.name] = [vbmf.evbmf(m) for m in _data_matrices(site, stats, metrics)]


def plan_decomposition(model: nn.Module, policy: Policy, input_size: Sequence[int], *,
                       spectra: dict | None = None, calibration: Any = None,
                       show_progress: bool = False, latency_table: Any = None) -> dict[str, dict]:
    """Choose the ranks of every layer the policy decomposes; the model is not changed.

    Parameters
    ----------
    model : nn.Module
        Any model; layers are found at any nesting depth.  Layers already decomposed
        are left out.
    policy : Policy
        The rank rule (see the module docstring).
    input_size : (C, H, W)
        The image size at which MACs are counted (budgets) and used layers found.
    spectra : dict, optional
        A cache of the singular values (and EVBMF results) per layer, filled by this call:
        pass the same dict to later calls on the same, unchanged model to skip the SVDs
        (a search over policies does).  Data-free and data-aware spectra are different:
        do not share one cache between calls with and without ``calibration``.
    calibration : iterable of batches, optional
        Input batches (tensors or ``(inputs, labels)`` pairs), as
        :func:`decompositions.decompose_model` takes them.  The spectra (VBMF ranks and the
        budget's error bounds) are then those of each layer's *response* on these images
        (:func:`_data_matrices`): a budget spends its ranks where the data says the output
        changes, not where the weights are large.  Linear layers wider than
        ``calibration.MAX_STAT_DIM``, and layers with too few calibration samples
        (``calibration.data_free_reason``), keep their weight spectra.
    show_progress : bool
        A tqdm bar over the calibration passes.
    latency_table : latency.LatencyTable, optional
        Required by ``policy.target_latency``: where and how layers and models are timed
        (its ``report`` then holds the measured result).

    Returns
    -------
    dict
        ``name -> entry`` in model order, one entry per layer the policy looked at
        (``{"method": "none", "reason": ...}`` for the ones it keeps).

    Raises
    ------
    BudgetError
        A budget that cannot be met within :data:`BUDGET_TOLERANCE`; the message names
        the best reachable ratio (or says that layers with fixed ranks already exceed it).
    """
    if policy.budget is not None and policy.budget[0] == "latency" and latency_table is None:
        raise ValueError("target_latency needs latency_table=latency.LatencyTable(...): where to time the layers")
    sites = _sites(model, policy, input_size)
    plan: dict[str, dict] = {}
    cache = spectra if spectra is not None else {}
    fixed_fc = policy.fc_rank is not None or policy.fc_rank_ratio is not None
    if calibration is not None:
        _data_spectra(model, sites, policy, calibration, cache, show_progress=show_progress)
    for site in sites:
        reason = _site_reason(site, policy)
        if reason is not None:
            plan[site.name] = _none(reason)
        elif policy.budget is None or site.method == "diagonal" or (site.kind == "linear" and fixed_fc):
            plan[site.name] = _aligned(site, _rule_entry(site, policy, cache), policy.rank_multiple)
    if policy.budget is not None and policy.budget[0] == "latency":
        _latency_plan(model, sites, policy, input_size, cache, plan, latency_table)
    elif policy.budget is not None:
        _budget_plan(model, sites, policy, input_size, cache, plan)
    return {site.name: plan[site.name] for site in sites}


def plan_cost(model: nn.Module, plan: Mapping[str, dict], input_size: Sequence[int]) -> dict[str, float]:
    """Params and MACs the model will have once ``plan`` is applied (nothing is decomposed).

    Returns ``params_before``, ``params_after``, ``macs_before``, ``macs_after`` and the
    two ratios, counted exactly as :mod:`report` counts them.
    """
    check_plan(model, plan)
    shapes = report.record_input_shapes(model, input_size)
    params0, macs0 = report.count_params(model), report.count_macs(model, input_size)
    params1, macs1 = params0, macs0
    for name, entry in plan.items():
        method = entry["method"]
        if method == "none":
            continue
        layer = model.get_submodule(name)
        in_shape, macs = shapes.get(name, (None, 0))
        site = _Site(name, layer, "conv" if isinstance(layer, nn.Conv2d) else "linear", method, in_shape, macs,
                     D.count_params(layer))
        if method == "diagonal":
            p, m = _diagonal_cost(site, entry["bandwidth"]) if in_shape is not None else (site.params, macs)
        else:
            ranks = entry["ranks"] if method == "tucker" else [entry["rank"]]
            costs = _cost_model(site)
            p, m = costs.params(ranks), costs.macs(ranks)
        params1 += p - site.params
        macs1 += m - macs
    return {"params_before": params0, "params_after": params1, "params_ratio": params0 / params1,
            "macs_before": macs0, "macs_after": macs1, "macs_ratio": macs0 / macs1 if macs1 else float("inf")}


def structural(plan: Mapping[str, dict]) -> dict[str, dict]:
    """The part of a plan that a model file stores: the decomposed layers, method and ranks only."""
    return {name: {k: v for k, v in entry.items() if k not in D.PLAN_TEXT_KEYS}
            for name, entry in plan.items() if entry.get("method") != "none"}


# ------------------------------------------------------------------------ checking
check_plan = D.check_plan
PLAN_METHODS = D.PLAN_METHODS
_entry_problem = D.plan_entry_problem
_is_int = D._is_int


# --------------------------------------------------------------------------- files
def write_plan(path: str, plan: Mapping[str, dict], *, arch: str | None = None,
               input_size: Sequence[int] | None = None, extra: Mapping[str, Any] | None = None) -> None:
    """Write a plan as JSON (atomically) for people to read and edit, and :func:`read_plan` to replay."""
    payload = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "arch": arch,
               "input_size": list(input_size) if input_size is not None else None, **(extra or {}),
               "layers": dict(plan)}
    report.write_json(path, payload)


#: The most digits an integer in a plan file may have (ranks are below a million; Python
#: refuses to parse integers beyond 4300 digits with a traceback).
MAX_PLAN_DIGITS = 9


class _PlanValueError(ValueError):
    """A value in a plan file that no plan holds (raised while parsing, turned into one line)."""


def _plan_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_PLAN_DIGITS:
        raise _PlanValueError(f"an integer of {len(text.lstrip('-'))} digits ({text[:12]}...); ranks have at most "
                              f"{MAX_PLAN_DIGITS}")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key given twice (json keeps the last one silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _PlanValueError(f"the key {key[:60]!r} appears twice in one object")
        out[key] = value
    return out


def read_plan(path: str) -> dict[str, dict]:
    """Read a plan file written by :func:`write_plan` (or a bare ``{name: entry}`` JSON object).

    Raises :class:`errors.UserError` (one line) for a missing, oversized, non-JSON or
    malformed file; whether the plan fits a model is :func:`check_plan`'s job.
    """
    from models import check_input_file  # the one check that a path names a file to read

    check_input_file(path, what="plan file")
    size = os.path.getsize(path)
    if size > MAX_PLAN_BYTES:
        raise UserError(f"plan file {path} is {size} bytes; a plan is far smaller (limit {MAX_PLAN_BYTES})")
    try:
        with open(path, encoding="utf-8") as fh:
            payload = json.load(fh, parse_int=_plan_int, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise UserError(f"plan file {path} is not text (UTF-8 JSON)") from None
    except _PlanValueError as exc:
        raise UserError(f"plan file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"plan file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                        f"{exc.msg})") from None
    except RecursionError:
        raise UserError(f"plan file {path} nests too deeply to be a plan") from None
    except OSError as exc:
        raise UserError(f"plan file {path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if isinstance(payload, dict) and "format" in payload:
        if payload.get("format") != PLAN_FORMAT:
            raise UserError(f"plan file {path} has format {str(payload.get('format'))[:40]!r}, not {PLAN_FORMAT!r}")
        version = payload.get("version")
        if not _is_int(version) or not 1 <= version <= PLAN_VERSION:
            raise UserError(f"plan file {path} has version {str(version)[:20]}; this tool reads up to "
                            f"{PLAN_VERSION}")
        payload = payload.get("layers")
    if not isinstance(payload, dict) or not payload:
        raise UserError(f"plan file {path} holds no layers: expected an object mapping layer names to entries")
    for name, entry in payload.items():
        problem = _entry_problem(name, entry)
        if problem:
            raise UserError(f"plan file {path}: {problem}")
    return payload


# -------------------------------------------------------------------- other rank rules
def svd_rank_for_params(layer: nn.Linear, params: int) -> int:
    """The SVD rank whose ``r (M + N)`` weights are closest to ``params`` (at least 1)."""
    return max(1, round(params / (layer.in_features + layer.out_features)))

