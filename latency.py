"""Measured latency of layers and models on the backend that will run them: the cost of
``--target_latency``.

MACs are a proxy for speed, and a poor one for low-rank layers: thin convs run far below the
machine's peak, and onnxruntime's blocked CPU kernels count channels in blocks of 16
(benchmarks/RESULTS.md, "Inference").  A latency budget therefore allocates ranks on
*measured* times: every layer's replacement is timed at a grid of ranks on the backend that
will run the model, as a lookup table in the manner of NetAdapt [1]_, and the times in
between are interpolated.  Measurements are cached in a JSON file keyed by the machine, the
library versions, the backend, the thread count and the batch, so a second plan on the same
machine measures nothing.  A table built with ``quantize="int8"`` times everything as
``--quantize int8`` deploys it (onnxruntime's QDQ model on the CPU), under its own keys.

References
----------
.. [1] T.-J. Yang et al., "NetAdapt: Platform-Aware Neural Network Adaptation for Mobile
   Applications", ECCV 2018 (per-layer latency lookup tables measured on the target platform).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import inference
import report

__all__ = ["LatencyTable", "TimingError", "cache_problem", "rank_grid", "resolve_backend", "default_cache_path",
           "signature", "GRID_START", "QUANTIZE"]

logger = logging.getLogger(__name__)

#: Ranks are measured at 1, at GRID_START * 2^i below the full rank, and at the full rank:
#: with onnxruntime's channel blocks of 16 every grid point but 1 is a whole number of blocks.
GRID_START = 16
#: Untimed and timed calls of one layer; the median of the timed ones is kept.
LAYER_WARMUP, LAYER_REPEATS = 2, 5
#: Untimed and timed calls of a whole model (the budget's reference and its check).
MODEL_WARMUP, MODEL_REPEATS = 2, 7
#: How a table times what it measures: as exported (float32), or quantized to int8 the way
#: ``--quantize int8`` does it (onnxruntime QDQ, :func:`inference.quantize_int8`).
QUANTIZE = ("none", "int8")
CACHE_VERSION = 1


class TimingError(RuntimeError):
    """A module could not be prepared or run on the table's backend (the message says which and why)."""


def _read_cache(path: Path) -> dict[str, dict[str, float]]:
    """The tables of a cache file; ValueError/OSError when it is not one.  Entries that are not
    finite positive times are dropped (a hand-edited or damaged file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:  # JSON nested deeper than Python's parser goes
        raise ValueError("not a latency cache (nested too deeply)") from None
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("tables"), dict):
        raise ValueError(f"not a version-{CACHE_VERSION} latency cache")
    tables = {}
    for key, table in data["tables"].items():
        if not isinstance(table, dict):
            raise ValueError(f"table {str(key)[:40]!r} is not an object")
        times = {str(s): _positive_time(v) for s, v in table.items()}
        tables[str(key)] = {s: v for s, v in times.items() if v is not None}
    return tables


def _positive_time(value) -> float | None:
    """A cached time as a float, or None when it is not a finite positive number (an integer
    too large for a float included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def cache_problem(path: str | os.PathLike) -> str | None:
    """Why an existing file is not a latency cache this tool wrote (None when it is one)."""
    try:
        _read_cache(Path(path))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


def rank_grid(full: int) -> list[int]:
    """The ranks a layer is measured at: 1, 16, 32, 64, ... below ``full``, and ``full``."""
    if full < 1:
        raise ValueError(f"full rank must be >= 1, got {full!r}")
    points, rank = {1, full}, GRID_START
    while rank < full:
        points.add(rank)
        rank *= 2
    return sorted(points)


def resolve_backend(backend: str, device: torch.device) -> str:
    """A concrete backend for timing: ``"auto"`` becomes the first available one of
    :data:`inference.AUTO_ORDER` for the device (onnxruntime on CPU when installed)."""
    if backend != "auto":
        if backend not in inference.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {('auto', *inference.BACKENDS)}")
        return backend
    available = inference.available_backends()
    order = inference.AUTO_ORDER.get(device.type, inference.AUTO_ORDER_OTHER)
    return next(b for b in order if b in available)


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/lowrank-cnn/latency.json`` (``~/.cache`` when unset), as pip and torch hub do."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lowrank-cnn" / "latency.json"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine_key(backend: str, device: torch.device, batch: int, rank_multiple: int | None, quantize: str) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{_cpu_name()} x{os.cpu_count()}, {torch.get_num_threads()} threads"
    versions = f"torch {torch.__version__}"
    if backend == "onnx":
        versions += f", onnxruntime {inference._import_onnxruntime().__version__}"
    key = f"{where} | {versions} | {backend} on {device.type} | batch {batch} | blocks {rank_multiple}"
    return key if quantize == "none" else f"{key} | {quantize}"  # float32 keys as before: old caches stay valid


def signature(module: nn.Module, in_shape: Sequence[int]) -> str:
    """A cache key that fixes the module's cost: its type, geometry and input shape (no weights)."""
    shape = "x".join(str(int(s)) for s in in_shape)
    if isinstance(module, nn.Conv2d):
        m = module
        geometry = (f"{m.in_channels}>{m.out_channels} k{tuple(m.kernel_size)} s{tuple(m.stride)} p{m.padding} "
                    f"d{tuple(m.dilation)} g{m.groups} {m.padding_mode} bias={m.bias is not None}")
        return f"Conv2d {geometry} @ {shape}"
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}>{module.out_features} bias={module.bias is not None} @ {shape}"
    # Anything else (a DiagonalLinear, a whole decomposed block): its repr carries its geometry.
    return f"{type(module).__name__} {module!r} @ {shape}"


class LatencyTable:
    """Median latencies of modules on one backend, device and batch size, cached on disk.

    Parameters
    ----------
    backend : str, default "auto"
        One of :data:`inference.BACKENDS` or ``"auto"`` (:func:`resolve_backend`): what
        ``--eval`` will run the model with.
    device : torch.device, optional
        Where the modules run (default CPU).
    batch : int, default 8
        The batch every measurement uses (``--latency_batch``).
    cache_path : path, optional
        The JSON cache (default :func:`default_cache_path`); ``False`` for none.
    warmup, repeats : int
        Untimed and timed calls of each layer.
    quantize : {"none", "int8"}
        ``"int8"``: every layer and planned model is timed as ``--quantize int8`` runs it
        (onnxruntime's static QDQ quantization of the exported model; the onnx backend on the
        CPU only), so that a latency budget plans for the int8 model.  Its reference stays
        the float32 original (``model_runner(..., float32=True)``): the request is "R times
        faster than the model the user has today".

    Attributes
    ----------
    measured : int
        Layers timed by this instance (not found in the cache).
    site_models : dict
        The planner's per-layer models built from this table (kept for later plans).
    report : dict
        Filled by :func:`ranks.plan_decomposition` under a latency budget: what was asked
        and what the planned model measured.
    """

    def __init__(self, *, backend: str = "auto", device: torch.device | str | None = None, batch: int = 8,
                 cache_path: str | os.PathLike | bool | None = None, warmup: int = LAYER_WARMUP,
                 repeats: int = LAYER_REPEATS, quantize: str = "none") -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch!r}")
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        inference._check_counts(warmup, repeats)
        self.device = torch.device(device if device is not None else "cpu")
        self.backend = resolve_backend(backend, self.device)
        if quantize == "int8" and (self.backend != "onnx" or self.device.type != "cpu"):
            raise ValueError(f"int8 timing runs onnxruntime's quantized model on the CPU: it needs the onnx backend "
                             f"on cpu, not {self.backend} on {self.device.type}")
        self.quantize = quantize
        # What --eval and --export run: onnxruntime pads Tucker-2 / CP ranks to channel blocks.
        self.rank_multiple = inference.ONNX_RANK_MULTIPLE if self.backend == "onnx" else None
        self.batch, self.warmup, self.repeats = int(batch), int(warmup), int(repeats)
        self.key = _machine_key(self.backend, self.device, self.batch, self.rank_multiple, quantize)
        self.cache_path = None if cache_path is False else Path(cache_path or default_cache_path())
        self.measured = 0
        self.report: dict = {}
        # ranks.py's per-layer time models (grids of measured ranks), by layer signature.
        self.site_models: dict = {}
        self._foreign = False
        self._tables: dict[str, dict[str, float]] = self._load()
        self._times = self._tables.setdefault(self.key, {})

    # ------------------------------------------------------------------ cache
    def _load(self) -> dict[str, dict[str, float]]:
        if self.cache_path is None or not self.cache_path.is_file():
            return {}
        try:
            return _read_cache(self.cache_path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            # Not overwritten later (save() refuses): the CLI checks this before it starts.
            warnings.warn(f"latency cache {self.cache_path} unreadable ({exc}); measuring afresh", stacklevel=3)
            self._foreign = True
            return {}

    def save(self) -> None:
        """Write the cache atomically, merged with what the file holds now (another run may have
        added to it meanwhile).  Nothing when it has no path, nothing new, or the file is not a
        latency cache (it is never replaced)."""
        if self.cache_path is None or not self.measured or self._foreign:
            return
        try:
            tables = _read_cache(self.cache_path) if self.cache_path.is_file() else {}
        except (OSError, ValueError, UnicodeDecodeError):
            return  # became something else meanwhile: leave it alone
        for key, times in self._tables.items():
            tables.setdefault(key, {}).update(times)
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            report.write_json(str(self.cache_path), {"version": CACHE_VERSION, "tables": tables})
        except OSError as exc:  # a cache is a convenience: the plan stands without it
            warnings.warn(f"latency cache {self.cache_path} not written ({exc})", stacklevel=2)

    # ------------------------------------------------------------ measuring
    def _predictor(self, module: nn.Module, example: torch.Tensor, *, rank_multiple: int | None, float32: bool = False):
        try:
            if self.quantize == "int8" and not float32:
                # The example batch calibrates the activation ranges: they set the scales, not the time.
                _, int8 = inference.onnx_float_and_int8(module, example, [example], rank_multiple=rank_multiple)
                return inference.onnx_runner(int8)
            return inference.prepare(module, example, backend=self.backend, check=False, rank_multiple=rank_multiple)
        except Exception as exc:  # noqa: BLE001 - export/session/backend failures: one line for the caller
            raise TimingError(f"preparing {type(module).__name__} for {self.describe()} failed: "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from exc

    def _run_times(self, calls: dict, *, warmup: int, repeats: int) -> dict:
        try:
            return inference.time_interleaved(calls, warmup=warmup, repeats=repeats, devices=[self.device])
        except Exception as exc:  # noqa: BLE001
            raise TimingError(f"running on {self.describe()} failed: {type(exc).__name__}: {str(exc)[:200]}") from exc

    def _time(self, module: nn.Module, example: torch.Tensor, *, rank_multiple: int | None, warmup: int,
              repeats: int) -> float:
        predictor = self._predictor(module, example, rank_multiple=rank_multiple)
        return statistics.median(self._run_times({0: lambda: predictor(example)}, warmup=warmup, repeats=repeats)[0])

    def ms(self, module: nn.Module, in_shape: Sequence[int]) -> float:
        """Median milliseconds of one call of ``module`` on a batch of ``in_shape`` inputs (no batch dim).

        The module is timed as it is (no rank padding): callers pass the structure that
        will run.  Looked up in the cache first.
        """
        key = signature(module, in_shape)
        if key not in self._times:
            example = torch.randn(self.batch, *in_shape, device=self.device)
            module = self._on_device(module)
            self._times[key] = self._time(module, example, rank_multiple=None, warmup=self.warmup,
                                          repeats=self.repeats)
            self.measured += 1
        return self._times[key]

    def _on_device(self, module: nn.Module) -> nn.Module:
        """``module``, or a copy of it on the table's device (the caller's layer is never moved)."""
        if any(p.device != self.device for p in module.parameters()):
            return copy.deepcopy(module).to(self.device)
        return module

    def _model_example(self, model: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
        param = next(model.parameters())
        return torch.randn(self.batch, *input_size, device=param.device, dtype=param.dtype)

    def model_ms(self, model: nn.Module, input_size: Sequence[int]) -> float:
        """Median milliseconds of ``model`` on one batch, prepared as ``--eval`` prepares it (not cached)."""
        return self.compare_ms(self.model_runner(model, input_size))[0]

    def model_runner(self, model: nn.Module, input_size: Sequence[int], *, float32: bool = False):
        """A zero-argument call running ``model`` on one batch as ``--eval`` runs it, for :meth:`compare_ms`
        (in int8 when the table quantizes, unless ``float32``: a latency budget's reference), on the
        table's device (int8: the CPU, wherever the model was trained)."""
        model = self._on_device(model)
        example = self._model_example(model, input_size)
        predictor = self._predictor(model, example, rank_multiple=self.rank_multiple, float32=float32)
        return lambda: predictor(example)

    def compare_ms(self, *runs) -> tuple[float, ...]:
        """Median milliseconds of :meth:`model_runner` calls timed in interleaved rounds, so that a
        drift of a shared machine hits them alike (a planned model against its original); one
        call is timed alone."""
        times = self._run_times(dict(enumerate(runs)), warmup=MODEL_WARMUP, repeats=max(self.repeats, MODEL_REPEATS))
        return tuple(statistics.median(times[i]) for i in range(len(runs)))

    def describe(self) -> str:
        int8 = " int8" if self.quantize == "int8" else ""
        return f"{self.backend}{int8} on {self.device}, batch {self.batch}"
