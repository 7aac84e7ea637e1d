"""The diagonal FC structure: the layer, the projection onto it, and mask annealing.

* :class:`DiagonalLinear` -- a Linear layer restricted to a wrapped banded diagonal
  (``O(max(in, out))`` parameters), and :func:`diagonal_decompose_linear`, the
  conversion of a dense ``nn.Linear`` whose weight already lives on that structure.
* :func:`anneal_to_masks` -- :func:`finetune.fit` with a per-step hook that fades the
  off-structure weights of trained dense layers to 0 while the whole model trains, so
  that the conversion afterwards is exact; :func:`project_to_masks` does the same at
  once, without training.
* :func:`plan_layers` -- which layers a plan puts on the structure, and their bandwidth.

``decompositions.decompose_model`` applies "diagonal" plan entries with
:func:`diagonal_decompose_linear`; nothing here imports it (it imports this module).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

import finetune
import runtime
from errors import UserError

logger = logging.getLogger(__name__)

#: Default bandwidth of :class:`DiagonalLinear` (entries per diagonal position).
DIAGONAL_BANDWIDTH = 1


# ---------------------------------------------------------------------------- the layer
class DiagonalLinear(nn.Module):
    r"""A Linear layer restricted to a wrapped banded diagonal.

    For an ``M -> N`` layer let ``L = max(M, N)``.  The stored weight has shape
    ``(L, b)`` for a bandwidth ``b``; diagonal position ``p`` in ``[0, L)`` and band
    offset ``k`` in ``[0, b)`` hold the dense entry

    .. math:: W_{\text{dense}}[p \bmod N,\ (p + k) \bmod M] \mathrel{+}= w[p, k].

    With ``b = 1`` this is the diagonal wrapped around the longer side, so every
    input and every output is touched at least once: ``L`` parameters, i.e.
    ``O(max(M, N))`` (the shortest structure that still reads every input), plus the
    bias.  The forward pass costs ``L * b`` multiply-adds per sample: a gather of
    the inputs, a multiply, and a scatter-add into the outputs, never a dense matrix.

    :meth:`dense_mask` gives the dense ``(N, M)`` 0/1 pattern of the structure, used
    by the mask schedule that moves a trained dense layer onto it (see
    :func:`diagonal_decompose_linear` and :func:`anneal_to_masks`).
    """

    method = "diagonal"

    def __init__(self, in_features: int, out_features: int, *, bandwidth: int = DIAGONAL_BANDWIDTH,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if bandwidth < 1 or bandwidth > in_features:
            raise ValueError(f"bandwidth must be in [1, in_features={in_features}], got {bandwidth}")
        self.in_features, self.out_features, self.bandwidth = in_features, out_features, int(bandwidth)
        length = max(in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(length, self.bandwidth, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.reset_index_buffers()
        bound = 1.0 / math.sqrt(self.bandwidth * max(1, length // out_features))
        nn.init.uniform_(self.weight, -bound, bound)

    def reset_index_buffers(self) -> None:
        """(Re)compute the index buffers, on the weight's device.

        They follow from the shape alone, so they are not saved in state_dicts
        (``persistent=False``); a model loaded onto the meta device calls this.
        """
        device = None if self.weight.is_meta else self.weight.device
        positions = torch.arange(self.weight.shape[0], device=device)
        # rows[p] is the output of diagonal position p; cols[p, k] the input it reads.
        self.register_buffer("rows", positions % self.out_features, persistent=False)
        self.register_buffer(
            "cols", (positions[:, None] + torch.arange(self.bandwidth, device=device)) % self.in_features,
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        # (B, L, b) gathered inputs times (L, b) weights, summed over the band.
        products = (x[:, self.cols] * self.weight).sum(-1)
        # In the products' dtype: under autocast x may be bfloat16/float16 while the weight
        # stays float32, and index_add_ needs one dtype.
        out = products.new_zeros(x.shape[0], self.out_features)
        out.index_add_(1, self.rows, products)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def dense_mask(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` 0/1 pattern of the structure."""
        mask = torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        mask[self.rows[:, None].expand_as(self.cols), self.cols] = 1.0
        return mask

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense ``(out_features, in_features)`` weight."""
        dense = torch.zeros(self.out_features, self.in_features, device=self.weight.device,
                            dtype=self.weight.dtype)
        dense.index_put_((self.rows[:, None].expand_as(self.cols), self.cols), self.weight.detach(),
                         accumulate=True)
        return dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bandwidth={self.bandwidth}, bias={self.bias is not None}")

    def plan_entry(self) -> dict:
        return {"method": self.method, "bandwidth": self.bandwidth}



def diagonal_decompose_linear(linear: nn.Linear, *, bandwidth: int = DIAGONAL_BANDWIDTH) -> DiagonalLinear:
    """Project a Linear layer onto the wrapped banded diagonal of :class:`DiagonalLinear`.

    The structured layer keeps the dense weight's entries on the structure (where
    several diagonal positions hit the same dense entry, the first keeps it and
    the others start at zero, so the dense equivalents agree) and drops the rest.
    This is exact for a layer whose weight already lives on the structure, which
    is what the mask schedule :func:`anneal_to_masks` produces from a trained
    dense layer; used directly on a dense layer it loses most of the weight's mass
    and needs fine-tuning.
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
    w = linear.weight
    module = DiagonalLinear(linear.in_features, linear.out_features, bandwidth=bandwidth,
                            bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        flat = module.rows[:, None] * linear.in_features + module.cols  # (L, b) dense indices
        values = w.detach().reshape(-1)[flat.reshape(-1)].reshape(flat.shape)
        # Zero all but the first occurrence of a dense entry hit twice.
        order = torch.argsort(flat.reshape(-1), stable=True)
        sorted_idx = flat.reshape(-1)[order]
        repeat = torch.zeros_like(sorted_idx, dtype=torch.bool)
        repeat[1:] = sorted_idx[1:] == sorted_idx[:-1]
        keep = torch.ones_like(repeat)
        keep[order] = ~repeat
        module.weight.copy_(values * keep.reshape(flat.shape))
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
    return module


# ------------------------------------------------------------------------ mask annealing

#: Mask schedules of :func:`anneal_to_masks`: how the off-structure factor falls from 1 to 0.
ANNEAL_SCHEDULES = ("cosine", "linear")
#: Fraction of the annealing steps trained with the factor already at 0, so that the
#: network adapts to the last removals before it is handed back.
ANNEAL_HOLD_FRACTION = 0.25


def mask_factor(step: int, *, decay_steps: int, schedule: str = "cosine") -> float:
    """Off-structure weight multiplier of :func:`anneal_to_masks` after ``step`` steps.

    Falls from 1 at step 0 to 0 at ``decay_steps`` and stays 0 afterwards::

        cosine: f(t) = (1 + cos(pi * t / D)) / 2        linear: f(t) = 1 - t / D

    The cosine removes weight slowly at both ends: at first, while the dense network
    is still where training left it, and at the end, where the last removals are the
    ones nothing else can compensate for any more (the same shape as the cosine
    learning-rate decay of [1]_).

    Parameters
    ----------
    step : int
        Optimiser steps already taken, >= 0.
    decay_steps : int
        ``D``, >= 1.
    schedule : {"cosine", "linear"}

    Returns
    -------
    float in [0, 1]

    References
    ----------
    .. [1] Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm
           Restarts", ICLR 2017.
    """
    if schedule not in ANNEAL_SCHEDULES:
        raise ValueError(f"schedule must be one of {ANNEAL_SCHEDULES}, got {schedule!r}")
    progress = min(1.0, step / decay_steps)
    if schedule == "cosine":
        # cos(pi) is -1 up to rounding: pin the end so that the factor really is 0.
        return 0.0 if progress >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def anneal_lr_factor(step: int, *, warmup_steps: int, decay_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier of :func:`anneal_to_masks` at optimiser step ``step``.

    A linear warm-up over ``warmup_steps``, then 1 while the mask factor falls
    (up to ``decay_steps``), then a cosine decay to :data:`finetune.FINAL_LR_FACTOR` over the
    remaining steps, in which the structure is already fixed: the network must
    still be able to learn when the last off-structure weights go, which a cosine
    decay over the whole run (as in :func:`fit`) would prevent.
    """
    if step < warmup_steps:
        return finetune.warmup_cosine_factor(step, warmup_steps=warmup_steps, total_steps=total_steps)
    if step < decay_steps:
        return 1.0
    return finetune.warmup_cosine_factor(step - decay_steps, warmup_steps=0,
                                total_steps=total_steps - decay_steps)


class _MaskedLinearForward:
    """Replaces one ``nn.Linear``'s ``forward`` while it is annealed.

    Computes ``F.linear(x, W * S, b)`` with the layer's own Parameters, where the
    ``(out_features, in_features)`` scale ``S`` is 1 on the structure and ``factor``
    off it, so the gradient reaching an off-structure entry is scaled by ``factor``
    too. ``S`` is refreshed in place once per step: one multiply per forward, instead
    of the several weight-sized temporaries of a ``torch.where``.

    It is installed as an instance attribute (``layer.forward = self``) and removed
    with ``del layer.forward``: the module tree, the state_dict keys and the Parameter
    objects never change, which keeps an optimizer, or a ``DistributedDataParallel``
    wrapper built beforehand, valid. (A ``torch.nn.utils.parametrize``
    parametrization would do the same maths, but registering it re-``set_``s the
    Parameter, which gives it a new gradient accumulator and leaves DDP's gradient
    hooks on the old one.)

    With ``rescale``, :meth:`set_factor` also multiplies the on-structure entries of
    each output row ``i`` (in place) so that they carry the row's faded mass::

        gain_i(f) = sqrt(1 + (1 - f^2) * off_i / on_i)

    where ``on_i``, ``off_i`` are the row's squared norms on and off the structure
    when annealing starts: the row's norm, hence the unit's activation scale, is kept
    while its support shrinks. Without it a layer keeping 1% of its entries ends with
    outputs about 10x smaller, which a network without normalization layers passes
    on, multiplied, to the logits.

    ``on_index`` holds the flat indices (into ``weight.view(-1)``) of the structure's
    distinct entries, from :meth:`DiagonalLinear.dense_mask`.
    """

    def __init__(self, layer: nn.Linear, on_index: torch.Tensor, *, rescale: bool) -> None:
        weight = layer.weight
        self.layer, self.on_index, self.rescale = layer, on_index, rescale
        self.on_rows = on_index // layer.in_features  # output row of each structured entry
        self.factor = 1.0
        self.scale = torch.ones_like(weight, memory_format=torch.contiguous_format)  # (N, M)
        with torch.no_grad():
            row_total = weight.detach().float().square().sum(1)                      # (N,)
            on_values = weight.detach().reshape(-1)[on_index].float()
            self.row_on = torch.zeros_like(row_total).index_add_(0, self.on_rows, on_values.square())
            self.row_off = (row_total - self.row_on).clamp_min(0.0)
        self.gain = torch.ones_like(self.row_on)  # current on-structure gain per row, (N,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.layer.weight
        if self.factor != 1.0:
            weight = weight * self.scale
        return nn.functional.linear(x, weight, self.layer.bias)

    @torch.no_grad()
    def set_factor(self, factor: float) -> None:
        if factor != self.factor:
            self.factor = factor
            self.scale.fill_(factor)
            self.scale.view(-1)[self.on_index] = 1.0
        if not self.rescale:
            return
        # Rows with nothing on the structure keep gain 1 (nothing there to scale up).
        tiny = torch.finfo(self.row_on.dtype).tiny
        ratio = torch.where(self.row_on > 0, self.row_off / self.row_on.clamp_min(tiny), 0.0)
        gain = torch.sqrt(1.0 + (1.0 - factor * factor) * ratio)
        flat = self.layer.weight.view(-1)
        flat[self.on_index] *= (gain / self.gain)[self.on_rows].to(flat.dtype)
        self.gain = gain

    @torch.no_grad()
    def off_mass(self, factor: float) -> float:
        """Share of ``||W_eff||_F^2`` off the structure when the factor is ``factor``."""
        squares = self.layer.weight.detach().float().square().reshape(-1)  # a copy
        on = squares[self.on_index].sum().item()
        squares[self.on_index] = 0.0
        off = factor * factor * squares.sum().item()
        return off / (on + off) if on + off > 0 else 0.0

    @torch.no_grad()
    def bake(self, *, finished: bool) -> None:
        """Write the effective weight into the Parameter, in place (same object and storage).

        ``finished``: exactly 0 off the structure. Otherwise (training failed) the
        weight the model was computing with at that moment.
        """
        weight = self.layer.weight
        if finished:
            kept = weight.reshape(-1)[self.on_index].clone()
            weight.zero_()
            weight.view(-1)[self.on_index] = kept
        elif self.factor != 1.0:
            weight.mul_(self.scale)


class _MaskStepper:
    """The per-step hook of :func:`finetune.fit` that moves the mask factor.

    ``fit`` calls it once after every optimiser step, so the mask schedule moves in
    lockstep with the learning-rate schedule without a second training loop.
    """

    def __init__(self, scales: list[_MaskedLinearForward], *, decay_steps: int, schedule: str) -> None:
        self.scales, self.decay_steps, self.schedule = scales, decay_steps, schedule
        self.steps = 0
        self.factor = 1.0

    def __call__(self) -> None:
        self.steps += 1
        self.factor = mask_factor(self.steps, decay_steps=self.decay_steps, schedule=self.schedule)
        for scale in self.scales:
            scale.set_factor(self.factor)


def _check_anneal_layers(net: nn.Module, layers: Sequence[str]) -> list[str]:
    """The names in ``layers``, each checked to be a distinct, plain ``nn.Linear`` of ``net``."""
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise UserError(f"layers must be a sequence of layer names, got {layers!r}")
    names = list(layers)
    if not names:
        raise UserError("layers is empty: name at least one nn.Linear layer to anneal")
    linear_names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    allowed = f"Linear layers of this model: {', '.join(map(repr, linear_names)) or 'none'}"
    seen = set()
    for name in names:
        if not isinstance(name, str):
            raise UserError(f"layer names must be strings, got {name!r}")
        if name in seen:
            raise UserError(f"layer {name!r} is named twice in layers")
        seen.add(name)
        try:
            layer = net.get_submodule(name)
        except AttributeError:
            raise UserError(f"layer {name!r} not found in the model; {allowed}") from None
        if not isinstance(layer, nn.Linear):
            raise UserError(f"layer {name!r} is a {type(layer).__name__}, not an nn.Linear; {allowed}")
        # The mask works by replacing the layer's forward with nn.Linear's maths, so a
        # subclass with its own forward, or an already replaced one, cannot be annealed.
        if type(layer).forward is not nn.Linear.forward:
            raise UserError(f"layer {name!r} ({type(layer).__name__}) has its own forward; "
                            "only layers computing nn.Linear's forward can be annealed")
        if "forward" in vars(layer) or parametrize.is_parametrized(layer):
            raise UserError(f"layer {name!r} already has a replaced forward or a parametrization; "
                            "anneal plain nn.Linear layers")
    return names


def _structure_masks(linears: dict[str, nn.Linear], bandwidth: int, *, rescale: bool
                     ) -> tuple[dict[str, int], dict[str, _MaskedLinearForward]]:
    """Per layer: the band width used (``min(b, in_features)``, as decompose_model) and the mask."""
    bandwidths = {name: min(bandwidth, layer.in_features) for name, layer in linears.items()}
    scales = {}
    for name, layer in linears.items():
        # The pattern comes from the structured layer itself, so the mask and a later
        # conversion (diagonal_decompose_linear) agree by construction.
        structure = DiagonalLinear(
            layer.in_features, layer.out_features, bandwidth=bandwidths[name], bias=False,
            device=layer.weight.device)
        on_index = structure.dense_mask().reshape(-1).nonzero().squeeze(1)  # distinct entries
        scales[name] = _MaskedLinearForward(layer, on_index, rescale=rescale)
    return bandwidths, scales


def project_to_masks(model: nn.Module, *, layers: Sequence[str], bandwidth: int,
                     rescale: bool = True) -> dict:
    """Move the named Linear layers onto the structure at once: :func:`anneal_to_masks`
    without training.

    The off-structure entries are set to 0 and, with ``rescale``, each output row's
    on-structure entries are multiplied by ``sqrt(||row||^2 / ||on-structure part||^2)``
    so that the row keeps its norm (see :func:`anneal_to_masks`). Without ``rescale``
    the result equals :func:`diagonal_decompose_linear`'s projection,
    kept as a dense layer. A later ``decompose_model`` with "diagonal" plan entries for these
    layers is exact, as after annealing.

    Parameters
    ----------
    model : nn.Module
        Plain or DDP-wrapped; changed in place (the Parameters stay the same objects).
    layers, bandwidth, rescale
        As in :func:`anneal_to_masks`.

    Returns
    -------
    dict
        ``initial_off_mass`` (layer -> off-structure share of the squared Frobenius
        norm before), ``gain`` (layer -> mean per-row gain applied) and ``bandwidth``.

    Raises
    ------
    ValueError
        (as :class:`errors.UserError`) For a layer name that is not an ``nn.Linear``
        of the model or ``bandwidth < 1``.
    """
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, int) or bandwidth < 1:
        raise UserError(f"bandwidth must be an integer >= 1, got {bandwidth!r}")
    net = runtime.unwrap(model)
    names = _check_anneal_layers(net, layers)
    linears = {name: net.get_submodule(name) for name in names}
    bandwidths, scales = _structure_masks(linears, bandwidth, rescale=rescale)
    initial_off = {name: scales[name].off_mass(1.0) for name in names}
    for scale in scales.values():
        scale.set_factor(0.0)
        scale.bake(finished=True)
    return {"initial_off_mass": initial_off, "bandwidth": bandwidths,
            "gain": {name: float(scales[name].gain.mean()) for name in names}}


def anneal_to_masks(
    model: nn.Module,
    train_loader,
    *,
    layers: Sequence[str],
    bandwidth: int,
    epochs: int,
    lr: float,
    device: torch.device,
    test_loader=None,
    schedule: str = "cosine",
    hold_fraction: float = ANNEAL_HOLD_FRACTION,
    rescale: bool = True,
    weight_decay: float = finetune.DEFAULT_WEIGHT_DECAY,
    momentum: float = finetune.DEFAULT_MOMENTUM,
    train_sampler=None,
    label_smoothing: float = 0.0,
    amp: bool = True,
    show_progress: bool = True,
    log: logging.Logger | None = None,
    group=None,
) -> dict:
    """Fine-tune ``model`` while the named Linear layers' weights are moved onto the
    wrapped banded-diagonal structure of :class:`DiagonalLinear`.

    A mask schedule in the spirit of gradual magnitude pruning [1]_, with the mask
    fixed by the structure instead of by magnitudes: every weight entry of the named
    layers that lies off the structure is multiplied by a factor ``f`` that falls
    from 1 to 0 (:func:`mask_factor`, updated after every optimiser step), while the
    whole model trains as in :func:`fit` (SGD with momentum, a per-step learning-rate
    schedule, mixed precision on CUDA, DDP-aware). The rest of the network
    thus learns to do without the off-structure weights while they fade, instead of
    losing them at once as :func:`diagonal_decompose_linear` does on
    a dense layer. The last ``hold_fraction`` of the steps train with ``f = 0``, and
    the learning rate stays at its peak until then (:func:`anneal_lr_factor`).

    With ``rescale`` (the default) the fading mass is moved onto the structure: each
    output row's on-structure entries grow so that the row's norm stays what it was
    (``gain_i = sqrt(1 + (1 - f^2) off_i / on_i)``, ``on_i``/``off_i`` the row's
    squared norms on/off the structure at the start). A structure that keeps 1% of
    a layer's entries otherwise leaves its outputs about 10x smaller, which in a
    network without normalization shrinks the logits multiplicatively and stalls
    the training that should repair it.

    The factor is applied by a replacement of the layers' ``forward`` that uses
    their own Parameters (no module, Parameter or state_dict key changes, so an
    optimizer or a DDP wrapper built beforehand keeps working). When this returns,
    the replacement is gone: the layers are plain ``nn.Linear`` again, with their
    off-structure entries exactly 0, and::

        policy = ranks.Policy(conv="none", fc="diagonal", fc_bandwidth=bandwidth)
        decompositions.decompose_model(model, ranks.plan_decomposition(model, policy, input_size))

    converts them without changing the model's function (up to float rounding of the
    structured forward), provided it compresses the same layers (by default it keeps
    the last Linear, the classifier, dense; ``Policy(skip=..., keep_last_linear=...)``
    matches ``layers``).

    Parameters
    ----------
    model : nn.Module
        Model to train in place (plain or wrapped in ``DistributedDataParallel``);
        moved to ``device``. Only parameters with ``requires_grad=True`` are trained.
    train_loader : DataLoader
        Training batches; must have a length (both schedules are per batch).
    layers : sequence of str
        Qualified names (as in ``model.named_modules()``, without a DDP ``module.``
        prefix) of the ``nn.Linear`` layers to move onto the structure.
    bandwidth : int
        Band width ``b`` >= 1 of the structure. As in
        :func:`decompositions.decompose_model`, a layer with fewer inputs uses
        ``min(b, in_features)``.
    epochs : int
        Epochs of annealing, >= 1.
    lr : float
        Peak learning rate, > 0.
    device : torch.device
        Where to train.
    test_loader : DataLoader, optional
        Evaluated after every epoch when given (with the factor of that moment).
    schedule : {"cosine", "linear"}, default "cosine"
        Shape of the factor's decay, see :func:`mask_factor`.
    hold_fraction : float in [0, 1), default ANNEAL_HOLD_FRACTION
        Share of the steps at the end trained with the factor at 0.
    rescale : bool, default True
        Keep each output row's norm by growing its on-structure entries (above).
    weight_decay, momentum, train_sampler, label_smoothing, amp, show_progress, log, group
        As in :func:`finetune.fit`.

    Returns
    -------
    dict
        ``history``: one dict per epoch with ``epoch``, ``lr`` (at its start),
        ``factor`` (at its end), ``train_loss``, ``train_acc``, ``test_loss``,
        ``test_acc`` (``None`` without a test loader), ``off_mass`` (layer ->
        off-structure share of the squared Frobenius norm of the effective weight at
        the epoch's end) and ``seconds``;
        ``initial_off_mass``: that share before annealing (what a direct projection
        would drop); ``raw_off_mass``: the share in the underlying weights when the
        factor reached 0 (what the schedule finally dropped, already without effect
        on the output); ``off_mass``: the final share, 0.0 for every layer;
        ``bandwidth``: layer -> the band width used; ``gain``: layer -> the mean
        per-row gain of the on-structure entries (1.0 without ``rescale``);
        ``steps``: optimiser steps.

    Raises
    ------
    ValueError
        (as :class:`errors.UserError`) For a layer name that is not an ``nn.Linear``
        of the model, ``bandwidth < 1``, ``epochs < 1``, ``lr <= 0`` or another
        option out of range; a plain ``ValueError`` for an empty training loader or
        a model without trainable parameters.
    NonFiniteLossError
        If training diverges. On any exception the layers' forward is restored too,
        leaving plain ``nn.Linear`` layers holding the effective weights of that
        moment (not yet on the structure).

    References
    ----------
    .. [1] M. Zhu and S. Gupta, "To prune, or not to prune: exploring the efficacy of
           pruning for model compression", arXiv:1710.01878, 2017.
    """
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, int) or bandwidth < 1:
        raise UserError(f"bandwidth must be an integer >= 1, got {bandwidth!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not lr > 0 or not math.isfinite(lr):
        raise UserError(f"learning rate must be a finite number > 0, got {lr!r}")
    if schedule not in ANNEAL_SCHEDULES:
        raise UserError(f"schedule must be one of {ANNEAL_SCHEDULES}, got {schedule!r}")
    if not 0.0 <= hold_fraction < 1.0:
        raise UserError(f"hold_fraction must be in [0, 1), got {hold_fraction!r}")
    net = runtime.unwrap(model)
    names = _check_anneal_layers(net, layers)
    log = logger if log is None else log
    if len(train_loader) == 0:
        raise ValueError("the training loader yielded no batches")
    decay_steps = max(1, round((1.0 - hold_fraction) * epochs * len(train_loader)))

    def lr_schedule(step: int, total_steps: int) -> float:
        return anneal_lr_factor(step, warmup_steps=int(finetune.WARMUP_FRACTION * total_steps),
                                decay_steps=decay_steps, total_steps=total_steps)

    linears = {name: net.get_submodule(name) for name in names}
    bandwidths, scales = _structure_masks(linears, bandwidth, rescale=rescale)
    initial_off = {name: scales[name].off_mass(1.0) for name in names}
    stepper = _MaskStepper(list(scales.values()), decay_steps=decay_steps, schedule=schedule)

    def after_epoch(record: dict) -> None:
        off = {name: scales[name].off_mass(stepper.factor) for name in names}
        record.update(factor=stepper.factor, off_mass=off)
        if runtime.is_main_process():
            log.info("anneal: mask factor %.3f, off-structure mass %s", stepper.factor,
                     ", ".join(f"{n} {v:.2%}" for n, v in off.items()))

    raw_off: dict[str, float] = {}
    finished = False
    try:
        for name, layer in linears.items():
            layer.forward = scales[name]
        # No restarts and no divergence guard: the mask factor cannot be rewound with the weights,
        # and the loss may rise legitimately as the structure is cut.  The last epoch is kept:
        # only it has the factor at 0.
        recipe = finetune.Recipe(epochs=epochs, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                 label_smoothing=label_smoothing, amp=amp, max_restarts=0, schedule=lr_schedule,
                                 divergence=None, keep_best=False)
        history = finetune.fit(model, train_loader, test_loader, recipe=recipe, device=device,
                               train_sampler=train_sampler, show_progress=show_progress, log=log, group=group,
                               step_hook=stepper, epoch_hook=after_epoch)
        raw_off = {name: scales[name].off_mass(1.0) for name in names}
        finished = True
    finally:
        for name, layer in linears.items():
            if vars(layer).get("forward") is not scales[name]:
                continue  # never installed
            del layer.forward  # back to nn.Linear.forward
            # Exactly 0 off the structure on success; the effective weight of the
            # moment on failure.
            scales[name].bake(finished=finished)
    return {
        "history": history,
        "initial_off_mass": initial_off,
        "raw_off_mass": raw_off,
        "off_mass": {name: scales[name].off_mass(1.0) for name in names},
        "bandwidth": bandwidths,
        "gain": {name: float(scales[name].gain.mean()) for name in names},
        "steps": stepper.steps,
    }


# ------------------------------------------------------------------------ which layers
def plan_layers(model: nn.Module, plan: Mapping[str, dict]) -> tuple[list[str], int]:
    """The plan's "diagonal" layers and their one bandwidth (``[], 0`` when there are none).

    The layers come from the plan, never from a walk over the model's ``nn.Linear``s
    (a walk would pick the Linears inside SVD pairs).  A layer with fewer inputs than
    the bandwidth uses them all, as in ``decompose_model``.

    Raises
    ------
    errors.UserError
        If the layers' bandwidths differ: the mask schedule moves them together.
    """
    entries = {name: e["bandwidth"] for name, e in plan.items() if e["method"] == "diagonal"}
    if not entries:
        return [], 0
    bandwidth = max(entries.values())
    odd = [n for n, b in entries.items() if b != min(bandwidth, model.get_submodule(n).in_features)]
    if odd:
        from report import short_list

        raise UserError(f"the plan's diagonal layers must share one bandwidth ({short_list(odd)} differ from "
                        f"{bandwidth}): the mask schedule moves them together")
    return list(entries), bandwidth
