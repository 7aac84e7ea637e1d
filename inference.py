"""Inference backends that turn the MAC savings of a decomposed model into wall-clock speed.

A decomposed layer is a chain of small convolutions (:class:`decompositions.TuckerConv2d`,
:class:`decompositions.CPConv2d`) or Linear layers.  In plain eager PyTorch on a CPU
each small convolution pays a fixed overhead (a layout reorder between PyTorch's NCHW
tensors and oneDNN's blocked format, operator dispatch, a fresh output allocation), so
a model with far fewer MACs runs only a little faster (benchmarks/RESULTS.md).  The backends here remove that
overhead while computing the same function:

``"eager"``
    The model as it is, in eval mode under :func:`torch.inference_mode`.
``"channels_last"``
    Weights and inputs in NHWC (``torch.channels_last``): oneDNN (CPU) and cuDNN
    (CUDA) run NHWC convolutions without reordering between layers.
``"torchscript"``
    ``channels_last`` + ``torch.jit.trace`` + ``torch.jit.freeze`` (weights become
    constants; conv/bias/ReLU folding) + ``torch.jit.optimize_for_inference``
    (on CPU: oneDNN weight prepacking).  TorchScript is deprecated upstream but still
    works in torch 2.14; its FutureWarnings are silenced here.
``"onnx"``
    Export to ONNX (:func:`export_onnx`'s exporter) and run with onnxruntime, using as
    many threads as torch does.  Needs the optional ``onnxruntime`` package.

``torch.compile`` is not offered: compiling (inductor generates and builds C++) takes
longer than a command-line run or the test-suite can afford on a small CPU machine, and
every new batch size can trigger a recompile.

:func:`prepare` builds a :class:`Predictor` for one backend (``"auto"`` picks the
fastest reliable one for the device, see :data:`AUTO_ORDER`); :func:`time_interleaved`
is the one timer (the command line, the benchmarks and ``--eval`` use it: interleaved
rounds, devices synchronized around each call); :func:`export_onnx` writes a verified
ONNX file.  Measured speeds of each backend are in ``benchmarks/RESULTS.md``
(``python benchmarks/bench_inference.py``).

The ONNX backend zero-pads the Tucker/CP ranks to whole channel blocks
(:func:`pad_ranks`): same outputs, and the blocked kernels it keeps are what brings
the measured speedup close to the MAC ratio (benchmarks/RESULTS.md).

The TorchScript and ONNX backends replace an ``nn.AdaptiveAvgPool2d`` whose output
size does not divide its input (VGG's 7x7 pool at any size but 224 px) by two
equivalent matrix products (:class:`_MatrixAdaptiveAvgPool2d`): neither the exporter
nor TorchScript's oneDNN path accepts it.  Both are then fixed to the example's
image size.

ONNX and :class:`decompositions.DiagonalLinear`: its forward accumulates products into
outputs with ``index_add_``, which the TorchScript-based exporter turns into an ONNX
``ScatterElements`` *without* a reduction, silently wrong whenever two diagonal
positions share an output (``in_features > out_features``).  For export the layer is
swapped, in a private copy of the model, for :class:`_ScatterAddDiagonalLinear`, whose
``scatter_add`` exports as ``ScatterElements(reduction="add")`` (ONNX opset >= 16).

References
----------
.. [1] PyTorch tutorial, "(beta) Channels Last Memory Format in PyTorch",
       https://pytorch.org/tutorials/intermediate/memory_format_tutorial.html
.. [2] ``torch.jit.optimize_for_inference``,
       https://pytorch.org/docs/stable/generated/torch.jit.optimize_for_inference.html
.. [3] ONNX operator ScatterElements (``reduction`` attribute since opset 16),
       https://onnx.ai/onnx/operators/onnx__ScatterElements.html
.. [4] onnxruntime graph optimizations,
       https://onnxruntime.ai/docs/performance/model-optimizations/graph-optimizations.html
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from types import ModuleType

import torch
from torch import nn
from tqdm import tqdm

import runtime
from atomic import atomic_open
from decompositions import CPConv2d, DiagonalLinear, SVDConv2d, TuckerConv2d

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "AUTO_ORDER", "ONNX_RANK_MULTIPLE", "Int8AgreementError", "Predictor", "available_backends",
           "prepare", "export_onnx", "time_interleaved", "pad_ranks", "OutputMismatchError"]

#: Backends that :func:`prepare` accepts (plus ``"auto"``).
BACKENDS = ("eager", "channels_last", "torchscript", "onnx", "amp")
#: Candidates ``"auto"`` tries per device type, fastest first; the first one that builds
#: and reproduces the eager output on the example is used.  The CPU order follows the
#: VGG16 measurement in the module docstring: onnxruntime was fastest for both the
#: original and the decomposed model, then TorchScript, then channels_last.  On
#: CUDA, cuDNN with NHWC tensors is the standard fast path [1]_; TorchScript freezing
#: is not measured there, so it is not the default.
AUTO_ORDER = {
    "cpu": ("onnx", "torchscript", "channels_last", "eager"),
    "cuda": ("amp", "channels_last", "eager"),
}
#: Fallback order for other device types (MPS, XPU, ...).
AUTO_ORDER_OTHER = ("eager",)

#: Largest accepted ``max|y - y_eager| / max|y_eager|`` of a prepared backend on the
#: example (float32; the backends reorder sums, they do not lower precision).
OUTPUT_RTOL = 1e-4
#: The same check for the "amp" backend (float16/bfloat16 autocast): half precision keeps about
#: three significant digits per layer, so a deep network's logits move by a few percent.
AMP_OUTPUT_RTOL = 5e-2
#: Guards the relative difference against an all-zero reference output.
_TINY = 1e-12
#: Oldest ONNX opset accepted: ``ScatterElements`` has ``reduction="add"`` from 16 on [3]_.
ONNX_MIN_OPSET = 16
#: Names of the ONNX graph's input and output; dimension 0 of both is dynamic.
ONNX_INPUT_NAME = "input"
ONNX_OUTPUT_NAME = "logits"
ONNX_BATCH_DIM = "batch"
#: Inner ranks of Tucker-2 / CP layers are zero-padded to a multiple of this before an
#: ONNX export (see :func:`pad_ranks`): onnxruntime's blocked CPU convolutions use
#: 16-channel blocks with AVX-512 and 8-channel ones with AVX2; 16 serves both.
ONNX_RANK_MULTIPLE = 16

# Deprecation messages of torch.jit.* and of the TorchScript-based ONNX exporter: the
# calls are deliberate (see the module docstring), so they are silenced locally.
_DEPRECATION_PATTERNS = (
    r".*torch\.jit\..*deprecated.*",
    r".*legacy TorchScript-based ONNX export.*",
)


class OutputMismatchError(RuntimeError):
    """A backend's (or an exported model's) output differs from the eager model's."""


class Int8AgreementError(OutputMismatchError):
    """The float32 export matched; its int8 quantization picks other classes too often."""


# ---------------------------------------------------------------------------- helpers
def _model_device(model: nn.Module, example: torch.Tensor) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return example.device


def _frozen_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """An eval-mode, grad-free deep copy: the caller's model is never modified."""
    model = copy.deepcopy(runtime.unwrap(model)).to(device).eval()
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def _quiet_deprecations():
    with warnings.catch_warnings():
        for pattern in _DEPRECATION_PATTERNS:
            warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
            warnings.filterwarnings("ignore", message=pattern, category=DeprecationWarning)
        # Internal deprecations inside the TorchScript-based exporter itself.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\..*")
        yield


def _relative_diff(output: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """``(max |out - ref|, max |out - ref| / max |ref|)`` computed in float64 on the CPU."""
    output = output.detach().to("cpu", torch.float64)
    reference = reference.detach().to("cpu", torch.float64)
    if output.shape != reference.shape:
        raise OutputMismatchError(f"output shape {tuple(output.shape)} != eager shape {tuple(reference.shape)}")
    # NaN compares false with any tolerance: without these, a NaN output would pass every check.
    if not bool(torch.isfinite(reference).all()):
        raise OutputMismatchError("the model's own (eager) outputs are not finite on the example: a weight holds "
                                  "NaN or infinity, or the activations overflow")
    if not bool(torch.isfinite(output).all()):
        return math.inf, math.inf
    max_abs = float((output - reference).abs().max()) if reference.numel() else 0.0
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    return max_abs, max_abs / max(scale, _TINY)


def _import_onnxruntime() -> ModuleType:
    """onnxruntime, or an ImportError that says how to get it."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise ImportError(
            "the 'onnx' backend needs onnxruntime, which is not importable "
            f"({exc}); install it with `pip install onnxruntime` (or onnxruntime-gpu), "
            f"or use one of {tuple(b for b in BACKENDS if b != 'onnx')}"
        ) from exc


def available_backends() -> tuple[str, ...]:
    """The members of :data:`BACKENDS` usable in this environment (``"onnx"`` needs onnxruntime)."""
    try:
        _import_onnxruntime()
    except ImportError:
        return tuple(b for b in BACKENDS if b != "onnx")
    return BACKENDS


def _check_backend(backend: str, *, allow_auto: bool) -> None:
    allowed = (*BACKENDS, "auto") if allow_auto else BACKENDS
    if backend not in allowed:
        raise ValueError(f"unknown backend {backend!r}; choose one of {allowed}")


# ------------------------------------------------------------------------------ ONNX
class _ScatterAddDiagonalLinear(nn.Module):
    """:class:`decompositions.DiagonalLinear` with an ONNX-exportable forward.

    Shares the wrapped layer's parameters and index buffers and computes the same
    function; only ``out.index_add_(1, rows, products)`` becomes
    ``out.scatter_add(1, rows.expand_as(products), products)``.  The TorchScript-based
    exporter maps ``index_add_`` to ``ScatterElements`` without a reduction (the last
    write wins, so outputs fed by several diagonal positions are wrong), whereas
    ``scatter_add`` becomes ``ScatterElements(reduction="add")`` from opset 16 on.
    """

    def __init__(self, layer: DiagonalLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight, self.bias = layer.weight, layer.bias
        self.register_buffer("rows", layer.rows, persistent=False)
        self.register_buffer("cols", layer.cols, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        # (B, L, b) gathered inputs times (L, b) weights, summed over the band -> (B, L).
        products = (x[:, self.cols] * self.weight).sum(-1)
        # out[:, rows[p]] += products[:, p] for every diagonal position p -> (B, N).
        out = x.new_zeros(x.shape[0], self.out_features)
        out = out.scatter_add(1, self.rows.expand_as(products), products)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)


class _MatrixAdaptiveAvgPool2d(nn.Module):
    """:class:`nn.AdaptiveAvgPool2d` for one fixed input size, as two small matrix products.

    The TorchScript-based ONNX exporter only exports adaptive average pooling when
    the output size divides the input size; VGG's ``AdaptiveAvgPool2d(7)`` at any
    input other than 224 px (e.g. a 2x2 map at 64 px) is refused.  Adaptive average
    pooling is linear and separable: ``y = P_h x P_w^T`` with the averaging matrices
    ``P[i, start_i:end_i] = 1 / (end_i - start_i)``, ``start_i = floor(i * n / m)``,
    ``end_i = ceil((i + 1) * n / m)`` (the bins PyTorch uses), which exports as two
    ``MatMul`` nodes.
    """

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("rows", self._averaging(in_size[0], out_size[0]), persistent=False)  # (oh, H)
        self.register_buffer("cols", self._averaging(in_size[1], out_size[1]).T.contiguous(),
                             persistent=False)                                                    # (W, ow)

    @staticmethod
    def _averaging(n: int, m: int) -> torch.Tensor:
        matrix = torch.zeros(m, n)
        for i in range(m):
            start, end = (i * n) // m, -(-((i + 1) * n) // m)
            matrix[i, start:end] = 1.0 / (end - start)
        return matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, oh, W) -> (B, C, oh, ow)
        return torch.matmul(torch.matmul(self.rows, x), self.cols)


def _fixed_size_pools(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Swap the adaptive average pools that cannot be exported for :class:`_MatrixAdaptiveAvgPool2d`.

    The ONNX exporter and TorchScript's oneDNN path both refuse an output size that
    does not divide the input size.  ``model`` is a private copy; its input size is
    fixed by ``example`` afterwards.
    """
    pools = {name: m for name, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d) and name}
    if not pools:
        return model
    shapes: dict[str, tuple[int, int]] = {}

    def recorder(name: str):
        def hook(module, args, output) -> None:  # returns None: the output is kept
            shapes.setdefault(name, tuple(args[0].shape[-2:]))
        return hook

    handles = [m.register_forward_hook(recorder(name)) for name, m in pools.items()]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    for name, pool in pools.items():
        if name not in shapes:
            continue
        in_size = tuple(int(v) for v in shapes[name])
        wanted = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
        out_size = tuple(n if m is None else int(m) for n, m in zip(in_size, wanted))
        if all(n % m == 0 for n, m in zip(in_size, out_size)):
            continue  # exported natively
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _MatrixAdaptiveAvgPool2d(in_size, out_size).to(example.device, example.dtype))
    return model


def _exportable(model: nn.Module) -> nn.Module:
    """Swap every DiagonalLinear of ``model`` (a private copy) for its exportable twin."""
    if isinstance(model, DiagonalLinear):
        return _ScatterAddDiagonalLinear(model)
    targets = [name for name, module in model.named_modules() if isinstance(module, DiagonalLinear)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _ScatterAddDiagonalLinear(getattr(parent, child)))
    return model


def _check_rank_multiple(rank_multiple: int | None) -> None:
    if rank_multiple is not None and (isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int)
                                      or rank_multiple < 1):
        raise ValueError(f"rank_multiple must be an int >= 1 or None, got {rank_multiple!r}")


def _padded(model: nn.Module, rank_multiple: int | None) -> nn.Module:
    return model if rank_multiple in (None, 1) else pad_ranks(model, rank_multiple)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _grow_conv(conv: nn.Conv2d, *, out_channels: int, in_channels: int) -> None:
    """Zero-pad ``conv`` in place to ``out_channels`` outputs and ``in_channels`` inputs.

    New output channels get zero weights (and zero bias), so they are exactly 0; new
    input channels get zero weights, so whatever they hold adds exactly nothing.  A
    depthwise conv (``groups == in_channels == out_channels``) stays depthwise.
    """
    weight = conv.weight.detach()                      # (T, S / groups, kh, kw)
    depthwise = conv.groups > 1
    if depthwise and not conv.groups == conv.in_channels == conv.out_channels:
        raise ValueError(f"only plain or depthwise convs can be padded, got groups={conv.groups} with "
                         f"{conv.in_channels} -> {conv.out_channels} channels")
    per_group_in = 1 if depthwise else in_channels
    grown = weight.new_zeros(out_channels, per_group_in, *weight.shape[2:])
    grown[:weight.shape[0], :weight.shape[1]] = weight
    conv.weight = nn.Parameter(grown, requires_grad=False)
    if conv.bias is not None:
        bias = conv.bias.detach().new_zeros(out_channels)
        bias[:conv.bias.shape[0]] = conv.bias.detach()
        conv.bias = nn.Parameter(bias, requires_grad=False)
    conv.out_channels, conv.in_channels = out_channels, in_channels
    if depthwise:
        conv.groups = out_channels


def pad_ranks(model: nn.Module, multiple: int) -> nn.Module:
    """Zero-pad, in place, the inner ranks of every Tucker-2 / CP layer of ``model`` to ``multiple``.

    Returns ``model``.  :func:`prepare` and :func:`export_onnx` call it on their
    private copy; the caller's model is only changed when it is called directly.

    onnxruntime's fast CPU convolutions work on channel blocks ("NCHWc", the
    layout optimization of [4]_: 16 channels with AVX-512, 8 with AVX2) and only
    take a conv whose input channels fill whole blocks; the others run in plain
    NCHW through im2col, with a layout reorder on either side.  Tucker ranks such as 21 or 85 (channels // 3) fall off
    that path.  Padding a rank ``R`` to ``ceil(R / multiple) * multiple`` with zero
    weights computes exactly the same function (the extra channels are 0 and meet
    zero weights) while every conv of the chain stays blocked.  The MACs of the
    padded chain are higher, but the blocked kernels pad the output channels to
    whole blocks internally anyway (the measured effect is in benchmarks/RESULTS.md,
    "onnx, unpadded").

    Parameters
    ----------
    model : nn.Module
        Modified in place.
    multiple : int
        Block size, >= 1.
    """
    _check_rank_multiple(multiple)
    for module in model.modules():
        if isinstance(module, TuckerConv2d):
            first, core, last = module
            rank_in = _round_up(core.in_channels, multiple)
            rank_out = _round_up(core.out_channels, multiple)
            _grow_conv(first, out_channels=rank_in, in_channels=first.in_channels)
            _grow_conv(core, out_channels=rank_out, in_channels=rank_in)
            _grow_conv(last, out_channels=last.out_channels, in_channels=rank_out)
        elif isinstance(module, CPConv2d):
            first, vertical, horizontal, last = module
            rank = _round_up(vertical.out_channels, multiple)
            _grow_conv(first, out_channels=rank, in_channels=first.in_channels)
            _grow_conv(vertical, out_channels=rank, in_channels=rank)
            _grow_conv(horizontal, out_channels=rank, in_channels=rank)
            _grow_conv(last, out_channels=last.out_channels, in_channels=rank)
        elif isinstance(module, SVDConv2d):  # the 1x1 pair of a 1x1 conv: its rank is a channel count too
            first, last = module
            rank = _round_up(first.out_channels, multiple)
            _grow_conv(first, out_channels=rank, in_channels=first.in_channels)
            _grow_conv(last, out_channels=last.out_channels, in_channels=rank)
    return model


def _check_opset(opset: int | None) -> None:
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < ONNX_MIN_OPSET):
        raise ValueError(f"opset must be an int >= {ONNX_MIN_OPSET} (ScatterElements with reduction='add', "
                         f"used by DiagonalLinear), or None for the exporter's default; got {opset!r}")


def _onnx_bytes(model: nn.Module, example: torch.Tensor, *, opset: int | None) -> bytes:
    """Serialized ONNX model of an eval-mode, exportable ``model`` with a dynamic batch.

    Uses the TorchScript-based exporter (``dynamo=False``): the torch.export-based one
    needs the ``onnxscript`` package, which is not installed here.  ``model`` is a
    private copy: adaptive pools may be swapped (:func:`_fixed_size_pools`).
    """
    model = _fixed_size_pools(model, example)
    buffer = io.BytesIO()
    with _quiet_deprecations(), torch.no_grad():
        torch.onnx.export(
            model, (example,), buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[ONNX_INPUT_NAME],
            output_names=[ONNX_OUTPUT_NAME],
            dynamic_axes={ONNX_INPUT_NAME: {0: ONNX_BATCH_DIM}, ONNX_OUTPUT_NAME: {0: ONNX_BATCH_DIM}},
            do_constant_folding=True,
        )
    return buffer.getvalue()


def _model_onnx_bytes(model: nn.Module, example: torch.Tensor, device: torch.device, *,
                      rank_multiple: int | None, opset: int | None) -> bytes:
    """The ONNX bytes of ``model`` as the tool exports it: an eval-mode copy, ranks padded to
    ``rank_multiple``, DiagonalLinear rewritten (the caller's model untouched)."""
    return _onnx_bytes(_exportable(_padded(_frozen_copy(model, device), rank_multiple)), example, opset=opset)


def _ort_session(model_bytes: bytes, device: torch.device):
    """An onnxruntime session on ``device`` using as many CPU threads as torch."""
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    if device.type == "cpu":
        providers = ["CPUExecutionProvider"]
    elif device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    else:
        raise ValueError(f"the 'onnx' backend runs on CPU, or on CUDA with onnxruntime-gpu; this onnxruntime "
                         f"offers {ort.get_available_providers()} and the model is on {device}")
    return ort.InferenceSession(model_bytes, sess_options=options, providers=providers)


def _ort_has_cuda() -> bool:
    return "CUDAExecutionProvider" in _import_onnxruntime().get_available_providers()


def _ort_runner(session, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        # onnxruntime reads host numpy arrays; results go back to the caller's device.
        array = x.detach().to("cpu", dtype).contiguous().numpy()
        (logits,) = session.run([ONNX_OUTPUT_NAME], {ONNX_INPUT_NAME: array})
        return torch.from_numpy(logits).to(device)
    return run


def export_onnx(model: nn.Module, path: str | os.PathLike, example: torch.Tensor, *, check: bool = True,
                opset: int | None = None, rtol: float = OUTPUT_RTOL,
                rank_multiple: int | None = ONNX_RANK_MULTIPLE,
                int8_batches: Sequence[torch.Tensor] | None = None) -> dict:
    """Export ``model`` to an ONNX file with a dynamic batch dimension, verified before it is written.

    The model is exported from an eval-mode copy (the caller's model is not
    modified), with :class:`decompositions.DiagonalLinear` layers rewritten into
    ``scatter_add`` (see the module docstring).  With ``check=True`` the exported
    graph is run with onnxruntime on ``example`` and on a batch of a different size
    (``example`` plus its first row) and compared with PyTorch; the file is written
    only when both agree.  Writing is atomic: a temporary file in the target folder
    renamed over ``path``, so ``path`` is either the old file or the complete new one.

    Parameters
    ----------
    model : nn.Module
        The model; a single tensor in, a single tensor out.
    path : str or os.PathLike
        Destination ``.onnx`` file; its folder must exist.
    example : torch.Tensor
        An input batch ``(B, C, H, W)`` (moved to the model's device); fixes every
        dimension but the batch.
    check : bool, default True
        Run the onnxruntime comparison (needs onnxruntime).
    opset : int, optional
        ONNX opset, >= :data:`ONNX_MIN_OPSET`; ``None`` uses the exporter's default.
    rtol : float, default OUTPUT_RTOL
        Largest accepted ``max|onnx - torch| / max|torch|`` over both batches.
    rank_multiple : int or None, default ONNX_RANK_MULTIPLE
        Zero-pad the inner ranks of Tucker-2 / CP layers to a multiple of this
        (same outputs, faster onnxruntime kernels, see :func:`pad_ranks`);
        ``None`` exports the ranks as they are.
    int8_batches : sequence of tensors, optional
        Calibration inputs: the file written is the float32 export (checked as above)
        quantized to int8 by :func:`quantize_int8`, written only when its top-1 class
        agrees with float32's on at least :data:`INT8_MIN_AGREEMENT` of these images.

    Returns
    -------
    dict
        ``path``, ``bytes``, ``opset`` (as requested; ``None`` = exporter default),
        ``exporter``, ``export_s`` and, when checked, ``batch_sizes``,
        ``max_abs_diff`` and ``max_rel_diff`` (worst over both batches); otherwise
        ``checked`` is False and the diffs are ``None``.  With ``int8_batches``: ``int8``,
        a dict of ``bytes`` (the file's), ``float_bytes``, ``top1_agreement`` and
        ``calibration_images``.

    Raises
    ------
    ValueError
        For an opset below :data:`ONNX_MIN_OPSET` or a non-positive ``rtol``.
    FileNotFoundError
        If the folder of ``path`` does not exist.
    ImportError
        If ``check=True`` and onnxruntime is not importable.
    OutputMismatchError
        If onnxruntime's output differs by more than ``rtol``; nothing is written.
    """
    _check_opset(opset)
    _check_rank_multiple(rank_multiple)
    if not rtol > 0:
        raise ValueError(f"rtol must be > 0, got {rtol!r}")
    path = os.fspath(path)
    # Fail before the (slow) export on what would only fail after it.
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"folder {directory!r} for the ONNX file {path!r} does not exist")
    if int8_batches is not None and not check:
        raise ValueError("an int8 export is checked against float32: it needs check=True")
    if check:
        _import_onnxruntime()
    device = _model_device(model, example)
    example = example.to(device)
    start = time.perf_counter()
    model_bytes = _model_onnx_bytes(model, example, device, rank_multiple=rank_multiple, opset=opset)
    export_s = time.perf_counter() - start
    result = {"path": path, "bytes": len(model_bytes), "opset": opset, "exporter": "torchscript (dynamo=False)",
              "export_s": export_s, "checked": check, "batch_sizes": None, "max_abs_diff": None,
              "max_rel_diff": None}
    if check:
        # The check runs where this onnxruntime can (the CPU build has no GPU or MPS provider);
        # outputs come back to the model's device for the comparison.
        ort_device = device if device.type == "cuda" and _ort_has_cuda() else torch.device("cpu")
        run = _ort_runner(_ort_session(model_bytes, ort_device), example.dtype, device)
        # A second, different batch size proves the batch dimension really is dynamic.
        batches = (example, torch.cat([example, example[:1]]))
        worst_abs = worst_rel = 0.0
        for batch in batches:
            max_abs, max_rel = _relative_diff(run(batch), _eager_output(model, batch, device))
            worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, max_rel)
        result.update(batch_sizes=[b.shape[0] for b in batches], max_abs_diff=worst_abs, max_rel_diff=worst_rel)
        if worst_rel > rtol:
            raise OutputMismatchError(
                f"onnxruntime output differs from PyTorch: max relative diff {worst_rel:.3g} > rtol {rtol:g} "
                f"(max abs diff {worst_abs:.3g}); {path!r} was not written")
    if int8_batches is not None:
        int8_bytes = quantize_int8(model_bytes, int8_batches)
        agreement = int8_agreement(model_bytes, int8_bytes, int8_batches)
        if agreement < INT8_MIN_AGREEMENT:
            raise Int8AgreementError(
                f"the int8 model's top-1 class agrees with float32's on {100 * agreement:.1f}% of the calibration "
                f"images (< {100 * INT8_MIN_AGREEMENT:.0f}%); {path!r} was not written")
        result["int8"] = {"bytes": len(int8_bytes), "float_bytes": len(model_bytes), "top1_agreement": agreement,
                          "calibration_images": sum(b.shape[0] for b in int8_batches)}
        model_bytes = int8_bytes
        result["bytes"] = len(model_bytes)
    with atomic_open(path, "wb") as fh:
        fh.write(model_bytes)
    logger.info("wrote %s (%.1f MB)", path, len(model_bytes) / 1e6)
    return result


# ------------------------------------------------------------------------------ int8
#: Smallest top-1 agreement of the int8 model with float32 on the calibration images below
#: which :func:`quantize_int8` refuses the result (the issue measured 99.4-100% on VGG16).
INT8_MIN_AGREEMENT = 0.9


class _Batches:
    """onnxruntime's ``CalibrationDataReader`` protocol over host tensors: one input dict per batch."""

    def __init__(self, batches: Sequence[torch.Tensor]) -> None:
        self._arrays = iter([b.detach().to("cpu", torch.float32).contiguous().numpy() for b in batches])

    def get_next(self):
        array = next(self._arrays, None)
        return None if array is None else {ONNX_INPUT_NAME: array}


@contextlib.contextmanager
def _root_log_level(level: int):
    """onnxruntime's quantization tools log advice through the root logger (``logging.warning``)."""
    root = logging.getLogger()
    saved = root.level
    root.setLevel(max(level, saved))
    try:
        yield
    finally:
        root.setLevel(saved)


def quantize_int8(model_bytes: bytes, batches: Sequence[torch.Tensor], *, keep_float: Sequence[str] = ()) -> bytes:
    """Static post-training int8 quantization of an ONNX model of :func:`export_onnx`.

    onnxruntime's ``quantize_static`` [1]_: QDQ format, int8 weights per output channel
    (symmetric), uint8 activations with ranges calibrated (min/max) on ``batches``
    (the model's inputs: a few dozen training images, no augmentation).  Only convolutions
    and matrix products are quantized; everything else stays float32.  The low-rank
    factors are plain convs and matmuls, so a decomposed model quantizes like the original
    and the two savings multiply (4x smaller weights on top of the factorization).

    Parameters
    ----------
    model_bytes : bytes
        A float32 ONNX model (input ``ONNX_INPUT_NAME``, dynamic batch).
    batches : sequence of tensors ``(B, 3, H, W)``
        Calibration inputs.
    keep_float : sequence of str, optional
        ONNX node names left in float32 (onnxruntime's ``nodes_to_exclude``; the exporter
        names a layer's node after its module, e.g. ``/features/features.2/features.2.0/Conv``).
        Measured on the 10x VGG16 plan (RESULTS.md): keeping the 224 px layers in float32
        made the model slower, not faster (the Q/DQ pairs at each boundary cost more than
        the int8 convs saved), so the tool itself quantizes every conv and matmul.

    Returns
    -------
    bytes
        The quantized ONNX model.

    Raises
    ------
    ImportError
        If onnxruntime (with its quantization tools) is not importable.
    ValueError
        If ``batches`` is empty or ``keep_float`` names a node the model does not have.

    References
    ----------
    .. [1] ONNX Runtime, "Quantize ONNX models",
           https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html
    """
    _import_onnxruntime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = list(batches)
    if not batches:
        raise ValueError("int8 quantization needs at least one calibration batch")
    import tempfile

    # quantize_static reads and writes files; a private folder holds both.
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        raw, source, target = (os.path.join(tmp, f"{n}.onnx") for n in ("float32", "prepared", "int8"))
        with open(raw, "wb") as fh:
            fh.write(model_bytes)
        with _quiet_deprecations(), _root_log_level(logging.ERROR):
            # The pre-processing onnxruntime asks for: shapes inferred, constants folded into
            # initializers (else conv biases stay float and are not quantized with their conv).
            quant_pre_process(raw, source)
            if keep_float:
                import onnx

                names = {node.name for node in onnx.load(source).graph.node}
                unknown = sorted(set(keep_float) - names)
                if unknown:
                    raise ValueError(f"keep_float names nodes the model does not have: {unknown[:3]}")
            quantize_static(source, target, _Batches(batches), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(keep_float))
        with open(target, "rb") as fh:
            return fh.read()


def onnx_float_and_int8(model: nn.Module, example: torch.Tensor, batches: Sequence[torch.Tensor], *,
                        rank_multiple: int | None = ONNX_RANK_MULTIPLE,
                        float_bytes: bytes | None = None) -> tuple[bytes, bytes]:
    """The float32 ONNX model of ``model`` (as :func:`export_onnx` writes it, unchecked) and its
    int8 quantization calibrated on ``batches`` (:func:`quantize_int8`).  ``float_bytes``: that
    float32 model when the caller has it already (an ``"onnx"`` :class:`Predictor`'s
    ``onnx_bytes``), which saves the export (tens of seconds for VGG16)."""
    _check_rank_multiple(rank_multiple)
    if float_bytes is None:
        device = _model_device(model, example)
        float_bytes = _model_onnx_bytes(model, example.to(device), device, rank_multiple=rank_multiple, opset=None)
    return float_bytes, quantize_int8(float_bytes, batches)


def onnx_runner(model_bytes: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run(x) -> logits`` of an ONNX model in onnxruntime on the CPU (as many threads as torch)."""
    cpu = torch.device("cpu")
    return _ort_runner(_ort_session(model_bytes, cpu), torch.float32, cpu)


def int8_agreement(float_bytes: bytes, int8_bytes: bytes, batches: Sequence[torch.Tensor]) -> float:
    """Fraction of the images in ``batches`` on which the int8 model's top-1 class is float32's."""
    return float_and_int8_top1(onnx_runner(float_bytes), onnx_runner(int8_bytes), batches)["agreement"]


def float_and_int8_top1(run_float: Callable[[torch.Tensor], torch.Tensor],
                        run_int8: Callable[[torch.Tensor], torch.Tensor], batches) -> dict[str, float]:
    """Top-1 classes of a float32 model and its int8 quantization (:func:`onnx_runner` calls) on
    ``batches`` -- input tensors, or ``(inputs, labels)`` pairs as a test loader yields them:
    ``agreement``, the share of images on which the two agree, and with labels each one's
    accuracy (``accuracy_float32``, ``accuracy_int8``)."""
    same = seen = labelled = 0
    correct = {"float32": 0, "int8": 0}
    for batch in batches:
        inputs, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        preds = {"float32": run_float(inputs).argmax(1), "int8": run_int8(inputs).argmax(1)}
        same += int((preds["float32"] == preds["int8"]).sum())
        seen += inputs.shape[0]
        if labels is not None:
            for name, pred in preds.items():
                correct[name] += int((pred.to(labels.device) == labels).sum())
            labelled += inputs.shape[0]
    result = {"agreement": same / seen}
    if labelled:
        result.update({f"accuracy_{name}": count / labelled for name, count in correct.items()})
    return result


# ------------------------------------------------------------------------- predictor
class Predictor:
    """A callable that runs one prepared model: ``predictor(x) -> logits``.

    Inputs are moved to the predictor's device (and to channels-last where the
    backend wants it); calls run under :func:`torch.inference_mode`.  The predictor
    holds its own copy of the model (or its TorchScript / ONNX form), so later
    changes to the original model do not affect it.

    Attributes
    ----------
    backend : str
        The backend in use, one of :data:`BACKENDS` (``"auto"`` resolved).
    device : torch.device
        Where the model runs and where outputs are returned.
    onnx_bytes : bytes or None
        For the ``"onnx"`` backend, the serialized model it runs (the float32 model that
        :func:`export_onnx` would write, ranks padded alike); None for the others.
    """

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], *, backend: str, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 onnx_bytes: bytes | None = None) -> None:
        self._run = run
        self.backend = backend
        self.device = device
        self._memory_format = memory_format
        self.onnx_bytes = onnx_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = x.to(self.device)
            if x.dim() == 4 and self._memory_format is not torch.contiguous_format:
                x = x.contiguous(memory_format=self._memory_format)
            return self._run(x)

    def __repr__(self) -> str:
        return f"Predictor(backend={self.backend!r}, device={self.device})"


def _build(model: nn.Module, example: torch.Tensor, backend: str, device: torch.device, *,
           rank_multiple: int | None = ONNX_RANK_MULTIPLE) -> Predictor:
    """The predictor of one concrete backend (no output check)."""
    net = _frozen_copy(model, device)
    example = example.to(device)
    if backend == "eager":
        return Predictor(net, backend=backend, device=device)
    if backend == "channels_last":
        net = net.to(memory_format=torch.channels_last)
        return Predictor(net, backend=backend, device=device, memory_format=torch.channels_last)
    if backend == "torchscript":
        net = net.to(memory_format=torch.channels_last)
        example = example.contiguous(memory_format=torch.channels_last) if example.dim() == 4 else example
        # Trace under no_grad (tensors made under inference_mode cannot be traced
        # into constants); freeze inlines the weights, then CPU oneDNN prepacking.
        with _quiet_deprecations(), torch.no_grad():
            net = _fixed_size_pools(net, example)
            traced = torch.jit.trace(net, example, check_trace=False)
            scripted = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        return Predictor(scripted, backend=backend, device=device, memory_format=torch.channels_last)
    if backend == "amp":
        # What a GPU deployment runs: channels-last, float16/bfloat16 autocast (bfloat16 on a
        # CPU with native support), logits back in float32.
        dtype = runtime.autocast_dtype_for(device, cpu_bf16=True)
        if dtype is None:
            raise ValueError(f"the 'amp' backend (float16/bfloat16 autocast) needs a CUDA GPU or a CPU with native "
                             f"bfloat16 (AVX512-BF16 or AMX); {device} has neither")
        net = net.to(memory_format=torch.channels_last)

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type=device.type, dtype=dtype):
                return net(x).float()
        return Predictor(run, backend=backend, device=device, memory_format=torch.channels_last)
    if backend == "onnx":
        _import_onnxruntime()  # fail before the (slow) export when it is missing
        model_bytes = _onnx_bytes(_exportable(_padded(net, rank_multiple)), example, opset=None)
        run = _ort_runner(_ort_session(model_bytes, device), example.dtype, device)
        return Predictor(run, backend=backend, device=device, onnx_bytes=model_bytes)
    raise AssertionError(backend)  # unreachable: checked by the caller


def _verified(predictor: Predictor, example: torch.Tensor, reference: torch.Tensor) -> Predictor:
    _, max_rel = _relative_diff(predictor(example), reference)
    rtol = AMP_OUTPUT_RTOL if predictor.backend == "amp" else OUTPUT_RTOL
    if max_rel > rtol:
        raise OutputMismatchError(f"backend {predictor.backend!r} differs from eager on the example: max "
                                  f"relative diff {max_rel:.3g} > {rtol:g}")
    return predictor


def prepare(model: nn.Module, example: torch.Tensor, *, backend: str = "auto", check: bool = True,
            rank_multiple: int | None = ONNX_RANK_MULTIPLE) -> Predictor:
    """Build a fast, equivalent predictor for ``model``.

    Parameters
    ----------
    model : nn.Module
        A model taking one ``(B, C, H, W)`` tensor; it is deep-copied, put in eval
        mode and never modified.  DataParallel/DDP/compiled wrappers are unwrapped.
    example : torch.Tensor
        An example batch; it fixes every input dimension but the batch (tracing and
        export), and the checks run on it.  It is moved to the model's device.
    backend : str, default "auto"
        One of :data:`BACKENDS` or ``"auto"``, which tries :data:`AUTO_ORDER` for the
        model's device type in turn and takes the first backend that builds and
        reproduces the eager output (a failure is logged as a warning).
    check : bool, default True
        Compare the predictor's output on ``example`` with the eager model's
        (``max|diff| / max|eager| <= OUTPUT_RTOL``).  ``"auto"`` always checks.
    rank_multiple : int or None, default ONNX_RANK_MULTIPLE
        For the ``"onnx"`` backend: zero-pad Tucker-2 / CP ranks to a multiple of
        this before export (same outputs, see :func:`pad_ranks`); ``None``: as they are.

    Returns
    -------
    Predictor
        ``predictor(x)`` returns the logits on the model's device; ``.backend``
        names the backend used.

    Raises
    ------
    ValueError
        For an unknown backend (the message lists the allowed ones).
    ImportError
        For ``backend="onnx"`` without onnxruntime.
    OutputMismatchError
        If ``check`` and the explicit backend does not reproduce the eager output.
    """
    _check_backend(backend, allow_auto=True)
    _check_rank_multiple(rank_multiple)
    device = _model_device(model, example)
    if backend != "auto":
        predictor = _build(model, example, backend, device, rank_multiple=rank_multiple)
        return _verified(predictor, example, _eager_output(model, example, device)) if check else predictor
    reference = _eager_output(model, example, device)
    candidates = AUTO_ORDER.get(device.type, AUTO_ORDER_OTHER)
    for name in candidates:
        if name == "eager":
            return _build(model, example, name, device)
        try:
            predictor = _verified(_build(model, example, name, device, rank_multiple=rank_multiple), example,
                                  reference)
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next backend
            logger.warning("backend %r unusable for this model (%s: %s); trying the next one",
                           name, type(exc).__name__, exc)
            continue
        logger.info("auto backend on %s: %s", device, name)
        return predictor
    return _build(model, example, "eager", device)


def _eager_output(model: nn.Module, example: torch.Tensor, device: torch.device) -> torch.Tensor:
    net = runtime.unwrap(model)
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            return net(example.to(device))
    finally:
        net.train(was_training)


# ------------------------------------------------------------------------- benchmark
def _check_counts(warmup: int, repeats: int) -> None:
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")


def time_interleaved(calls: Mapping[Hashable, Callable[[], object]], *, warmup: int = 3, repeats: int = 10,
                     devices: Sequence[torch.device] = (), progress: bool = False,
                     desc: str = "timing rounds") -> dict[Hashable, list[float]]:
    """Wall-clock times of several calls, measured in interleaved rounds.

    Each round calls every entry of ``calls`` once, in order, so slow drifts of a
    shared machine (other processes, frequency changes) hit all of them alike; the
    first ``warmup`` rounds are not recorded.  Judges nothing.

    Parameters
    ----------
    calls : mapping of hashable keys to callables
        Zero-argument callables, e.g. ``lambda: predictor(x)``.
    warmup : int, default 3
        Untimed rounds first (allocator, oneDNN primitive caches, onnxruntime arenas).
    repeats : int, default 10
        Timed rounds, >= 1.
    devices : sequence of torch.device
        Synchronized before and after each call (CUDA / MPS), so that the time
        covers the queued kernels.
    progress : bool, default False
        Show a tqdm bar over the rounds.
    desc : str
        The bar's label.

    Returns
    -------
    dict of key to list of float
        The ``repeats`` times of each call in milliseconds, in round order.
    """
    _check_counts(warmup, repeats)
    times: dict[Hashable, list[float]] = {name: [] for name in calls}

    def sync() -> None:
        for device in devices:
            runtime.synchronize(device)

    for round_index in tqdm(range(warmup + repeats), desc=desc, disable=not progress):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            if round_index >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times
