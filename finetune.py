"""Training and evaluation engine: one epoch, evaluation, a full fine-tuning run, latency.

Modelled on torchvision's ``references/classification/train.py`` (``train_one_epoch``,
``evaluate``, the ``utils.init_distributed_mode`` helper) with a few deliberate choices:

* Everything is device-agnostic: callers pass one ``torch.device`` (see
  :func:`resolve_device`) and nothing here calls ``.cuda()``.
* Mixed precision is used on CUDA only: ``torch.autocast`` with bfloat16 when the GPU
  supports it, otherwise float16 together with a :class:`torch.amp.GradScaler`.
  On CPU and MPS training runs in float32.
* The learning rate follows a short linear warm-up and then a cosine decay, stepped once
  per batch (fine-tuning runs are often only a few epochs long, so a per-epoch schedule
  would be too coarse).
* A non-finite loss stops training with :class:`NonFiniteLossError` instead of silently
  producing a model full of NaNs.
* Distributed data parallel (``torchrun``) is supported: :func:`init_distributed` reads
  the torchrun environment, metrics are summed over all ranks, and only the main rank
  shows progress bars and logs. Wrapping the model in ``DistributedDataParallel`` is the
  caller's job; :func:`fit` works with a wrapped or a plain model.
* :func:`anneal_to_masks` is :func:`fit` with a mask schedule: it moves trained dense
  Linear layers onto the structure of :class:`decompositions.DiagonalLinear` while the
  whole model trains, so that the conversion afterwards is exact.

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

import copy
import logging
import math
import os
import random
import re
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

import decompositions
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

#: Device names accepted by :func:`resolve_device` (``cuda:N`` selects GPU number N).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_CUDA_INDEX_RE = re.compile(r"cuda:(\d+)")

#: Environment variables set by ``torchrun`` for each worker.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite (usually a learning rate that is too high).

    It is a :class:`errors.UserError`, so the command line reports it as one line.
    """


# --------------------------------------------------------------------------- devices


def resolve_device(name: str) -> torch.device:
    """Turn a ``--device`` value into a :class:`torch.device`, checking it is usable.

    Parameters
    ----------
    name : str
        One of ``"auto"`` (CUDA if available, else MPS if available, else CPU),
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``; case and surrounding
        whitespace are ignored.

    Returns
    -------
    torch.device

    Raises
    ------
    errors.UserError
        If the name is unknown, or names an accelerator (or GPU index) that this
        machine or this PyTorch build does not have.
    """
    key = name.strip().lower()
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if key == "cpu":
        return torch.device("cpu")
    match = _CUDA_INDEX_RE.fullmatch(key)
    if key == "cuda" or match:
        if not torch.cuda.is_available():
            raise UserError(
                f"device {name!r} requested but CUDA is not available "
                f"(torch {torch.__version__}); use 'cpu' or 'auto'"
            )
        if match:
            index, count = int(match.group(1)), torch.cuda.device_count()
            if index >= count:
                raise UserError(
                    f"device {name!r} requested but only {count} CUDA device(s) exist "
                    f"(valid: cuda:0..cuda:{count - 1})"
                )
        return torch.device(key)
    if key == "mps":
        if not _mps_available():
            raise UserError(
                f"device {name!r} requested but MPS (Apple GPU) is not available; "
                "use 'cpu' or 'auto'"
            )
        return torch.device("mps")
    raise UserError(f"unknown device {name!r}; allowed: {', '.join(DEVICE_CHOICES)}")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


def autocast_dtype_for(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype to use on ``device``, or ``None`` for full precision.

    bfloat16 on CUDA GPUs that support it (no loss scaling needed), float16 on older
    CUDA GPUs (pair it with a :class:`torch.amp.GradScaler`), ``None`` on CPU and MPS.
    """
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels so host-side timings cover the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ----------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    """Where this process sits in a (possibly disabled) distributed run."""

    enabled: bool
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """True on the process that should log, show progress and write files."""
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group described by torchrun's environment, if there is one.

    When ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are all set and ``WORLD_SIZE > 1``,
    the default process group is initialised from the environment (``MASTER_ADDR`` /
    ``MASTER_PORT``): NCCL on CUDA, where the device becomes ``cuda:LOCAL_RANK``, and
    Gloo on CPU. Otherwise nothing is initialised and a disabled :class:`DistInfo` is
    returned together with ``device`` unchanged.

    Parameters
    ----------
    device : torch.device
        The device chosen by :func:`resolve_device`.

    Returns
    -------
    (DistInfo, torch.device)
        The process's place in the run and the device it must use.

    Raises
    ------
    errors.UserError
        For malformed torchrun variables, a missing ``MASTER_ADDR``/``MASTER_PORT``,
        an MPS device (no distributed backend), or a LOCAL_RANK without a matching GPU.
    """
    if not all(var in os.environ for var in _TORCHRUN_VARS):
        return DistInfo(enabled=False, rank=0, world_size=1, local_rank=0), device
    try:
        rank, world_size, local_rank = (int(os.environ[var]) for var in _TORCHRUN_VARS)
    except ValueError:
        values = ", ".join(f"{var}={os.environ[var]!r}" for var in _TORCHRUN_VARS)
        raise UserError(f"torchrun variables must be integers, got {values}") from None
    if world_size <= 1:
        return DistInfo(enabled=False, rank=0, world_size=1, local_rank=0), device
    if not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world_size})")
    missing = [var for var in ("MASTER_ADDR", "MASTER_PORT") if var not in os.environ]
    if missing:
        raise UserError(
            f"distributed run (WORLD_SIZE={world_size}) but {' and '.join(missing)} "
            "not set; launch with torchrun"
        )
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed support")

    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA "
                "device(s) are visible"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(
            f"distributed training is not supported on device {str(device)!r}; "
            "use 'cuda' or 'cpu'"
        )

    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            # Binding NCCL to this rank's GPU up front avoids guessing (and a warning).
            device_id=device if backend == "nccl" else None,
        )
    logger.info("distributed: rank %d/%d (local %d), backend %s, device %s",
                rank, world_size, local_rank, backend, device)
    return DistInfo(enabled=True, rank=rank, world_size=world_size, local_rank=local_rank), device


def cleanup_distributed() -> None:
    """Destroy the default process group if one was initialised (safe to call always)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_main_process() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (identity when not distributed).

    float64 keeps sample counts and loss sums exact enough; the tensor lives on
    ``device`` because NCCL only reduces GPU tensors.
    """
    if not _distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper, else the model."""
    return model.module if isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.DataParallel)
    ) else model


# ------------------------------------------------------------------------- seeding


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and all CUDA devices) random generators.

    With the same seed, two CPU runs of the same code produce bit-identical weights
    (data-loader shuffling, weight initialisation and dropout all draw from these
    generators; use ``num_workers=0`` or a seeded ``worker_init_fn`` for loaders).

    Parameters
    ----------
    seed : int
        The seed.
    deterministic : bool, default False
        Also ask PyTorch for deterministic kernels (``torch.use_deterministic_algorithms``
        in warn-only mode, cuDNN benchmarking off). Slower on GPU; CPU runs are already
        reproducible without it. This changes process-wide PyTorch settings.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy only accepts 32-bit seeds
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.cuda.manual_seed_all(seed)  # explicit; lazily applied if CUDA is not initialised
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


# ------------------------------------------------------------------ train / evaluate


def _check_amp(amp_dtype: torch.dtype | None) -> None:
    if amp_dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(
            f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype!r}"
        )


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


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
        means full precision. :func:`autocast_dtype_for` gives the usual choice.
    show_progress : bool, default True
        Show a tqdm bar with running loss/accuracy (always hidden on non-main ranks).

    Returns
    -------
    dict
        ``loss`` (sample-weighted mean of the per-batch training loss), ``acc``
        (fraction of correct top-1 predictions, measured on the training batches while
        the weights change) and ``n`` (samples seen), summed over all ranks when
        distributed.

    Raises
    ------
    NonFiniteLossError
        If a batch's loss is NaN or infinite (on any rank); no update is made from it.
    ValueError
        If the loader yields no batches, or ``amp_dtype`` is not a supported dtype.
    """
    _check_amp(amp_dtype)
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=f"train {epoch}", leave=False, dynamic_ncols=True,
               disable=not show_progress or not _is_main_process())
    for step, (inputs, targets) in enumerate(bar):
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(inputs)  # (B, num_classes)
            loss = criterion(logits, targets)

        # One host sync per step: the loss and the batch's correct count together.
        batch_loss, batch_correct = torch.stack(
            [loss.detach().float(), (logits.argmax(dim=1) == targets).sum().float()]
        ).tolist()
        if not _all_ranks_finite(batch_loss, device):
            raise NonFiniteLossError(
                f"training loss became non-finite ({batch_loss} on this rank) at epoch "
                f"{epoch}, batch {step}; try a lower learning rate"
            )

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

        batch_size = targets.shape[0]
        loss_sum += batch_loss * batch_size
        correct += int(batch_correct)
        seen += batch_size
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}",
                        refresh=False)
    bar.close()

    loss_sum, correct, seen = _all_reduce_sum([loss_sum, correct, seen], device)
    if seen == 0:
        raise ValueError("the training loader yielded no batches")
    return {"loss": loss_sum / seen, "acc": correct / seen, "n": int(seen)}


def _all_ranks_finite(value: float, device: torch.device) -> bool:
    """Whether ``value`` is finite on every rank.

    All ranks must agree before any of them raises: a rank that stopped early would
    leave the others blocked in DDP's gradient all-reduce.
    """
    finite = math.isfinite(value)
    if not _distributed():
        return finite
    flag = torch.tensor([1 if finite else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    criterion: nn.Module | None = None,
    amp_dtype: torch.dtype | None = None,
    show_progress: bool = True,
) -> dict:
    """Loss and top-1 accuracy of ``model`` over ``loader``.

    Runs under ``torch.inference_mode()`` with the model in eval mode; the model's
    previous train/eval mode is restored afterwards. A ``DistributedDataParallel``
    wrapper is looked through, so evaluation makes no collective calls per batch.

    When distributed, the sums of loss, correct predictions and samples are all-reduced,
    so every rank gets the global figures. Note that ``DistributedSampler`` (with its
    default ``drop_last=False``) pads the dataset by repeating a few samples until it
    divides evenly among the ranks: ``n`` is then the padded size
    ``ceil(len(dataset) / world_size) * world_size`` and the repeated samples count
    twice, a bias of at most ``world_size - 1`` samples.

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

    Returns
    -------
    dict
        ``loss`` (sample-weighted mean), ``acc`` (fraction correct) and ``n`` (samples).

    Raises
    ------
    ValueError
        If the loader yields no samples (on all ranks together).
    """
    _check_amp(amp_dtype)
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    # Accumulate on the device and read back once, so the loop never waits on the GPU.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    try:
        with torch.inference_mode():
            bar = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True,
                       disable=not show_progress or not _is_main_process())
            for inputs, targets in bar:
                inputs = inputs.to(device, non_blocking=True)
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

    loss_total, correct_total, seen_total = _all_reduce_sum(
        [loss_sum.item(), correct.item(), seen], device
    )
    if seen_total == 0:
        raise ValueError("the evaluation loader yielded no samples")
    return {"loss": loss_total / seen_total, "acc": correct_total / seen_total,
            "n": int(seen_total)}


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


def _amp_and_criterion(device: torch.device, *, amp: bool, label_smoothing: float):
    """Mixed-precision dtype, gradient scaler and training loss for a run on ``device``."""
    amp_dtype = autocast_dtype_for(device) if amp else None
    # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    return amp_dtype, scaler, nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def _train_and_evaluate_epoch(model: nn.Module, train_loader, test_loader, optimizer, *, epoch: int,
                              train_sampler, scheduler, scaler, criterion, amp_dtype, device: torch.device,
                              show_progress: bool) -> dict:
    """One training epoch (0-based ``epoch``) then evaluation: the epoch's history record."""
    if train_sampler is not None:
        train_sampler.set_epoch(epoch)
    epoch_lr = optimizer.param_groups[0]["lr"]
    train = train_one_epoch(
        model, train_loader, optimizer, device=device, epoch=epoch + 1, scaler=scaler,
        scheduler=scheduler, criterion=criterion, amp_dtype=amp_dtype, show_progress=show_progress,
    )
    test = (evaluate(model, test_loader, device=device, amp_dtype=amp_dtype, show_progress=show_progress)
            if test_loader is not None else None)
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


def fit(
    model: nn.Module,
    train_loader,
    test_loader=None,
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    momentum: float = DEFAULT_MOMENTUM,
    train_sampler=None,
    label_smoothing: float = 0.0,
    amp: bool = True,
    show_progress: bool = True,
    log: logging.Logger | None = None,
    lr_scale: dict[str, float] | None = None,
    max_restarts: int = MAX_NONFINITE_RESTARTS,
) -> list[dict]:
    """Fine-tune ``model``: SGD with momentum, warm-up + cosine LR, evaluation each epoch.

    Only parameters with ``requires_grad=True`` are optimised, so freezing layers is
    done by the caller before calling ``fit`` (frozen parameters are not touched, not
    even by weight decay). The model may be wrapped in ``DistributedDataParallel`` by
    the caller; metrics are then global and only rank 0 logs.

    Parameters
    ----------
    model : nn.Module
        Model to train in place; moved to ``device``.
    train_loader : DataLoader
        Training batches; must have a length (the schedule is per batch).
    test_loader : DataLoader, optional
        Evaluated after every epoch when given.
    epochs : int
        Number of epochs, >= 1.
    lr : float
        Peak learning rate, > 0 (reached at the end of the warm-up).
    device : torch.device
        Where to train.
    weight_decay : float, default DEFAULT_WEIGHT_DECAY
        L2 penalty applied by SGD to all trainable parameters.
    momentum : float, default DEFAULT_MOMENTUM
        SGD momentum.
    train_sampler : sampler with ``set_epoch``, optional
        Typically a ``DistributedSampler``; ``set_epoch(epoch)`` (0-based) is called
        before each epoch so shuffling differs per epoch. When omitted and
        ``train_loader.sampler`` is a ``DistributedSampler``, that one is used.
    label_smoothing : float, default 0.0
        Label smoothing of the training cross-entropy (the test loss is unsmoothed).
    amp : bool, default True
        Use mixed precision where :func:`autocast_dtype_for` allows it (CUDA only).
    show_progress : bool, default True
        Show tqdm bars (main rank only).
    log : logging.Logger, optional
        Logger for the one-line-per-epoch summary; default this module's logger.
    lr_scale : dict of str to float, optional
        Learning-rate multipliers by parameter name (as in ``named_parameters()`` of
        the unwrapped model); parameters not named train at ``lr``.  Fine-tuning
        recipes give pretrained layers a smaller rate than freshly initialised ones.
    max_restarts : int, default MAX_NONFINITE_RESTARTS
        When the loss becomes non-finite, the epoch restarts from the weights,
        optimizer and schedule state it began with, every learning rate multiplied by
        :data:`NONFINITE_LR_FACTOR` (logged as a warning), at most this many times in
        the run; 0 stops at once.  The state is kept in memory (one copy of the
        weights and of the momentum buffers).

    Returns
    -------
    list of dict
        One dict per epoch with ``epoch`` (1-based), ``lr`` (learning rate of the
        first parameter group at the start of the epoch), ``train_loss``,
        ``train_acc``, ``test_loss``, ``test_acc`` (``None`` without a test loader),
        ``seconds`` (wall time of the epoch, evaluation included) and ``restarts``
        (non-finite restarts of this epoch).

    Raises
    ------
    ValueError
        If ``epochs < 1``, ``lr <= 0``, another option is out of range, the model has
        no trainable parameters or the training loader is empty (the option errors are
        :class:`errors.UserError`).
    NonFiniteLossError
        If training still diverges after ``max_restarts`` restarts.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not lr > 0 or not math.isfinite(lr):
        raise UserError(f"learning rate must be a finite number > 0, got {lr!r}")
    _check_sgd_options(weight_decay=weight_decay, momentum=momentum, label_smoothing=label_smoothing)
    log = logger if log is None else log

    params, steps_per_epoch, train_sampler = _training_setup(model, train_loader, train_sampler, device)
    if max_restarts < 0:
        raise UserError(f"max_restarts must be >= 0, got {max_restarts!r}")

    optimizer = torch.optim.SGD(_param_groups(model, params, lr, lr_scale), lr=lr, momentum=momentum,
                                weight_decay=weight_decay)
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        partial(warmup_cosine_factor, warmup_steps=int(WARMUP_FRACTION * total_steps),
                total_steps=total_steps),
    )
    amp_dtype, scaler, train_criterion = _amp_and_criterion(device, amp=amp, label_smoothing=label_smoothing)
    is_main = _is_main_process()

    history = []
    restarts_left = max_restarts
    rate_factor = 1.0  # every learning rate's multiplier after the restarts so far
    epoch = 0
    while epoch < epochs:
        start = time.perf_counter()
        saved = None  # free the previous epoch's copy before taking the next
        saved = _training_state(model, optimizer, scheduler, scaler) if restarts_left else None
        saved_factor = rate_factor
        restarts = 0
        while True:
            try:
                record = _train_and_evaluate_epoch(
                    model, train_loader, test_loader, optimizer, epoch=epoch, train_sampler=train_sampler,
                    scheduler=scheduler, scaler=scaler, criterion=train_criterion, amp_dtype=amp_dtype,
                    device=device, show_progress=show_progress)
                break
            except NonFiniteLossError as exc:
                if not restarts_left:
                    if max_restarts:
                        raise NonFiniteLossError(f"{exc} (already restarted {max_restarts} time(s), down to "
                                                 f"{rate_factor:g}x the learning rate)") from None
                    raise
                restarts_left -= 1
                restarts += 1
                # The saved state carries the rates of saved_factor; each restart lowers them further.
                rate_factor *= NONFINITE_LR_FACTOR
                _restore_training_state(saved, model, optimizer, scheduler, scaler)
                _scale_learning_rates(optimizer, scheduler, rate_factor / saved_factor)
                if is_main:
                    log.warning("%s: restarting epoch %d from its start at %gx the learning rate(s) (now %s)",
                                str(exc).split(";")[0], epoch + 1, rate_factor,
                                ", ".join(f"{lr_:.3g}" for lr_ in scheduler.base_lrs))
        record["seconds"] = time.perf_counter() - start
        record["restarts"] = restarts
        history.append(record)
        if is_main:
            log.info("epoch %d/%d  lr %.3g  train loss %.4f acc %.2f%%%s  (%.1f s)",
                     epoch + 1, epochs, record["lr"], record["train_loss"],
                     100 * record["train_acc"], _test_part(record), record["seconds"])
        epoch += 1
    return history


def _param_groups(model: nn.Module, params: list[nn.Parameter], lr: float,
                  lr_scale: dict[str, float] | None) -> list[dict]:
    """SGD parameter groups: one per distinct learning-rate multiplier of ``lr_scale``."""
    if not lr_scale:
        return [{"params": params}]
    names = {id(p): n for n, p in _unwrap(model).named_parameters()}
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


def _training_state(model: nn.Module, optimizer, scheduler, scaler) -> dict:
    """A copy of everything an epoch changes, to restart it from (on the tensors' own devices)."""
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "scheduler": copy.deepcopy(scheduler.state_dict()),
            "scaler": scaler.state_dict() if scaler is not None else None}


def _restore_training_state(saved: dict, model: nn.Module, optimizer, scheduler, scaler) -> None:
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))
    scheduler.load_state_dict(copy.deepcopy(saved["scheduler"]))
    if scaler is not None:
        scaler.load_state_dict(saved["scaler"])


def _scale_learning_rates(optimizer, scheduler, factor: float) -> None:
    """Multiply the schedule's peak rates and the current rates by ``factor``."""
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor


# ------------------------------------------------------------------- mask annealing

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
    (up to ``decay_steps``), then a cosine decay to :data:`FINAL_LR_FACTOR` over the
    remaining steps, in which the structure is already fixed: the network must
    still be able to learn when the last off-structure weights go, which a cosine
    decay over the whole run (as in :func:`fit`) would prevent.
    """
    if step < warmup_steps:
        return warmup_cosine_factor(step, warmup_steps=warmup_steps, total_steps=total_steps)
    if step < decay_steps:
        return 1.0
    return warmup_cosine_factor(step - decay_steps, warmup_steps=0,
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
    distinct entries, from :meth:`decompositions.DiagonalLinear.dense_mask`.
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


class _AnnealStepper:
    """Steps the learning-rate scheduler and the mask factor together.

    :func:`train_one_epoch` calls ``scheduler.step()`` once per optimiser step;
    passing this object as its ``scheduler`` moves the mask schedule in lockstep
    without a second training loop.
    """

    def __init__(self, lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
                 scales: list[_MaskedLinearForward], *, decay_steps: int, schedule: str) -> None:
        self.lr_scheduler, self.scales = lr_scheduler, scales
        self.decay_steps, self.schedule = decay_steps, schedule
        self.steps = 0
        self.factor = 1.0

    def step(self) -> None:
        self.lr_scheduler.step()
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
        structure = decompositions.DiagonalLinear(
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
    the result equals :func:`decompositions.diagonal_decompose_linear`'s projection,
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
    net = _unwrap(model)
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
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    momentum: float = DEFAULT_MOMENTUM,
    train_sampler=None,
    label_smoothing: float = 0.0,
    amp: bool = True,
    show_progress: bool = True,
    log: logging.Logger | None = None,
) -> dict:
    """Fine-tune ``model`` while the named Linear layers' weights are moved onto the
    wrapped banded-diagonal structure of :class:`decompositions.DiagonalLinear`.

    A mask schedule in the spirit of gradual magnitude pruning [1]_, with the mask
    fixed by the structure instead of by magnitudes: every weight entry of the named
    layers that lies off the structure is multiplied by a factor ``f`` that falls
    from 1 to 0 (:func:`mask_factor`, updated after every optimiser step), while the
    whole model trains as in :func:`fit` (SGD with momentum, a per-step learning-rate
    schedule, mixed precision on CUDA, DDP-aware). The rest of the network
    thus learns to do without the off-structure weights while they fade, instead of
    losing them at once as :func:`decompositions.diagonal_decompose_linear` does on
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
    weight_decay, momentum, train_sampler, label_smoothing, amp, show_progress, log
        As in :func:`fit`.

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
    _check_sgd_options(weight_decay=weight_decay, momentum=momentum, label_smoothing=label_smoothing)
    net = _unwrap(model)
    names = _check_anneal_layers(net, layers)
    log = logger if log is None else log

    params, steps_per_epoch, train_sampler = _training_setup(model, train_loader, train_sampler, device)

    total_steps = epochs * steps_per_epoch
    decay_steps = max(1, round((1.0 - hold_fraction) * total_steps))
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        partial(anneal_lr_factor, warmup_steps=int(WARMUP_FRACTION * total_steps),
                decay_steps=decay_steps, total_steps=total_steps),
    )
    amp_dtype, scaler, train_criterion = _amp_and_criterion(device, amp=amp, label_smoothing=label_smoothing)
    is_main = _is_main_process()

    linears = {name: net.get_submodule(name) for name in names}
    bandwidths, scales = _structure_masks(linears, bandwidth, rescale=rescale)
    initial_off = {name: scales[name].off_mass(1.0) for name in names}
    stepper = _AnnealStepper(lr_scheduler, list(scales.values()), decay_steps=decay_steps,
                             schedule=schedule)

    history: list[dict] = []
    raw_off: dict[str, float] = {}
    finished = False
    try:
        for name, layer in linears.items():
            layer.forward = scales[name]
        for epoch in range(epochs):
            start = time.perf_counter()
            record = _train_and_evaluate_epoch(
                model, train_loader, test_loader, optimizer, epoch=epoch, train_sampler=train_sampler,
                scheduler=stepper, scaler=scaler, criterion=train_criterion, amp_dtype=amp_dtype,
                device=device, show_progress=show_progress)
            off = {name: scales[name].off_mass(stepper.factor) for name in names}
            record.update(factor=stepper.factor, off_mass=off, seconds=time.perf_counter() - start)
            history.append(record)
            if is_main:
                log.info("anneal %d/%d  lr %.3g  factor %.3f  train loss %.4f acc %.2f%%%s  "
                         "off-structure mass %s  (%.1f s)", epoch + 1, epochs, record["lr"],
                         stepper.factor, record["train_loss"], 100 * record["train_acc"],
                         _test_part(record), ", ".join(f"{n} {v:.2%}" for n, v in off.items()),
                         record["seconds"])
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


# -------------------------------------------------------------------------- latency


def measure_latency(model: nn.Module, example: torch.Tensor, *, warmup: int = 3,
                    repeats: int = 10) -> dict:
    """Wall-clock time of ``model(example)`` in milliseconds.

    The model is put in eval mode (restored afterwards) and called under
    ``torch.inference_mode()``; ``example`` must already be on the model's device.
    On CUDA/MPS the device is synchronised around each call so the time covers the
    kernels, not just their launch. This only measures; it judges nothing.

    Parameters
    ----------
    model : nn.Module
        The model to time.
    example : torch.Tensor
        One input batch, e.g. of shape (B, 3, 224, 224).
    warmup : int, default 3
        Untimed calls first (allocator, cuDNN autotuning, lazy initialisation).
    repeats : int, default 10
        Timed calls, >= 1.

    Returns
    -------
    dict
        ``median_ms``, ``min_ms``, ``mean_ms`` and ``times_ms`` (the ``repeats`` times).

    Raises
    ------
    ValueError
        If ``warmup < 0`` or ``repeats < 1``.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    device = example.device
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    times_ms = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                net(example)
            for _ in range(repeats):
                _synchronize(device)
                start = time.perf_counter()
                net(example)
                _synchronize(device)
                times_ms.append((time.perf_counter() - start) * 1e3)
    finally:
        net.train(was_training)
    return {
        "median_ms": statistics.median(times_ms),
        "min_ms": min(times_ms),
        "mean_ms": statistics.fmean(times_ms),
        "times_ms": times_ms,
    }
