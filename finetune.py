"""Training and evaluation engine: one epoch, evaluation, a full fine-tuning run.

Modelled on torchvision's ``references/classification/train.py`` (``train_one_epoch``,
``evaluate``, the ``utils.init_distributed_mode`` helper) with a few deliberate choices:

* Everything is device-agnostic: callers pass one ``torch.device`` (see
  :func:`runtime.resolve_device`) and nothing here calls ``.cuda()``.
* Mixed precision is used on CUDA only: ``torch.autocast`` with bfloat16 when the GPU
  supports it, otherwise float16 together with a :class:`torch.amp.GradScaler`.
  On CPU and MPS training runs in float32.
* The learning rate follows a short linear warm-up and then a cosine decay, stepped once
  per batch (fine-tuning runs are often only a few epochs long, so a per-epoch schedule
  would be too coarse).
* A non-finite loss stops training with :class:`NonFiniteLossError` instead of silently
  producing a model full of NaNs.
* Distributed data parallel (``torchrun``) is supported: :func:`runtime.init_distributed`
  reads the torchrun environment; metrics are summed over the process group the caller
  passes (``group=None``: this process alone, so a function running on rank 0 alone never
  reduces), and only the main rank shows progress bars and logs. Wrapping the model in
  ``DistributedDataParallel`` is the caller's job; :func:`fit` works with a wrapped or a
  plain model.
* :func:`fit` takes a per-step hook (``diagonal.anneal_to_masks`` moves its mask schedule
  with it) and writes / resumes from per-epoch checkpoints (:func:`training_checkpoint`).

Accuracies are fractions in ``[0, 1]``; losses are sample-weighted means.

References
----------
.. [1] torchvision classification reference scripts,
       https://github.com/pytorch/vision/tree/main/references/classification
.. [2] I. Loshchilov and F. Hutter, "SGDR: Stochastic Gradient Descent with Warm
       Restarts", ICLR 2017 (cosine learning-rate schedule).
.. [3] P. Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
       arXiv:1706.02677, 2017 (linear learning-rate warm-up).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from tqdm import tqdm

import runtime
from errors import UserError

logger = logging.getLogger(__name__)

#: Default L2 penalty for SGD; the value used to train VGG (Simonyan & Zisserman, 2015).
DEFAULT_WEIGHT_DECAY = 5e-4
#: Default SGD momentum.
DEFAULT_MOMENTUM = 0.9
#: Fraction of all optimisation steps spent in the linear warm-up.
WARMUP_FRACTION = 0.05
#: Learning-rate multiplier at the first warm-up step (ramps linearly to 1).
WARMUP_START_FACTOR = 0.1
#: Learning-rate multiplier the cosine decay ends at.
FINAL_LR_FACTOR = 0.0

#: A non-finite loss restarts the epoch from its first batch with every learning rate
#: multiplied by this (once more at each further restart).
NONFINITE_LR_FACTOR = 0.1
#: How many such restarts :func:`fit` makes before it gives up with NonFiniteLossError.
MAX_NONFINITE_RESTARTS = 2
#: :class:`LossGuard`: the loss has diverged once its running mean exceeds this many times
#: where the run started (a run that fails this way still has finite weights to go back to).
#: Healthy runs of the recipe benchmark stayed near their start (running means at most 0.77-1.25x
#: of it, nine runs); a run whose rate was too high rose to 3.2x within 20 batches and ended its
#: epoch at chance (2000-image folder, benchmarks/RESULTS.md), under the 4x this was before.
DIVERGENCE_FACTOR = 2.0
#: The run's start: the mean loss of its first this many batches ...
GUARD_REFERENCE_BATCHES = 5
#: ... and never below this (a model already near zero loss has noisy batch losses far above
#: its mean; with this floor, a diverged run has a loss above 0.8, worse than chance on two classes).
GUARD_MIN_REFERENCE = 0.4
#: Weight of each new batch in the running mean of the loss.
GUARD_SMOOTHING = 0.1
#: The rate probe (``Recipe.rate_probe``): each candidate multiplier of the recipe's rates
#: trains this many batches from the run's start, at the peak rate (no warm-up), and is
#: judged by the model's loss afterwards on the next this many batches, which it did not train
#: on, in eval mode (no dropout: the same weights always give the same figure, so candidates
#: differ by what they learnt).  Judged on its own batches, a high rate that memorised them won
#: (2000-image folder, last conv x5: x0.3 left 0.29 on its batches and 5.3 on the next ones;
#: benchmarks/RESULTS.md, "The --train recipe").  A loader shorter than both wraps around.
PROBE_STEPS = 8
#: The candidates the command line tries, from the recipe's own rates down (a factor of
#: about 3 between neighbours: the rate sweeps of RESULTS.md differ by that much).
DEFAULT_RATE_PROBE = (1.0, 0.3, 0.1, 0.03, 0.01)
#: The probe keeps the highest rate whose loss is within this share of the start's loss of
#: the lowest one.  From torchvision's random init every rate leaves about the same loss after
#: a few steps (ResNet-18, start 0.717: x1 0.706, x0.3 0.692), and the lower rate chosen on
#: such a tie learnt far less over the run (58.7 +- 3.3% against 67.8 +- 3.7% without the
#: probe, three seeds); the wins the probe exists for were 25% of the start or more
#: (benchmarks/RESULTS.md, "The --train recipe").  The probe's figures count only when the
#: start's loss or its best is this share below a uniform guess's (``_probe_rates``).
PROBE_MARGIN = 0.05


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite, or diverged (:class:`LossGuard`; usually a
    learning rate that is too high).

    It is a :class:`errors.UserError`, so the command line reports it as one line.
    """


# ------------------------------------------------------------------ train / evaluate


def _check_amp(amp_dtype: torch.dtype | None) -> None:
    if amp_dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(
            f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype!r}"
        )


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None and device.type not in ("cpu", "cuda"):
        # torch before 2.5 refuses autocast on "mps" even disabled; nothing to disable there.
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def _layout(inputs: torch.Tensor, channels_last: bool) -> torch.memory_format:
    """channels_last for a batch of images when asked; anything else as it is."""
    return torch.channels_last if channels_last and inputs.dim() == 4 else torch.preserve_format


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    epoch: int,
    scaler: torch.amp.GradScaler | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    criterion: nn.Module | None = None,
    amp_dtype: torch.dtype | None = None,
    show_progress: bool = True,
    group=None,
    step_hook: Callable[[], None] | None = None,
    guard: LossGuard | None = None,
    channels_last: bool = False,
) -> dict:
    """Train ``model`` for one pass over ``loader``.

    Parameters
    ----------
    model : nn.Module
        The model (plain or wrapped in ``DistributedDataParallel``), already on ``device``.
        It is put in training mode.
    loader : iterable of (inputs, targets)
        Batches of inputs and integer class targets.
    optimizer : torch.optim.Optimizer
        Stepped once per batch.
    device : torch.device
        Batches are moved here.
    epoch : int
        Only used for the progress bar and error messages.
    scaler : torch.amp.GradScaler, optional
        Loss scaler for float16 autocast; ``None`` for bfloat16 or full precision.
    scheduler : LRScheduler, optional
        Stepped once per batch, after the optimizer.
    criterion : nn.Module, optional
        Loss function of ``(logits, targets)``; default ``nn.CrossEntropyLoss()``.
    amp_dtype : torch.dtype, optional
        Run the forward pass under ``torch.autocast`` with this dtype; ``None`` (default)
        means full precision. :func:`runtime.autocast_dtype_for` gives the usual choice.
    show_progress : bool, default True
        Show a tqdm bar with running loss/accuracy (always hidden on non-main ranks).
    group : process group, optional
        The ranks training together (``runtime.DistInfo.group``): the non-finite check
        and the returned sums are reduced over them. ``None`` (default): this process
        alone, whether or not a process group exists.
    step_hook : callable, optional
        Called with no argument after every optimiser (and scheduler) step, e.g. to move
        a mask schedule in lockstep (``diagonal.anneal_to_masks``).
    guard : LossGuard, optional
        Fed every batch's loss; when it says the run diverged, no update is made from the
        batch and :class:`NonFiniteLossError` is raised (on every rank together).
    channels_last : bool, default False
        Give the model its batches in the channels_last memory format (a model converted
        with ``model.to(memory_format=torch.channels_last)`` then never converts them).

    Returns
    -------
    dict
        ``loss`` (sample-weighted mean of the per-batch training loss), ``acc``
        (fraction of correct top-1 predictions, measured on the training batches while
        the weights change) and ``n`` (samples seen), summed over ``group``.

    Raises
    ------
    NonFiniteLossError
        If a batch's loss is NaN or infinite, or ``guard`` says it diverged (on any rank);
        no update is made from it.  Also when the epoch's last update left a weight NaN or
        infinite (no later loss would show it before the next epoch).
    ValueError
        If the loader yields no batches, or ``amp_dtype`` is not a supported dtype.
    """
    _check_amp(amp_dtype)
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=f"train {epoch}", leave=False, dynamic_ncols=True,
               disable=not show_progress or not runtime.is_main_process())
    for step, (inputs, targets) in enumerate(bar):
        inputs = inputs.to(device, non_blocking=True, memory_format=_layout(inputs, channels_last))
        targets = targets.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(inputs)  # (B, num_classes)
            loss = criterion(logits, targets)

        # One host sync per step: the loss and the batch's correct count together.
        batch_loss, batch_correct = torch.stack(
            [loss.detach().float(), (logits.argmax(dim=1) == targets).sum().float()]
        ).tolist()
        diverged = guard.update(batch_loss) if guard is not None else None
        # Every rank must agree before any of them raises: a rank that stopped alone would
        # leave the others blocked in DDP's gradient all-reduce.
        if not runtime.all_true(math.isfinite(batch_loss) and diverged is None, device, group):
            what = (f"training loss became non-finite ({batch_loss} on this rank)" if not math.isfinite(batch_loss)
                    else diverged or "training loss diverged on another rank")
            raise NonFiniteLossError(f"{what} at epoch {epoch}, batch {step}; try a lower learning rate")

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if step_hook is not None:
            step_hook()

        batch_size = targets.shape[0]
        loss_sum += batch_loss * batch_size
        correct += int(batch_correct)
        seen += batch_size
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}",
                        refresh=False)
    bar.close()
    # Each batch's loss is checked before its update, so the epoch's last update is checked
    # here, on the weights: a blow-up there must restart this epoch, not become the start (and
    # the checkpoint) of the next one, where every restart would meet it again.
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)
    if not runtime.all_true(finite, device, group):
        raise NonFiniteLossError(f"the weights became non-finite in the last update of epoch {epoch}; "
                                 f"try a lower learning rate")

    loss_sum, correct, seen = runtime.all_reduce_sum([loss_sum, correct, seen], device, group)
    if seen == 0:
        raise ValueError("the training loader yielded no batches")
    return {"loss": loss_sum / seen, "acc": correct / seen, "n": int(seen)}


def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    criterion: nn.Module | None = None,
    amp_dtype: torch.dtype | None = None,
    show_progress: bool = True,
    group=None,
    channels_last: bool = False,
) -> dict:
    """Loss and top-1 accuracy of ``model`` over ``loader``.

    Runs under ``torch.inference_mode()`` with the model in eval mode; the model's
    previous train/eval mode is restored afterwards. A ``DistributedDataParallel``
    wrapper is looked through, so evaluation makes no collective calls per batch.

    With a ``group``, the sums of loss, correct predictions and samples are all-reduced
    over it, so every rank gets the global figures; each rank must then evaluate its
    own share of the test set (``dataset.build_loaders(distributed=True)`` shards it
    without padding, so the figures equal a single process's).

    Parameters
    ----------
    model : nn.Module
        The model, already on ``device``.
    loader : iterable of (inputs, targets)
        Batches of inputs and integer class targets.
    device : torch.device
        Batches are moved here.
    criterion : nn.Module, optional
        Loss function of ``(logits, targets)`` returning the batch mean; default
        ``nn.CrossEntropyLoss()``.
    amp_dtype : torch.dtype, optional
        Autocast dtype for the forward pass; ``None`` for full precision.
    show_progress : bool, default True
        Show a tqdm bar (always hidden on non-main ranks).
    group : process group, optional
        Reduce the sums over these ranks; ``None`` (default): this process's loader only.
        A caller running on rank 0 alone must leave it ``None``.
    channels_last : bool, default False
        Batches in the channels_last memory format (see :func:`train_one_epoch`).

    Returns
    -------
    dict
        ``loss`` (sample-weighted mean), ``acc`` (fraction correct) and ``n`` (samples).

    Raises
    ------
    ValueError
        If the loader yields no samples (on all ranks of ``group`` together).
    """
    _check_amp(amp_dtype)
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    net = runtime.unwrap(model)
    was_training = net.training
    net.eval()
    # Accumulate on the device and read back once, so the loop never waits on the GPU.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    try:
        with torch.inference_mode():
            bar = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True,
                       disable=not show_progress or not runtime.is_main_process())
            for inputs, targets in bar:
                inputs = inputs.to(device, non_blocking=True, memory_format=_layout(inputs, channels_last))
                targets = targets.to(device, non_blocking=True)
                with _autocast(device, amp_dtype):
                    logits = net(inputs)  # (B, num_classes)
                    loss = criterion(logits, targets)
                batch_size = targets.shape[0]
                loss_sum += loss.double() * batch_size
                correct += (logits.argmax(dim=1) == targets).sum()
                seen += batch_size
            bar.close()
    finally:
        net.train(was_training)

    loss_total, correct_total, seen_total = runtime.all_reduce_sum(
        [loss_sum.item(), correct.item(), seen], device, group
    )
    if seen_total == 0:
        raise ValueError("the evaluation loader yielded no samples")
    return {"loss": loss_total / seen_total, "acc": correct_total / seen_total,
            "n": int(seen_total)}


# ------------------------------------------------------------------ rates from inputs

#: A fresh layer whose input entries have a mean square above this trains at its rate
#: divided by that mean square (see :func:`input_scaled_rates`): unit-scale inputs are
#: what default initialisations and the default rates assume.
UNIT_MEAN_SQUARE = 1.0


@torch.no_grad()
def input_scaled_rates(model: nn.Module, batches: Iterable, layers: Iterable[str], *,
                       device: torch.device | str = "cpu") -> dict[str, float]:
    """Learning-rate multipliers for ``layers`` from the scale of their inputs.

    One SGD step on a linear layer moves its output by ``lr * ||x||^2`` times the error, so
    the rate a fresh head tolerates falls with the square of its input's scale: features 5x
    larger (a VGG16 whose last conv is scaled by 5, as other weights files' are) need a rate
    25x smaller.  This is the normalised LMS rule [1]_: each layer's multiplier is
    ``min(1, UNIT_MEAN_SQUARE / mean(x**2))``, the mean over the entries of its inputs on
    ``batches`` (the model in eval mode: no dropout, BatchNorm on its running statistics).
    Layers with unit-scale or smaller inputs keep the rate they were given (a larger one
    would depart from what the default rates were measured with).

    Parameters
    ----------
    model : nn.Module
    batches : iterable of tensors or (inputs, labels) pairs
        A few input batches (the training images without augmentation).
    layers : iterable of str
        Names of ``nn.Linear`` / ``nn.Conv2d`` modules (``named_modules()``), usually the
        freshly initialised ones.

    Returns
    -------
    dict of str to float
        Each layer's multiplier in ``(0, 1]``.

    References
    ----------
    .. [1] B. Widrow and M. A. Lehr, "30 Years of Adaptive Neural Networks: Perceptron,
           Madaline, and Backpropagation", Proc. IEEE 78(9), 1990 (normalised LMS).
    """
    modules = dict(model.named_modules())
    names = list(dict.fromkeys(layers))
    unknown = [n for n in names if not isinstance(modules.get(n), (nn.Linear, nn.Conv2d))]
    if unknown:
        raise ValueError(f"input_scaled_rates takes Linear or Conv2d layers, got {', '.join(unknown[:3])}")
    # Sums in float64: 25088-wide inputs over hundreds of images.
    sums = {n: [0.0, 0] for n in names}

    def hook(name):
        def record(module, args):
            x = args[0].detach()
            sums[name][0] += float(x.double().square().sum())
            sums[name][1] += x.numel()
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(inputs.to(device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    factors = {}
    for name, (total, count) in sums.items():
        if count == 0:
            raise ValueError(f"layer {name!r} saw no input on the batches given")
        mean_square = total / count
        if not math.isfinite(mean_square):
            raise ValueError(f"the inputs of {name!r} are not finite on the training images")
        factors[name] = min(1.0, UNIT_MEAN_SQUARE / mean_square) if mean_square > 0 else 1.0
    return factors


# ------------------------------------------------------------------------------ fit


def warmup_cosine_factor(step: int, *, warmup_steps: int, total_steps: int,
                         start_factor: float = WARMUP_START_FACTOR,
                         final_factor: float = FINAL_LR_FACTOR) -> float:
    """Learning-rate multiplier at optimisation step ``step`` (0-based).

    Linear from ``start_factor`` to 1 over the first ``warmup_steps`` steps [1]_, then a
    half cosine from 1 down to ``final_factor`` at ``total_steps`` [2]_::

        f(t) = start + (1 - start) * t / W                              for t < W
        f(t) = final + (1 - final) * (1 + cos(pi * (t - W) / (T - W))) / 2   otherwise

    Parameters
    ----------
    step : int
        Number of optimiser steps already taken.
    warmup_steps : int
        ``W``; 0 disables the warm-up.
    total_steps : int
        ``T``, the number of optimiser steps in the whole run.
    start_factor, final_factor : float
        Multipliers at the first step and at the end.

    Returns
    -------
    float

    References
    ----------
    .. [1] Goyal et al., "Accurate, Large Minibatch SGD", arXiv:1706.02677, 2017.
    .. [2] Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm
           Restarts", ICLR 2017.
    """
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _check_sgd_options(*, weight_decay: float, momentum: float, label_smoothing: float) -> None:
    if weight_decay < 0:
        raise UserError(f"weight decay must be >= 0, got {weight_decay!r}")
    if not 0.0 <= momentum < 1.0:
        raise UserError(f"momentum must be in [0, 1), got {momentum!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise UserError(f"label smoothing must be in [0, 1), got {label_smoothing!r}")


def _training_setup(model: nn.Module, train_loader, train_sampler, device: torch.device):
    """Move ``model`` to ``device``; its trainable parameters, steps per epoch and sampler."""
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the training loader yielded no batches")
    if train_sampler is None and isinstance(
        getattr(train_loader, "sampler", None), torch.utils.data.DistributedSampler
    ):
        train_sampler = train_loader.sampler  # set_epoch() reshuffles it every epoch
    return params, steps_per_epoch, train_sampler


def _amp_and_criterion(device: torch.device, *, amp: bool, label_smoothing: float, cpu_bf16: bool = False):
    """Mixed-precision dtype, gradient scaler and training loss for a run on ``device``."""
    amp_dtype = runtime.autocast_dtype_for(device, cpu_bf16=cpu_bf16) if amp else None
    # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    return amp_dtype, scaler, nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def _train_and_evaluate_epoch(model: nn.Module, train_loader, test_loader, optimizer, *, epoch: int,
                              train_sampler, scheduler, scaler, criterion, amp_dtype, device: torch.device,
                              show_progress: bool, group, step_hook, guard: LossGuard | None = None,
                              channels_last: bool = False) -> dict:
    """One training epoch (0-based ``epoch``) then evaluation: the epoch's history record."""
    if train_sampler is not None:
        train_sampler.set_epoch(epoch)
    epoch_lr = optimizer.param_groups[0]["lr"]
    train = train_one_epoch(
        model, train_loader, optimizer, device=device, epoch=epoch + 1, scaler=scaler, scheduler=scheduler,
        criterion=criterion, amp_dtype=amp_dtype, show_progress=show_progress, group=group, step_hook=step_hook,
        guard=guard, channels_last=channels_last,
    )
    test = (evaluate(model, test_loader, device=device, amp_dtype=amp_dtype, show_progress=show_progress,
                     group=group, channels_last=channels_last) if test_loader is not None else None)
    return {
        "epoch": epoch + 1,
        "lr": epoch_lr,
        "train_loss": train["loss"],
        "train_acc": train["acc"],
        "test_loss": test["loss"] if test else None,
        "test_acc": test["acc"] if test else None,
    }


def _test_part(record: dict) -> str:
    if record["test_loss"] is None:
        return ""
    return f"  test loss {record['test_loss']:.4f} acc {record['test_acc']:.2%}"


def _default_schedule(step: int, total_steps: int) -> float:
    return warmup_cosine_factor(step, warmup_steps=int(WARMUP_FRACTION * total_steps), total_steps=total_steps)


def _at_step(schedule: Callable[[int, int], float], step: int, *, total_steps: int) -> float:
    return schedule(step, total_steps)


#: Format tag of :func:`training_checkpoint`'s dict.
CHECKPOINT_FORMAT = "lowrank-cnn-training-checkpoint"


def training_checkpoint(run: _Run, train_loader) -> dict:
    """Everything the epochs after ``run.epoch`` depend on, as plain data (weights-only loadable).

    The weights, the optimizer's momentum buffers, the schedule's position, the loss
    scaler, every random generator (:func:`runtime.rng_state`) and the training loader's
    own generator (it draws each epoch's shuffle), the history so far, the restart budget,
    the loss guard and the best epoch so far (its weights unless it is this epoch).  The
    tensors are the live ones, not copies (no second copy of the weights and momentum
    buffers on the device): save the dict at once.
    """
    generator = getattr(train_loader, "generator", None)
    best = None
    if run.best is not None:
        best = {"epoch": run.best["epoch"], "acc": run.best["acc"], "loss": run.best["loss"],
                "model": None if run.best["epoch"] == run.epoch else run.best["model"]}
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": run.epoch,
        "history": run.history,
        "model": runtime.unwrap(run.model).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": runtime.rng_state(),
        "loader_generator": generator.get_state() if generator is not None else None,
        "restarts_left": run.restarts_left,
        "rate_factor": run.rate_factor,
        "guard": run.guard.state_dict(),
        "best": best,
    }


def _resume_from(state: dict, run: _Run, train_loader) -> None:
    """Restore a :func:`training_checkpoint` into ``run``."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError("not a training checkpoint of this tool")
    epoch, epochs = state.get("epoch"), run.recipe.epochs
    if not isinstance(epoch, int) or not 0 < epoch < epochs:
        raise UserError(f"the checkpoint is after epoch {epoch!r}, outside 1..{epochs - 1} of this {epochs}-epoch run")
    problem = _checkpoint_problem(state, run)
    if problem:
        raise UserError(f"the checkpoint is damaged: {problem}")
    try:
        _restore_training_state(state, run, reused=False)
        runtime.set_rng_state(state["rng"])
        generator = getattr(train_loader, "generator", None)
        if generator is not None and state["loader_generator"] is not None:
            generator.set_state(state["loader_generator"])
        run.epoch, run.history = epoch, list(state["history"])
        run.restarts_left, run.rate_factor = int(state["restarts_left"]), float(state["rate_factor"])
        run.best = _restored_best(state.get("best"), run)
    # A damaged or edited file:
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError, OverflowError) as exc:
        detail = str(exc).strip().split("\n")[0][:200] or type(exc).__name__
        raise UserError(f"the checkpoint does not fit this run ({type(exc).__name__}: {detail})") from None


def _form_problem(expected: Any, got: Any, where: str) -> str | None:
    """How ``got`` differs in form from ``expected`` (what this run writes): types, keys, lengths,
    tensor shapes and dtypes, finite numbers; None when it has the same form."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.dtype != expected.dtype:
            return f"{where} is not a {str(expected.dtype).removeprefix('torch.')} tensor of shape {list(expected.shape)}"
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            return f"{where} holds NaN or infinite values"
        return None
    if expected is None or isinstance(expected, (bool, str)):
        return None if type(got) is type(expected) and (not isinstance(got, str) or len(got) < 1000) else \
            f"{where} must be {type(expected).__name__}, got {type(got).__name__}"
    if isinstance(expected, (int, float)):
        if isinstance(got, bool) or not isinstance(got, (int, float)) or (isinstance(expected, int) and
                                                                            not isinstance(got, int)):
            return f"{where} must be {type(expected).__name__}, got {type(got).__name__}"
        if isinstance(got, int):
            return None if abs(got) < 2 ** 63 else f"{where} is out of range"
        return None if math.isfinite(got) else f"{where} is not finite ({got})"
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            return f"{where} must have the fields {sorted(map(str, expected))[:8]}"
        return next((p for k in expected if (p := _form_problem(expected[k], got[k], f"{where}.{k}"))), None)
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            return f"{where} must be a list of {len(expected)}"
        return next((p for i, e in enumerate(expected) if (p := _form_problem(e, got[i], f"{where}[{i}]"))), None)
    return None


def _checkpoint_problem(state: dict, run: _Run) -> str | None:
    """What in a checkpoint does not have the form this run writes (checked before anything is
    restored; a damaged or edited file otherwise fails mid-training, or never ends)."""
    missing = [k for k in ("model", "optimizer", "scheduler", "scaler", "history", "restarts_left", "rate_factor",
                           "guard", "rng") if k not in state]
    if missing:
        return f"no {missing[0]!r}"
    model_state = runtime.unwrap(run.model).state_dict()
    problem = _form_problem(dict(model_state), state["model"], "model")
    if problem:
        return problem
    optimizer = state["optimizer"]
    template = run.optimizer.state_dict()
    if not isinstance(optimizer, dict) or set(optimizer) != {"state", "param_groups"}:
        return "optimizer must have the fields ['param_groups', 'state']"
    problem = _form_problem(template["param_groups"], optimizer["param_groups"], "optimizer.param_groups")
    if problem:
        return problem
    if any(g["params"] != t["params"] for g, t in zip(optimizer["param_groups"], template["param_groups"])):
        return "optimizer.param_groups name other parameters than this model's"
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    buffers = optimizer["state"]
    if not isinstance(buffers, dict) or not all(isinstance(k, int) and 0 <= k < len(params) for k in buffers):
        return "optimizer.state must map this model's parameter indices to their buffers"
    for index, entry in buffers.items():
        expected = {"momentum_buffer": params[index].detach()}
        if not isinstance(entry, dict) or set(entry) - set(expected):
            return f"optimizer.state[{index}] must hold a momentum buffer only"
        if entry.get("momentum_buffer") is not None:
            problem = _form_problem(expected["momentum_buffer"], entry["momentum_buffer"],
                                    f"optimizer.state[{index}].momentum_buffer")
            if problem:
                return problem
    problem = (_form_problem(run.scheduler.state_dict(), state["scheduler"], "scheduler")
               or _form_problem(run.scaler.state_dict() if run.scaler is not None else None, state["scaler"], "scaler"))
    if problem:
        return problem
    restarts, factor = state["restarts_left"], state["rate_factor"]
    if isinstance(restarts, bool) or not isinstance(restarts, int) or not 0 <= restarts <= run.recipe.max_restarts:
        return f"restarts_left {str(restarts)[:20]} is outside 0..{run.recipe.max_restarts}"
    if isinstance(factor, bool) or not isinstance(factor, float) or not 0 < factor <= 1:
        return f"rate_factor {str(factor)[:20]} is outside (0, 1]"
    if not isinstance(state["history"], list) or len(state["history"]) != state["epoch"] or not all(
            isinstance(r, dict) for r in state["history"]):
        return f"history must hold one record per epoch done ({state['epoch']})"
    return None


def _restored_best(best: dict | None, run: _Run) -> dict | None:
    if best is None or not run.recipe.keep_best:
        return None
    epoch, acc, loss = best["epoch"], best["acc"], best["loss"]
    if not isinstance(epoch, int) or not all(isinstance(v, float) for v in (acc, loss)) or not 0 < epoch <= run.epoch:
        raise ValueError(f"best epoch {epoch!r} with accuracy {acc!r} and loss {loss!r}")
    weights = best["model"]
    current = runtime.unwrap(run.model).state_dict()
    if weights is None:  # the checkpoint's own epoch was the best: its weights are the current ones
        weights = {k: v.detach().to("cpu", copy=True) for k, v in current.items()}
    elif not isinstance(weights, dict) or weights.keys() != current.keys() or any(
            not isinstance(weights[k], torch.Tensor) or weights[k].shape != current[k].shape for k in current):
        raise ValueError("the best epoch's weights do not fit the model")
    return {"epoch": epoch, "acc": acc, "loss": loss, "model": weights}


@dataclass(frozen=True)
class Recipe:
    """How :func:`fit` trains, as one piece of data (the command line fills it from its flags).

    Parameters
    ----------
    epochs : int
        Number of epochs, >= 1.
    lr : float
        Peak learning rate, > 0 (reached at the end of the warm-up).
    weight_decay : float, default DEFAULT_WEIGHT_DECAY
        L2 penalty applied by SGD to all trainable parameters.
    momentum : float, default DEFAULT_MOMENTUM
        SGD momentum.
    label_smoothing : float, default 0.0
        Label smoothing of the training cross-entropy (the test loss is unsmoothed).
    lr_scale : dict of str to float, optional
        Learning-rate multipliers by parameter name (as in ``named_parameters()`` of the
        unwrapped model); parameters not named train at ``lr``.  Fine-tuning recipes give
        pretrained layers a smaller rate than freshly initialised ones.
    amp : bool, default True
        Mixed precision where :func:`runtime.autocast_dtype_for` allows it: on CUDA, and on a CPU
        with native bfloat16 when ``cpu_bf16``.
    cpu_bf16 : bool, default False
        On a CPU with AVX512-BF16 or AMX: forward passes under bfloat16 autocast (the weights
        and the optimiser stay float32).
    channels_last : bool, default False
        Train and evaluate in the channels_last memory format (the model is given back in the
        default format, also when the run fails).  A caller that wraps the model in
        ``DistributedDataParallel`` converts it first (``model.to(memory_format=
        torch.channels_last)``, as ``main`` does): DDP's gradient buckets follow the layout
        the parameters had when it wrapped them.
    schedule : callable ``(step, total_steps) -> factor``, optional
        The learning-rate multiplier at each optimiser step; default
        :func:`warmup_cosine_factor` with a :data:`WARMUP_FRACTION` warm-up.
    max_restarts : int, default MAX_NONFINITE_RESTARTS
        When the loss becomes non-finite or diverges (``divergence``), the epoch restarts
        from the weights, optimizer and schedule state it began with, every learning rate
        multiplied by :data:`NONFINITE_LR_FACTOR` (logged as a warning), at most this many
        times in the run; 0 stops at once.  The state is kept in memory (one copy of the
        weights and of the momentum buffers).
    divergence : float or None, default DIVERGENCE_FACTOR
        The loss counts as diverged once its running mean over batches exceeds this many
        times where the run started (:class:`LossGuard`), before it is non-finite and the
        weights are ruined; None: only a non-finite loss does.
    keep_best : bool, default True
        With a test loader, the model ends with the weights of the epoch with the best test
        accuracy (logged when that is not the last epoch); False: the last epoch's.
    rate_probe : tuple of float, default ()
        Multipliers of every rate, in (0, 1] and decreasing (e.g. :data:`DEFAULT_RATE_PROBE`):
        before the first epoch of a fresh run, each trains :data:`PROBE_STEPS` batches from
        the run's start at its peak rates, going down the list while the loss on those
        batches afterwards keeps falling (or has not yet fallen below the start's); the run
        then starts again from the same weights at the best one (a short learning-rate range
        test, Smith 2017; a warning when no rate lowered the loss), or at the highest rate the
        loss guard accepts when no loss was clearly below a uniform guess's (see
        :func:`_probe_rates`).  Empty: off.
    """

    epochs: int
    lr: float
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    momentum: float = DEFAULT_MOMENTUM
    label_smoothing: float = 0.0
    lr_scale: dict[str, float] | None = None
    amp: bool = True
    cpu_bf16: bool = False
    channels_last: bool = False
    schedule: Callable[[int, int], float] | None = None
    max_restarts: int = MAX_NONFINITE_RESTARTS
    divergence: float | None = DIVERGENCE_FACTOR
    keep_best: bool = True
    rate_probe: tuple[float, ...] = ()

    def check(self) -> None:
        """Raise :class:`errors.UserError` naming the first value out of range."""
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise UserError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise UserError(f"learning rate must be a finite number > 0, got {self.lr!r}")
        _check_sgd_options(weight_decay=self.weight_decay, momentum=self.momentum,
                           label_smoothing=self.label_smoothing)
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise UserError(f"max_restarts must be an integer >= 0, got {self.max_restarts!r}")
        if self.divergence is not None and not (self.divergence > 1 and math.isfinite(self.divergence)):
            raise UserError(f"divergence must be a finite factor > 1 or None, got {self.divergence!r}")
        probe = tuple(self.rate_probe)
        if not all(isinstance(f, (int, float)) and 0 < f <= 1 for f in probe) or any(
                a <= b for a, b in zip(probe, probe[1:])):
            raise UserError(f"rate_probe must be decreasing factors in (0, 1], got {self.rate_probe!r}")


class LossGuard:
    """Tells a diverging run from a noisy one, batch by batch.

    The reference is the mean loss of the run's first :data:`GUARD_REFERENCE_BATCHES`
    batches (never below :data:`GUARD_MIN_REFERENCE`, so that a model already near zero
    loss is not stopped by ordinary noise); the run has diverged when the running mean of
    the loss (exponential, :data:`GUARD_SMOOTHING` per batch: one unlucky batch does not
    trip it, one exploding batch does) exceeds ``factor`` times it.  Its state is part of
    the run's: restored with an epoch's restart, saved in checkpoints.
    """

    def __init__(self, factor: float | None) -> None:
        self.factor = factor
        self.first: list[float] = []
        self.reference: float | None = None
        self.running: float | None = None

    @staticmethod
    def limit(factor: float, start: float) -> float:
        """The running mean above which a run that started at ``start`` has diverged."""
        return factor * max(GUARD_MIN_REFERENCE, start)

    def update(self, loss: float) -> str | None:
        """Record a batch's loss; the reason the run counts as diverged, or None."""
        if self.factor is None or not math.isfinite(loss):
            return None
        self.running = loss if self.running is None else (1 - GUARD_SMOOTHING) * self.running + GUARD_SMOOTHING * loss
        if self.reference is None:
            self.first.append(loss)
            if len(self.first) == GUARD_REFERENCE_BATCHES:
                self.reference = max(GUARD_MIN_REFERENCE, sum(self.first) / len(self.first))
            return None
        if self.running > self.limit(self.factor, self.reference):
            return (f"training loss diverged: its running mean {self.running:.4g} is over {self.factor:g}x where "
                    f"the run started ({self.reference:.4g})")
        return None

    def state_dict(self) -> dict:
        return {"first": list(self.first), "reference": self.reference, "running": self.running}

    def load_state_dict(self, state: dict) -> None:
        first, reference, running = state["first"], state["reference"], state["running"]
        if not isinstance(first, list) or not all(isinstance(v, float) for v in first):
            raise TypeError("guard 'first' must be a list of floats")
        for value in (reference, running):
            if value is not None and not isinstance(value, float):
                raise TypeError("guard values must be floats or None")
        self.first, self.reference, self.running = list(first), reference, running


@dataclass
class _Run:
    """The state of one :func:`fit` call: what it trains with and how far it got."""

    model: nn.Module
    recipe: Recipe
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    amp_dtype: torch.dtype | None
    guard: LossGuard
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    restarts_left: int = 0
    rate_factor: float = 1.0  # every learning rate's multiplier after the restarts so far
    best: dict | None = None  # {"epoch", "acc", "model": state_dict copy, or None while it is the current one}


def _start_run(model: nn.Module, train_loader, recipe: Recipe, device: torch.device, train_sampler):
    """Check the recipe, move the model; the run's optimiser, schedule, precision and loss."""
    recipe.check()
    params, steps_per_epoch, train_sampler = _training_setup(model, train_loader, train_sampler, device)
    # Rates as floats: a checkpoint's rates (floats once a restart scaled them) then have the form
    # of this run's (Recipe(lr=1) would make them ints; see _checkpoint_problem).
    lr = float(recipe.lr)
    optimizer = torch.optim.SGD(_param_groups(model, params, lr, recipe.lr_scale), lr=lr,
                                momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    schedule = _default_schedule if recipe.schedule is None else recipe.schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(_at_step, schedule, total_steps=recipe.epochs * steps_per_epoch))
    amp_dtype, scaler, criterion = _amp_and_criterion(device, amp=recipe.amp, label_smoothing=recipe.label_smoothing,
                                                      cpu_bf16=recipe.cpu_bf16)
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    run = _Run(model, recipe, optimizer, scheduler, scaler, criterion, amp_dtype, LossGuard(recipe.divergence),
               restarts_left=recipe.max_restarts)
    return run, train_sampler


@contextlib.contextmanager
def _default_layout_after(model: nn.Module, channels_last: bool):
    """The caller's model back in the default memory format when a channels_last run ends,
    whatever happened in it."""
    try:
        yield
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)


def fit(
    model: nn.Module,
    train_loader,
    test_loader=None,
    *,
    recipe: Recipe,
    device: torch.device,
    train_sampler=None,
    show_progress: bool = True,
    log: logging.Logger | None = None,
    group=None,
    step_hook: Callable[[], None] | None = None,
    epoch_hook: Callable[[dict], None] | None = None,
    checkpoint: Callable[[Callable[[], dict]], None] | None = None,
    resume: dict | None = None,
) -> list[dict]:
    """Fine-tune ``model`` by ``recipe``: SGD with momentum, warm-up + cosine LR, evaluation each epoch.

    Only parameters with ``requires_grad=True`` are optimised, so freezing layers is
    done by the caller before calling ``fit`` (frozen parameters are not touched, not
    even by weight decay). The model may be wrapped in ``DistributedDataParallel`` by
    the caller, who then passes the ranks' ``group``: metrics are reduced over it and
    only rank 0 logs.

    An epoch whose loss turns non-finite or diverges restarts at a lower rate
    (``recipe.max_restarts``); with a test loader the model ends with its best epoch's
    weights (``recipe.keep_best``), also when a later epoch runs out of restarts (the run
    then stops there, with a warning, instead of raising).  A run can continue after an interruption:
    ``checkpoint`` is called after every epoch but the last with a function returning
    everything the next epochs depend on (:func:`training_checkpoint`), and ``resume``
    takes such a dict back; on CPU, with the same seed and a loader without worker
    processes, the final weights equal an uninterrupted run's.

    Parameters
    ----------
    model : nn.Module
        Model to train in place; moved to ``device``.
    train_loader : DataLoader
        Training batches; must have a length (the schedule is per batch).
    test_loader : DataLoader, optional
        Evaluated after every epoch when given.
    recipe : Recipe
        Epochs, rates and the rest of how to train.
    device : torch.device
        Where to train.
    train_sampler : sampler with ``set_epoch``, optional
        Typically a ``DistributedSampler``; ``set_epoch(epoch)`` (0-based) is called
        before each epoch so shuffling differs per epoch. When omitted and
        ``train_loader.sampler`` is a ``DistributedSampler``, that one is used.
    show_progress : bool, default True
        Show tqdm bars (main rank only).
    log : logging.Logger, optional
        Logger for the one-line-per-epoch summary; default this module's logger.
    group : process group, optional
        The ranks training together (with a DDP-wrapped model); ``None`` (default):
        this process alone.
    step_hook : callable, optional
        Called after every optimiser step (see :func:`train_one_epoch`).
    epoch_hook : callable ``(record) -> None``, optional
        Called with each epoch's history record before it is logged; may add fields.
    checkpoint : callable ``(make_state) -> None``, optional
        Called after every epoch but the last; ``make_state()`` builds the state to resume
        from (only the rank that writes it needs to call it).
    resume : dict, optional
        A state ``make_state`` built: training continues after its epoch.

    Returns
    -------
    list of dict
        One dict per epoch with ``epoch`` (1-based), ``lr`` (learning rate of the
        first parameter group at the start of the epoch), ``train_loss``,
        ``train_acc``, ``test_loss``, ``test_acc`` (``None`` without a test loader),
        ``seconds`` (wall time of the epoch, evaluation included), ``restarts``
        (restarts of this epoch) and ``kept`` (whether the model ends with its weights).

    Raises
    ------
    ValueError
        If a recipe value is out of range, the model has no trainable parameters or the
        training loader is empty (the recipe errors are :class:`errors.UserError`).
    NonFiniteLossError
        If training still diverges after ``recipe.max_restarts`` restarts.
    """
    log = logger if log is None else log
    is_main = runtime.is_main_process()
    with _default_layout_after(model, recipe.channels_last):
        run, train_sampler = _start_run(model, train_loader, recipe, device, train_sampler)
        if resume is not None:
            _resume_from(resume, run, train_loader)
            if is_main:
                log.info("resuming after epoch %d/%d", run.epoch, recipe.epochs)
        elif recipe.rate_probe:
            _probe_rates(run, train_loader, device=device, group=group, log=log if is_main else None)
        while run.epoch < recipe.epochs:
            start = time.perf_counter()
            try:
                record = _epoch_with_restarts(run, train_loader, test_loader, train_sampler=train_sampler,
                                              device=device, show_progress=show_progress, group=group,
                                              step_hook=step_hook, log=log if is_main else None)
            except NonFiniteLossError as exc:
                if run.best is None:  # no evaluated epoch to fall back on
                    raise
                # Out of restarts after good epochs: the run ends with the best of them rather
                # than with nothing (a --resume would meet the same epoch again).
                runtime.unwrap(run.model).load_state_dict(run.best["model"])
                if is_main:
                    log.warning("%s; stopping after %d of %d epochs with the best one so far", exc, run.epoch,
                                recipe.epochs)
                break
            record["seconds"] = time.perf_counter() - start
            if epoch_hook is not None:
                epoch_hook(record)
            run.history.append(record)
            run.epoch += 1
            _track_best(run, record)
            # Checkpoint first, then log: once "epoch k" is printed, --resume can continue after it.
            if checkpoint is not None and run.epoch < recipe.epochs:  # the last epoch's result is the model itself
                checkpoint(partial(training_checkpoint, run, train_loader))
            if is_main:
                log.info("epoch %d/%d  lr %.3g  train loss %.4f acc %.2f%%%s  (%.1f s)",
                         run.epoch, recipe.epochs, record["lr"], record["train_loss"],
                         100 * record["train_acc"], _test_part(record), record["seconds"])
        _end_with_best(run, log if is_main else None)
        return run.history


def _epoch_with_restarts(run: _Run, train_loader, test_loader, *, train_sampler, device, show_progress, group,
                         step_hook, log) -> dict:
    """One epoch and its evaluation; a non-finite or diverging loss restarts it from its start
    at a lower rate while the run's restarts last."""
    saved = _training_state(run) if run.restarts_left else None
    saved_factor = run.rate_factor
    restarts = 0
    while True:
        try:
            record = _train_and_evaluate_epoch(
                run.model, train_loader, test_loader, run.optimizer, epoch=run.epoch, train_sampler=train_sampler,
                scheduler=run.scheduler, scaler=run.scaler, criterion=run.criterion, amp_dtype=run.amp_dtype,
                device=device, show_progress=show_progress, group=group, step_hook=step_hook, guard=run.guard,
                channels_last=run.recipe.channels_last)
            record["restarts"] = restarts
            return record
        except NonFiniteLossError as exc:
            if not run.restarts_left:
                if run.recipe.max_restarts:
                    raise NonFiniteLossError(f"{exc} (already restarted {run.recipe.max_restarts} time(s), down to "
                                             f"{run.rate_factor:g}x the learning rate)") from None
                raise
            run.restarts_left -= 1
            restarts += 1
            # The saved state carries the rates of saved_factor; each restart lowers them further.
            run.rate_factor *= NONFINITE_LR_FACTOR
            _restore_training_state(saved, run)
            _scale_learning_rates(run.optimizer, run.scheduler, run.rate_factor / saved_factor)
            if log is not None:
                log.warning("%s: restarting epoch %d from its start at %gx the learning rate(s) (now %s)",
                            str(exc).split(";")[0], run.epoch + 1, run.rate_factor,
                            ", ".join(f"{lr_:.3g}" for lr_ in run.scheduler.base_lrs))


#: Sampler epochs for the rate probe's passes after the first over a short loader (any values the
#: training epochs, numbered from 0, do not reach soon).
PROBE_SAMPLER_EPOCH = 1_000_000


def _probe_batches(train_loader, count: int) -> list:
    """The first ``count`` training batches (the loader again from its start if shorter, in
    another order: a DistributedSampler repeats its order until its epoch changes, which would
    judge the probe on the very batches it trained on)."""
    batches = []
    sampler = getattr(train_loader, "sampler", None)
    reorder = hasattr(sampler, "set_epoch")
    epoch = getattr(sampler, "epoch", 0)
    passes = 0
    while len(batches) < count:
        if passes and reorder:
            sampler.set_epoch(PROBE_SAMPLER_EPOCH + passes)
        passes += 1
        before = len(batches)
        for batch in train_loader:
            batches.append(batch)
            if len(batches) == count:
                break
        if len(batches) == before:
            raise ValueError("the training loader yielded no batches")
    if passes > 1 and reorder:
        sampler.set_epoch(epoch)  # as it was: the epochs of the run number themselves
    return batches


def _probe_loss(run: _Run, batches: list, *, device, group) -> float:
    """The model's mean eval-mode loss on ``batches`` (reduced over ``group``), by :func:`evaluate`."""
    return evaluate(run.model, batches, device=device, criterion=run.criterion, amp_dtype=run.amp_dtype,
                    show_progress=False, group=group, channels_last=run.recipe.channels_last)["loss"]


def _probe_rates(run: _Run, train_loader, *, device, group, log) -> float:
    """``recipe.rate_probe``: try its multipliers of the run's rates from the start's weights
    and keep the highest one that left the loss on the batches after those it trained on below
    the start's and within :data:`PROBE_MARGIN` of the lowest (going down while the loss falls
    or is still above the start's); the run's rates are scaled by it.  When no candidate
    brought the loss clearly below a uniform guess's (``ln C``) and the start was not below it
    either, the figures are noise and it keeps the highest rate whose loss stayed within the
    run's :class:`LossGuard` limit.

    Why: the rate a pretrained network tolerates depends on its weights' scale (a VGG16 whose
    last conv is 5x larger needs rates ~25x smaller: every layer below it sees its gradient
    and its effect 5x amplified) and on the data, so no fixed default fits every start; the
    rate sweeps in RESULTS.md found best rates 30x apart.  A few steps measure it."""
    factors = run.recipe.rate_probe
    batches = _probe_batches(train_loader, 2 * PROBE_STEPS)
    batches, judged = batches[:PROBE_STEPS], batches[PROBE_STEPS:]  # trained on, judged on
    start = _training_state(run)
    peaks = list(run.scheduler.base_lrs)
    reference = _probe_loss(run, judged, device=device, group=group)
    best_factor, best_loss, tried, losses = factors[-1], math.inf, [f"start: {reference:.4g}"], []
    for factor in factors:
        _restore_training_state(start, run)
        for group_, peak in zip(run.optimizer.param_groups, peaks):
            group_["lr"] = peak * factor
        steps = partial(train_one_epoch, run.model, optimizer=run.optimizer, device=device, epoch=0,
                        scaler=run.scaler, criterion=run.criterion, amp_dtype=run.amp_dtype, show_progress=False,
                        group=group, channels_last=run.recipe.channels_last)
        try:
            steps(batches)
            loss = _probe_loss(run, judged, device=device, group=group)
        except NonFiniteLossError:
            loss = math.inf
        loss = loss if math.isfinite(loss) else math.inf
        tried.append(f"x{factor:g}: {loss:.4g}")
        losses.append((factor, loss))
        if loss < best_loss:
            best_factor, best_loss = factor, loss
        elif best_loss < reference:
            # Past a best that lowered the loss.  A candidate that diverged or ended above the
            # start only sends the probe lower: a rate that made things worse is never kept
            # (unless the figures are noise, below).
            break
    lowest_at = best_factor
    classes = _classes(run, judged[0], device=device)
    guess = (1 - PROBE_MARGIN) * math.log(classes)
    divergence = run.recipe.divergence or DIVERGENCE_FACTOR
    limit = LossGuard.limit(divergence, reference)
    # Neither the start nor any candidate had the loss clearly below a uniform guess's (ln C): a
    # network from random init after 8 steps, whose figures are noise (ResNet-18 from
    # torchvision's init, 60 runs: the best candidate 0.65-0.70 against ln 2 = 0.693, x1 rising
    # to 0.82-1.19 on 10 of them, rates the full run, warmed up, trains well; trained VGG16
    # convs, 18 runs: best 0.21-0.65; benchmarks/RESULTS.md, "The --train recipe").  Then keep
    # the highest rate whose loss stayed within the loss guard's limit.  (A start already below
    # the guess, a model that had learnt, is judged as before: there a rise is real.)
    kept = [f for f, loss in losses if math.isfinite(loss) and loss <= limit]
    noise = math.isfinite(reference) and min(reference, best_loss) >= guess and bool(kept)
    if noise:
        best_factor = kept[0]
    elif best_loss < reference:  # the highest rate as good as the best within the margin
        best_factor = next(f for f, loss in losses if loss < reference and loss <= best_loss + PROBE_MARGIN * reference)
    _restore_training_state(start, run)
    if best_factor != 1:
        _scale_learning_rates(run.optimizer, run.scheduler, best_factor)
        run.rate_factor *= best_factor
    if log is not None:
        margin = "" if best_factor == lowest_at else (
            f", the highest whose loss stayed within {divergence:g}x of the "
            f"start's (the loss guard's limit): neither the start nor any rate had the loss below "
            f"{1 - PROBE_MARGIN:.0%} of a uniform guess's over {classes} classes ({math.log(classes):.4g}), "
            f"too few steps to tell rates apart"
            if noise else
            f", the highest within {PROBE_MARGIN:.0%} of the start's loss of the lowest (x{lowest_at:g})")
        loader_batches = len(train_loader) if hasattr(train_loader, "__len__") else None
        judged_on = (f"loss on {len(judged)} batches after training on {len(batches)} others"
                     if loader_batches is None or loader_batches >= len(batches) + len(judged) else
                     f"loss on {len(judged)} batches after training on {len(batches)}: an epoch has "
                     f"{loader_batches}, so partly the same images again, augmented anew")
        log.info("rate probe (%s): %s; training at x%g of the rates (%s)%s", judged_on, ", ".join(tried),
                 best_factor, ", ".join(f"{lr_:.3g}" for lr_ in run.scheduler.base_lrs), margin)
        if not best_loss < reference and not noise:
            log.warning("rate probe: no rate tried lowered the loss below the start's (%s); training at x%g, the %s",
                        ", ".join(tried), best_factor,
                        "lowest tried" if not math.isfinite(best_loss) else "one that left the lowest loss")
    return best_factor


def _classes(run: _Run, batch, *, device) -> int:
    """The number of classes the model scores (its logits' dimension 1, cross-entropy's), from one
    input of ``batch``."""
    net = runtime.unwrap(run.model)
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            return int(net(batch[0][:1].to(device)).shape[1])
    finally:
        net.train(was_training)


def _track_best(run: _Run, record: dict) -> None:
    """Remember the epoch with the best test accuracy, with a copy of its weights while later
    epochs still change them in place."""
    if not run.recipe.keep_best or record["test_acc"] is None:
        return
    # Ties in accuracy (small test sets) go to the lower test loss, then to the later epoch.
    if run.best is None or (record["test_acc"], -record["test_loss"]) >= (run.best["acc"], -run.best["loss"]):
        weights = None
        if run.epoch < run.recipe.epochs:  # kept in host memory: a GPU holds the live weights only
            weights = {k: v.detach().to("cpu", copy=True) for k, v in runtime.unwrap(run.model).state_dict().items()}
        run.best = {"epoch": record["epoch"], "acc": record["test_acc"], "loss": record["test_loss"],
                    "model": weights}


def _end_with_best(run: _Run, log) -> None:
    """Load the best epoch's weights when it was not the last one, and mark the kept epoch."""
    last = run.history[-1]
    if run.best is None:
        for record in run.history:
            record["kept"] = record is last
        return
    if run.best["epoch"] != last["epoch"]:
        runtime.unwrap(run.model).load_state_dict(run.best["model"])
        if log is not None:
            log.info("keeping epoch %d's weights: the best test accuracy, %.2f%% (the last epoch's: %.2f%%)",
                     run.best["epoch"], 100 * run.best["acc"], 100 * last["test_acc"])
    for record in run.history:
        record["kept"] = record["epoch"] == run.best["epoch"]
    run.best = None


def _param_groups(model: nn.Module, params: list[nn.Parameter], lr: float,
                  lr_scale: dict[str, float] | None) -> list[dict]:
    """SGD parameter groups: one per distinct learning-rate multiplier of ``lr_scale``."""
    if not lr_scale:
        return [{"params": params}]
    names = {id(p): n for n, p in runtime.unwrap(model).named_parameters()}
    unknown = sorted(set(lr_scale) - set(names.values()))
    if unknown:
        raise ValueError(f"lr_scale names parameters the model does not have: {', '.join(unknown[:3])}")
    bad = {n: f for n, f in lr_scale.items() if not (f > 0 and math.isfinite(f))}
    if bad:
        raise ValueError(f"lr_scale factors must be finite and > 0, got {bad}")
    groups: dict[float, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(float(lr_scale.get(names.get(id(p), ""), 1.0)), []).append(p)
    # The group at the full rate first: history's "lr" reads the first group.
    return [{"params": ps, "lr": lr * f} for f, ps in sorted(groups.items(), reverse=True)]


def _training_state(run: _Run) -> dict:
    """A copy of everything an epoch changes, to restart it from (on the tensors' own devices)."""
    return {"model": {k: v.detach().clone() for k, v in runtime.unwrap(run.model).state_dict().items()},
            "optimizer": copy.deepcopy(run.optimizer.state_dict()),
            "scheduler": copy.deepcopy(run.scheduler.state_dict()),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "guard": run.guard.state_dict()}


def _restore_training_state(saved: dict, run: _Run, *, reused: bool = True) -> None:
    """Load a :func:`_training_state` (or a checkpoint) into the run's objects.

    ``reused``: ``saved`` serves again (the in-memory restart state), so the optimizer and
    schedule get copies -- ``Optimizer.load_state_dict`` keeps the given tensors, which the
    next steps update in place.  A checkpoint read from a file is used once: no copies.
    """
    own = copy.deepcopy if reused else (lambda state: state)
    runtime.unwrap(run.model).load_state_dict(saved["model"])
    run.optimizer.load_state_dict(own(saved["optimizer"]))
    run.scheduler.load_state_dict(own(saved["scheduler"]))
    if run.scaler is not None:
        run.scaler.load_state_dict(saved["scaler"])
    if "guard" in saved or not reused:
        run.guard.load_state_dict(saved["guard"])


def _scale_learning_rates(optimizer, scheduler, factor: float) -> None:
    """Multiply the schedule's peak rates and the current rates by ``factor``."""
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
