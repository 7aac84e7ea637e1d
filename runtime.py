"""Processes and devices: device choice, torchrun set-up, collectives, seeding, unwrapping.

The one module that knows about processes and devices; the engine (finetune.py), the
inference paths and the command line ask it instead of repeating the checks.

Collectives follow one rule: a function that may run on rank 0 alone never reduces
across ranks. Reductions take the process group explicitly (``group=None`` means this
process only), and :func:`on_main` runs a piece of work on rank 0 alone while the other
ranks wait for its outcome, so that a failure there stops every rank with one line
instead of leaving them blocked in a collective.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from errors import UserError

logger = logging.getLogger(__name__)

#: Device names accepted by :func:`resolve_device` (``cuda:N`` selects GPU number N).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_CUDA_INDEX_RE = re.compile(r"cuda:(\d+)")

#: Environment variables set by ``torchrun`` for each worker.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

#: How long the other ranks wait for work that rank 0 does alone (decomposition with
#: FC annealing, evaluation, export).  The default process group keeps PyTorch's
#: timeout, which bounds training collectives; this wait may legitimately take hours on
#: a CPU, so it runs on a second (gloo) group of its own.
MAIN_ONLY_TIMEOUT = datetime.timedelta(days=7)

T = TypeVar("T")


class PeerFailed(UserError):
    """Rank 0 failed in work it did alone; the other ranks stop with this one line."""


#: How long a training collective waits for the other ranks by default (``--dist_timeout``):
#: a rank that died or hangs stops the others after this, instead of gloo's 30 minutes.
DEFAULT_COLLECTIVE_TIMEOUT_S = 300

#: Pieces of the errors gloo and NCCL raise when another rank died or cannot be reached.
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
              "Timed out", "timed out", "NCCL communicator was aborted", "remote process exited")


def peer_failure(exc: BaseException) -> str | None:
    """One line for an error that means another rank stopped (killed, crashed, unreachable), or None."""
    if not _torchrun_world_size() > 1:  # a single process has no peers: its errors keep their tracebacks
        return None
    distributed_error = getattr(dist, "DistError", ())
    text = str(exc).strip()
    if not (isinstance(exc, distributed_error) or isinstance(exc, RuntimeError)
            and any(piece in text for piece in _PEER_GONE)):
        return None
    detail = next((piece for piece in _PEER_GONE if piece in text), type(exc).__name__)
    return f"another rank stopped or cannot be reached ({detail}); this rank stops too"


def _torchrun_env() -> tuple[int, int, int] | None:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` from torchrun's environment; None when any is unset.

    Raises
    ------
    errors.UserError
        When they are not integers.
    """
    if not all(var in os.environ for var in _TORCHRUN_VARS):
        return None
    try:
        rank, world_size, local_rank = (int(os.environ[var]) for var in _TORCHRUN_VARS)
    except ValueError:
        values = ", ".join(f"{var}={os.environ[var]!r}" for var in _TORCHRUN_VARS)
        raise UserError(f"torchrun variables must be integers, got {values}") from None
    return rank, world_size, local_rank


def _torchrun_world_size() -> int:
    try:
        env = _torchrun_env()
    except UserError:
        return 1
    return 1 if env is None else env[1]


def check_ranks_agree(dist_info: DistInfo, facts: dict, what: str) -> None:
    """UserError on every rank, before any training collective, when the ranks' ``facts``
    (e.g. their data's sizes and classes) differ: with different data they would wait in a
    collective for a batch the other never sends."""
    if not dist_info.enabled:
        return
    gathered: list = [None] * dist_info.world_size
    dist.all_gather_object(gathered, facts)
    first = gathered[0]
    for rank, other in enumerate(gathered):
        if other != first:
            differ = [k for k in first if first.get(k) != other.get(k)]
            detail = "; ".join(f"{k} {str(first.get(k))[:60]} on rank 0, {str(other.get(k))[:60]} on rank {rank}"
                               for k in differ[:3])
            raise UserError(f"the ranks' {what} differ ({detail}); every rank must see the same files")

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


def cpu_bf16_supported() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX): elsewhere autocast to
    bfloat16 emulates it, slower than float32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, present in torch >= 2.1
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype_for(device: torch.device, *, cpu_bf16: bool = False) -> torch.dtype | None:
    """The mixed-precision dtype to use on ``device``, or ``None`` for full precision.

    bfloat16 on CUDA GPUs that support it (no loss scaling needed), float16 on older
    CUDA GPUs (pair it with a :class:`torch.amp.GradScaler`); on a CPU bfloat16 when
    ``cpu_bf16`` and the CPU has it natively (:func:`cpu_bf16_supported`); ``None`` otherwise
    (and on MPS).
    """
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16 and cpu_bf16_supported() else None
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16



def synchronize(device: torch.device) -> None:
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
    #: The gloo group the other ranks wait on while rank 0 works alone (see on_main).
    wait_group: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        """True on the process that should log, show progress and write files."""
        return self.rank == 0

    @property
    def group(self):
        """The process group reductions must use: all ranks, or ``None`` (this process) when not distributed."""
        return dist.group.WORLD if self.enabled else None


LOCAL = DistInfo(enabled=False, rank=0, world_size=1, local_rank=0)


def init_distributed(device: torch.device, *,
                     timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> tuple[DistInfo, torch.device]:
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
    timeout_s : float
        How long a collective of the default group waits for the other ranks.

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
    env = _torchrun_env()
    if env is None:
        return LOCAL, device
    rank, world_size, local_rank = env
    if world_size <= 1:
        return LOCAL, device
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
            timeout=datetime.timedelta(seconds=timeout_s),
            # Binding NCCL to this rank's GPU up front avoids guessing (and a warning).
            device_id=device if backend == "nccl" else None,
        )
    # Every rank creates the wait group, in the same order (new_group is itself collective).
    wait_group = dist.new_group(backend="gloo", timeout=MAIN_ONLY_TIMEOUT)
    logger.info("distributed: rank %d/%d (local %d), backend %s, device %s",
                rank, world_size, local_rank, backend, device)
    return DistInfo(enabled=True, rank=rank, world_size=world_size, local_rank=local_rank,
                    wait_group=wait_group), device


def cleanup_distributed() -> None:
    """Destroy the default process group if one was initialised (safe to call always)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Whether this process should show progress and log (rank 0, or not distributed).

    For output only: it never decides whether to take part in a collective.
    """
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_sum(values: list[float], device: torch.device, group=None) -> list[float]:
    """Sum a few numbers over the ranks of ``group``; ``group=None`` returns them unchanged.

    float64 keeps sample counts and loss sums exact enough; the tensor lives on
    ``device`` because NCCL only reduces GPU tensors.
    """
    if group is None:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor.tolist()


def all_true(flag: bool, device: torch.device, group=None) -> bool:
    """Whether ``flag`` holds on every rank of ``group`` (``None``: this process's flag)."""
    if group is None:
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group)
    return bool(tensor.item())


def on_main(dist_info: DistInfo, work: Callable[[], T]) -> T | None:
    """Run ``work()`` on rank 0 alone; every rank returns once it is done.

    ``work`` must not reduce across ranks (call the engine with ``group=None``).  The
    other ranks wait on ``dist_info.wait_group`` for rank 0's outcome: if ``work``
    raised, rank 0 re-raises it and the others raise :class:`PeerFailed`, so no rank
    is left blocked in a later collective.  Not distributed: just ``work()``.

    Returns
    -------
    What ``work`` returned on rank 0; ``None`` on the other ranks.
    """
    if not dist_info.enabled:
        return work()
    result, failure = None, None
    if dist_info.is_main:
        try:
            result = work()
        except BaseException as exc:  # noqa: BLE001 -- re-raised below, after telling the others
            failure = exc
    status = torch.tensor([0 if failure is None else 1], dtype=torch.int32)
    dist.broadcast(status, src=0, group=dist_info.wait_group)
    if failure is not None:
        raise failure
    if status.item():
        raise PeerFailed(f"rank 0 stopped (its message says why); rank {dist_info.rank} stops too")
    return result


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel / DataParallel and ``torch.compile`` wrappers.

    Only those wrappers are unwrapped: a model of any other class that happens to have a
    child named ``module`` is returned as it is.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


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


def rng_state() -> dict:
    """Every random generator's state, as data ``torch.load(weights_only=True)`` reads back.

    Python's, NumPy's (as a tensor; an ndarray is not weights-only loadable), PyTorch's CPU
    generator and every initialised CUDA device's.
    """
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "keys": list(keys), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["keys"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
