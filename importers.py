"""Read a trained conv stack (and FC layers) from ONNX and Keras files into a torchvision model.

Trained VGG weights are often published as an ONNX model exported from Keras, or as a
Keras ``.h5`` / ``.weights.h5`` file, rather than as a torchvision ``state_dict``.  What
such files share with torchvision's ``vgg16().features`` is the sequence of conv kernels:
13 of them for VGG16, in network order, with the same shapes.  So this module

1. reads every conv kernel and dense (fully connected) matrix of the file, in network
   order, converted to torch's layout (:func:`read_layers`);
2. matches the file's conv kernels, in order and by shape, against the model's convs and
   copies them (:func:`load_into`).  Extra kernels in the file (another head, side
   outputs, 1x1 convs) are skipped and listed; a file that lacks part of the stack is an
   error naming what was found and what was expected;
3. copies a dense layer only where its shape matches one of the model's hidden Linear
   layers (the classifier head is always new); the other Linear layers keep their fresh
   initialisation, and the result says which layers came from the file.

Layouts handled:

* ONNX: ``Conv`` nodes (weight OIHW, bias as the third input or a following ``Add``),
  ``Gemm`` (``transB``) and ``MatMul`` + ``Add`` for dense layers, in the graph's node
  order (ONNX requires a topological order).  Weights may come through ``Identity`` /
  ``Cast`` / ``Transpose`` nodes.
* Keras 2 ``.h5`` (``model.save`` and ``save_weights``): ``[model_weights/]<layer>/<layer>/
  kernel:0`` and ``bias:0``, ordered by the file's ``layer_names`` attribute.
* Keras 3 ``.weights.h5``: ``.../layers/<layer>/vars/0`` (kernel) and ``vars/1`` (bias),
  ordered by their paths with numbers compared as numbers (``conv2d_2`` before
  ``conv2d_10``), the order Keras names layers in.

Keras kernels are HWIO (conv) and (in, out) (dense) and are transposed to OIHW and
(out, in).  A Keras model flattens an NHWC feature map, so its first dense layer's input
features are in (h, w, c) order where torch's ``flatten`` gives (c, h, w): that matrix is
permuted.  In an ONNX file the same is recognised by a ``Transpose`` to NHWC between the
last conv and the first dense layer (what tf2onnx emits).

Nothing in a file is executed: ONNX is a protobuf of tensors and nodes, h5 a container of
arrays.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from errors import UserError
from report import short_list

__all__ = ["Layer", "ForeignWeights", "file_kind", "read_layers", "load_into"]

#: The first bytes of every HDF5 file (Keras ``.h5`` / ``.weights.h5``).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: How many names an error or log line lists before "and N more".
_LIST_LIMIT = 6
#: Nodes that pass a weight through unchanged in value (Transpose is handled apart).
_PASS_THROUGH_OPS = ("Identity", "Cast")
#: ONNX element types read as weights (TensorProto: FLOAT, UINT8, INT8, UINT16, INT16, INT32,
#: INT64, FLOAT16, DOUBLE, UINT32, UINT64, BFLOAT16); strings, booleans, complex numbers and
#: unknown codes are refused.
_ONNX_REAL_TYPES = (1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 16)
#: ONNX permutation NCHW -> NHWC: a Keras flatten of a channels-last map.
_TO_CHANNELS_LAST = (0, 2, 3, 1)
_TO_CHANNELS_FIRST = (0, 3, 1, 2)


@dataclasses.dataclass
class Layer:
    """One conv or dense layer of a file, in torch's layout.

    ``weight`` is OIHW for a conv and (out, in) for a dense layer.  ``channels_last_input``
    marks a dense layer whose input is a flattened NHWC map (features in (h, w, c) order).
    """

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    channels_last_input: bool = False

    @property
    def shape_text(self) -> str:
        return "x".join(str(d) for d in self.weight.shape)


@dataclasses.dataclass
class ForeignWeights:
    """The conv and dense layers of one file, in network order."""

    path: str
    kind: str  # "onnx" or "keras"
    convs: list[Layer]
    denses: list[Layer]


def file_kind(path: str | os.PathLike) -> str:
    """``"keras"`` (an HDF5 file), ``"onnx"`` (a ``.onnx`` name) or ``"torch"`` (anything else)."""
    with open(path, "rb") as fh:
        head = fh.read(len(HDF5_SIGNATURE))
    if head == HDF5_SIGNATURE:
        return "keras"
    if os.fspath(path).lower().endswith(".onnx"):
        return "onnx"
    return "torch"


def read_layers(path: str | os.PathLike) -> ForeignWeights:
    """Every conv and dense layer of an ONNX or Keras file, in network order, torch layout.

    Raises
    ------
    UserError
        If the file cannot be parsed, or the library that reads it (``onnx``, ``h5py``)
        is missing.
    """
    path = os.fspath(path)
    kind = file_kind(path)
    if kind == "onnx":
        convs, denses = _read_onnx(path)
    elif kind == "keras":
        convs, denses = _read_keras(path)
    else:
        raise UserError(f"{path} is neither an ONNX (.onnx) nor a Keras (.h5) file")
    return ForeignWeights(path=path, kind=kind, convs=convs, denses=denses)


# ------------------------------------------------------------------------------ ONNX
def _read_onnx(path: str) -> tuple[list[Layer], list[Layer]]:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise UserError("reading ONNX weights needs the onnx package: pip install onnx") from None
    try:
        # Tensors in external data files beside the model are loaded by onnx itself, which (since
        # 1.13, CVE-2022-25882) refuses absolute paths and paths out of the model's folder.
        model = onnx.load(path)
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError, missing external data, ...
        raise UserError(f"{path} is not a readable ONNX model ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'no detail'})") from None
    norms = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    if norms:
        warnings.warn(f"{path} has {norms} BatchNormalization layer(s): only conv and dense weights are read, "
                      f"so features computed with them will differ", stacklevel=3)
    try:
        return _onnx_layers(model.graph, numpy_helper)
    except _Refused as exc:
        raise UserError(f"{path}: {exc}") from None


#: The largest ONNX weight read, in elements (VGG16's fc6 is 103M).
MAX_ONNX_ELEMENTS = 1 << 28


def _onnx_array(tensor, numpy_helper) -> np.ndarray:
    """An ONNX tensor as an array, after checking that it holds real numbers, declares a size
    that is bounded, and carries exactly as much data as it declares (a hostile file declares
    2^40 elements with no data, and numpy would try to allocate them)."""
    from onnx import TensorProto, helper

    name = tensor.name[:80] or "(unnamed)"
    kind = tensor.data_type
    if kind not in _ONNX_REAL_TYPES:
        what = TensorProto.DataType.Name(kind) if kind in TensorProto.DataType.values() else f"type {kind}"
        raise _Refused(f"tensor {name!r} holds {what} values, not real numbers")
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise _Refused(f"tensor {name!r} has a negative dimension {dims}")
    elements = int(np.prod(dims, dtype=np.float64))
    if elements > MAX_ONNX_ELEMENTS:
        raise _Refused(f"tensor {name!r} declares {elements} values; refused before reading")
    if tensor.HasField("raw_data"):
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(kind)).itemsize
        if len(tensor.raw_data) != elements * itemsize:
            raise _Refused(f"tensor {name!r} declares {elements} values but holds {len(tensor.raw_data)} bytes")
    elif tensor.data_location != TensorProto.EXTERNAL:
        field = helper.tensor_dtype_to_field(kind)
        if len(getattr(tensor, field)) != elements:
            raise _Refused(f"tensor {name!r} declares {elements} values but holds {len(getattr(tensor, field))}")
    try:
        values = numpy_helper.to_array(tensor)
    except (ValueError, TypeError, MemoryError, OSError) as exc:
        raise _Refused(f"tensor {name!r} cannot be read ({type(exc).__name__})") from None
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise _Refused(f"tensor {name!r} holds NaN or infinite values")
    return values


def _onnx_layers(graph, numpy_helper) -> tuple[list[Layer], list[Layer]]:
    # Tensors are read only where a Conv or Gemm uses them, each once, after _onnx_array's checks.
    tensors: dict[str, Any] = {t.name: t for t in graph.initializer}
    for node in graph.node:  # Constant nodes hold weights too in some exports
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    tensors[node.output[0]] = attr.t
    arrays: dict[str, np.ndarray] = {}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def constant(name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a weight (an initializer, possibly passed through
        Identity-like ops and Transposes).  Iterative: a chain of 100,000 Identity nodes, or a
        cycle, is walked without recursion."""
        chain, seen = [], set()
        while name not in tensors:
            node = producer.get(name)
            if node is None or not node.input or name in seen:
                return None
            if node.op_type not in _PASS_THROUGH_OPS and node.op_type != "Transpose":
                return None
            seen.add(name)
            chain.append(node)
            name = node.input[0]
        if name not in arrays:
            arrays[name] = _onnx_array(tensors[name], numpy_helper)
        value = arrays[name]
        for node in reversed(chain):
            if node.op_type == "Transpose":
                perm = _attr(node, "perm")
                if perm is not None and sorted(perm) != list(range(value.ndim)):
                    raise _Refused(f"Transpose {node.name[:60]!r}: perm {perm[:8]} is not a permutation of "
                                   f"{value.ndim} axes")
                value = np.transpose(value, perm) if perm is not None else value.T
        return value

    def bias_after(output: str, channels: int) -> np.ndarray | None:
        """A constant of ``channels`` values added to ``output`` (a separate bias ``Add``)."""
        users = consumers.get(output, [])
        if len(users) != 1 or users[0].op_type != "Add":
            return None
        add = users[0]
        return vector(add.input[1] if add.input[0] == output else add.input[0], channels)

    def vector(name: str, size: int) -> np.ndarray | None:
        """A bias as a constant of ``size`` values in any broadcastable shape, e.g. (1, N) or (1, N, 1, 1)."""
        value = constant(name) if name else None
        return value.reshape(size) if value is not None and value.size == size else None

    convs: list[Layer] = []
    denses: list[Layer] = []
    channels_last = False  # a Transpose to NHWC seen after the last conv
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and not node.output:
            raise _Refused(f"{node.op_type} node {node.name[:60]!r} has no output")
        if node.op_type == "Conv":
            weight = constant(node.input[1]) if len(node.input) > 1 else None
            if weight is None or weight.ndim != 4:
                continue
            bias = vector(node.input[2], weight.shape[0]) if len(node.input) > 2 else None
            if bias is None:
                bias = bias_after(node.output[0], weight.shape[0])
            convs.append(Layer(_onnx_name(node, node.input[1]), _tensor(weight), _tensor(bias)))
            channels_last = False
        elif node.op_type == "Transpose" and tuple(_attr(node, "perm") or ()) == _TO_CHANNELS_LAST:
            channels_last = bool(convs)
        elif node.op_type == "Transpose" and tuple(_attr(node, "perm") or ()) == _TO_CHANNELS_FIRST:
            channels_last = False
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) > 1:
            weight = constant(node.input[1])
            if weight is None or weight.ndim != 2:
                continue
            # Gemm computes alpha * A @ B + beta * C; with transB it is A @ B.T, B then being (out, in).
            if node.op_type == "Gemm" and _attr(node, "transA"):
                raise _Refused(f"Gemm node {node.name[:60]!r} transposes its input (transA): not a dense layer")
            alpha, beta = ((1.0 if v is None else float(v)) for v in
                           ((_attr(node, "alpha"), _attr(node, "beta")) if node.op_type == "Gemm" else (None, None)))
            if not (node.op_type == "Gemm" and _attr(node, "transB")):
                weight = weight.T
            weight = weight * alpha if alpha != 1.0 else weight
            out_features = weight.shape[0]
            bias = vector(node.input[2], out_features) if node.op_type == "Gemm" and len(node.input) > 2 else None
            bias = bias * beta if bias is not None and beta != 1.0 else bias
            if bias is None:
                bias = bias_after(node.output[0], out_features)
            first = not denses
            denses.append(Layer(_onnx_name(node, node.input[1]), _tensor(weight), _tensor(bias),
                                channels_last_input=first and channels_last))
    return convs, denses


def _attr(node, name: str):
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            return list(value) if isinstance(value, (list, tuple)) else value
    return None


def _onnx_name(node, weight_name: str) -> str:
    return node.name or weight_name


# ----------------------------------------------------------------------------- Keras
def _natural_key(text: str) -> list:
    """Sort key comparing digit runs as numbers: ``conv2d_2`` < ``conv2d_10``."""
    # re.split with a group alternates text and digit runs, so the kinds line up between keys
    # (str.isdigit would also take "²", which int() refuses).
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text))]


#: The largest kernel or bias read from a Keras file, in elements (VGG16's fc1 is 103M; about
#: 1 GiB in float32), and how many times the file's size a compressed dataset may declare.
MAX_KERAS_ELEMENTS = 1 << 28
MAX_KERAS_EXPANSION = 8
#: Groups and datasets visited in a Keras file at most (Keras VGG16 has about 100).
MAX_KERAS_NODES = 100_000


def _read_keras(path: str) -> tuple[list[Layer], list[Layer]]:
    try:
        import h5py
    except ImportError:
        raise UserError("reading Keras weights files (.h5) needs h5py, an optional dependency: "
                        "pip install h5py") from None
    try:
        with h5py.File(path, "r") as fh:
            groups = _keras_weight_groups(fh, h5py, os.path.getsize(path))
    except OSError as exc:
        raise UserError(f"{path} is not a readable HDF5 file ({str(exc).splitlines()[0][:200]})") from None
    except _Refused as exc:
        raise UserError(f"{path}: {exc}") from None
    except UnicodeDecodeError:  # h5py hands such names over as bytes, and fails on them later
        raise UserError(f"{path}: a group or dataset name is not UTF-8 (not a Keras weights file)") from None
    convs: list[Layer] = []
    denses: list[Layer] = []
    for name, kernel, bias in groups:
        if kernel.ndim == 4:  # HWIO -> OIHW
            convs.append(Layer(name, _tensor(np.transpose(kernel, (3, 2, 0, 1))), _tensor(bias)))
        elif kernel.ndim == 2:  # (in, out) -> (out, in)
            denses.append(Layer(name, _tensor(kernel.T), _tensor(bias)))
    if convs and denses:
        # Keras flattens NHWC maps: the first dense layer after the convs sees (h, w, c).  Not
        # "the first dense read after a conv": a Keras 3 file names its groups by class, and a
        # Sequential around a conv base stores "layers/dense" before "layers/functional/...".
        denses[0] = dataclasses.replace(denses[0], channels_last_input=True)
    return convs, denses


class _Refused(ValueError):
    """A Keras file that is not plain weights data in this one file (turned into one line)."""


def _keras_weight_groups(fh, h5py, file_size: int) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(layer path, kernel, bias) of every layer with a 2-D or 4-D kernel, in network order.

    The file is data in a format, never a pointer to other files: only hard links are followed
    (an external link, a soft link, a virtual dataset or a dataset stored in another file is
    refused, naming it), the walk is iterative and bounded, and every dataset's dtype and size
    are checked before it is read (:func:`_read_dataset`).
    """
    root = fh
    if "model_weights" in _children(fh):
        root = _child(fh, "model_weights", h5py)
        if not isinstance(root, h5py.Group):
            raise _Refused("'model_weights' is not a group")
    if "layer_names" not in root.attrs:
        return _kernels_below(root, h5py, file_size)
    names = _layer_names(root.attrs["layer_names"])
    found: list[tuple[str, np.ndarray, np.ndarray | None]] = []
    children = _children(root)
    for layer in names:  # Keras 2: the file says the order
        if layer in children:
            group = _child(root, layer, h5py)
            if not isinstance(group, h5py.Group):
                raise _Refused(f"layer {layer[:60]!r} is a dataset, not a group of weights")
            found += _kernels_below(group, h5py, file_size)
    return found


def _layer_names(raw) -> list[str]:
    """Keras 2's ``layer_names`` attribute: distinct plain names of the root's children."""
    values = np.asarray(raw)
    if values.ndim != 1 or values.dtype.kind not in "SUO":
        raise _Refused(f"attribute 'layer_names' must be a list of names, got {values.dtype} of shape "
                       f"{values.shape}")
    names = []
    for value in values.tolist():
        try:
            name = value.decode("utf-8") if isinstance(value, bytes) else value
        except UnicodeDecodeError:
            raise _Refused("attribute 'layer_names' holds a name that is not UTF-8") from None
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise _Refused(f"attribute 'layer_names' holds {str(name)[:60]!r}, not a layer name")
        if name not in names:
            names.append(name)
    return names


def _children(group) -> list[str]:
    """The link names of ``group``, without resolving any link (``name in group`` would open an
    external link's file to see whether its target exists)."""
    return list(group.keys())


def _child(group, name: str, h5py):
    """``group[name]`` through a hard link only."""
    link = group.get(name, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        raise _Refused(f"{group.name.rstrip('/')}/{name} is a link to another file ({link.filename[:80]}); "
                       f"weights are read from the given file only")
    if not isinstance(link, h5py.HardLink):
        raise _Refused(f"{group.name.rstrip('/')}/{name} is a {type(link).__name__}; only plain groups and "
                       f"datasets are read")
    return group[name]


def _kernels_below(group, h5py, file_size: int) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """Kernels (with their sibling bias) anywhere below ``group``, in natural path order."""
    datasets: list[tuple[str, Any]] = []
    stack, visited = [("", group)], 0
    while stack:  # iterative, hard links only, each group once
        prefix, current = stack.pop()
        for name in _children(current):
            visited += 1
            if visited > MAX_KERAS_NODES:
                raise _Refused(f"more than {MAX_KERAS_NODES} groups and datasets: not a weights file")
            obj = _child(current, name, h5py)
            path = f"{prefix}/{name}".lstrip("/")
            if isinstance(obj, h5py.Group):
                stack.append((path, obj))
            elif isinstance(obj, h5py.Dataset):
                datasets.append((path, obj))
    by_parent: dict[str, dict[str, Any]] = {}
    for name, obj in datasets:
        parent, _, leaf = name.rpartition("/")
        by_parent.setdefault(parent, {})[leaf] = obj
    out = []
    for parent in sorted(by_parent, key=_natural_key):
        members = by_parent[parent]
        kernel_key = next((k for k in ("kernel:0", "kernel", "0") if k in members), None)
        if kernel_key is None or members[kernel_key].ndim not in (2, 4):
            continue
        kernel = _read_dataset(members[kernel_key], file_size)
        bias_key = next((k for k in ("bias:0", "bias", "1") if k in members), None)
        bias = _read_dataset(members[bias_key], file_size) if bias_key is not None else None
        if bias is not None and (bias.ndim != 1 or bias.shape[0] != kernel.shape[-1]):
            bias = None
        layer = f"{group.name.rstrip('/')}/{parent}".lstrip("/")
        out.append((layer, kernel, bias))
    return out


def _read_dataset(dataset, file_size: int) -> np.ndarray:
    """A dataset's values, after checking that they are real numbers stored in this file and of a
    size this file can hold (a compressed dataset may declare gigabytes in a few kilobytes)."""
    name = dataset.name
    if dataset.is_virtual:
        raise _Refused(f"dataset {name} is virtual (its data lives in other files); refused")
    if dataset.external:
        raise _Refused(f"dataset {name} is stored in an external file ({str(dataset.external[0][0])[:80]}); "
                       f"weights are read from the given file only")
    kind = dataset.dtype.kind
    if kind not in "fiu" or dataset.dtype.fields is not None:
        what = "complex" if kind == "c" else str(dataset.dtype)[:40]
        raise _Refused(f"dataset {name} holds {what} values, not real numbers")
    elements = int(np.prod(dataset.shape, dtype=np.float64))
    declared = elements * dataset.dtype.itemsize
    allowed = file_size * (MAX_KERAS_EXPANSION if dataset.compression else 1)
    if elements > MAX_KERAS_ELEMENTS or declared > allowed:
        raise _Refused(f"dataset {name} declares {elements} values ({declared} bytes) in a {file_size}-byte file; "
                       f"refused before reading")
    values = np.asarray(dataset[()])
    if kind == "f" and not np.isfinite(values).all():
        raise _Refused(f"dataset {name} holds NaN or infinite values")
    return values


def _tensor(array: np.ndarray | None) -> torch.Tensor | None:
    if array is None:
        return None
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))  # own, writable memory


# ---------------------------------------------------------------------------- loading
def _match_in_order(targets: Sequence[tuple[str, torch.Size]], layers: Sequence[Layer]) -> dict[str, int]:
    """Greedy in-order matching by shape: target name -> layer index (the first targets that match).

    Taking the first layer of the right shape is optimal for an in-order (subsequence)
    match: if any matching exists, the greedy one completes it.
    """
    matched: dict[str, int] = {}
    cursor = 0
    for name, shape in targets:
        while cursor < len(layers) and tuple(layers[cursor].weight.shape) != tuple(shape):
            cursor += 1
        if cursor == len(layers):
            break
        matched[name] = cursor
        cursor += 1
    return matched


def _to_channels_first(weight: torch.Tensor, channels: int) -> torch.Tensor | None:
    """(out, h*w*c) in (h, w, c) order -> (out, c*h*w) in torch's (c, h, w) order."""
    out_features, in_features = weight.shape
    if in_features % channels:
        return None
    pixels = in_features // channels
    side = math.isqrt(pixels)
    if side * side != pixels:
        return None
    return weight.reshape(out_features, side, side, channels).permute(0, 3, 1, 2).reshape(out_features, -1)


@torch.no_grad()
def load_into(model: nn.Module, weights: ForeignWeights, *, arch: str) -> dict[str, list[str]]:
    """Copy the file's conv stack, and the dense layers that fit, into ``model``.

    Parameters
    ----------
    model : nn.Module
        A freshly built torchvision model (its head not yet replaced or already
        replaced: the last Linear layer is never loaded).
    weights : ForeignWeights
        From :func:`read_layers`.
    arch : str
        Only used in messages.

    Returns
    -------
    dict
        ``loaded`` (module names whose weights came from the file), ``fresh`` (Linear
        and BatchNorm layers left at their initialisation) and ``ignored`` (file layers
        not used, with their shapes).

    Raises
    ------
    UserError
        If the file lacks part of the model's conv stack (the message names the first
        missing conv and what the file holds), or holds extra convs of the stack's own
        shapes inside it (a deeper network of the same family).
    """
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    hidden = linears[:-1]  # the head is always new
    conv_match = _match_in_order([(n, m.weight.shape) for n, m in convs], weights.convs)
    count = len(conv_match)
    if count < len(convs):
        name, conv = convs[count]
        found = [f"{layer.shape_text}" for layer in weights.convs] or ["none"]
        raise UserError(f"{weights.path} lacks the conv stack of {arch}: {len(weights.convs)} conv kernel(s) "
                        f"found ({short_list(found, _LIST_LIMIT)}); {arch} needs {len(convs)} in order, and "
                        f"{name} ({'x'.join(map(str, conv.weight.shape))}) has no match after the {count} "
                        f"matched before it")
    # A kernel skipped inside the stack with the shape of one of the arch's own convs means a
    # deeper network of the same family (a VGG19 file read as vgg16): matching would mix its blocks.
    used_convs = set(conv_match.values())
    first, last = (min(used_convs), max(used_convs)) if used_convs else (0, 0)
    stack_shapes = {tuple(m.weight.shape) for _, m in convs}
    extra = [layer for i, layer in enumerate(weights.convs)
             if first < i < last and i not in used_convs and tuple(layer.weight.shape) in stack_shapes]
    if extra:
        raise UserError(f"{weights.path} holds more convs of {arch}'s shapes inside its stack than {arch} has "
                        f"({short_list([f'{x.name} ({x.shape_text})' for x in extra], _LIST_LIMIT)} would be "
                        f"skipped): it looks like a deeper network; pick the --arch it was trained as")
    loaded: list[str] = []
    for name, conv in convs:
        layer = weights.convs[conv_match[name]]
        _copy(conv, layer.weight, layer.bias)
        loaded.append(name)

    # Dense layers: only exact shape matches, in order.
    last_channels = convs[-1][1].out_channels if convs else None
    used_denses: set[int] = set()
    cursor = 0
    fresh: list[str] = []
    for position, (name, linear) in enumerate(hidden):
        taken = None
        for index in range(cursor, len(weights.denses)):
            layer = weights.denses[index]
            weight = layer.weight
            # Only the model's first Linear reads the flattened conv map.
            if layer.channels_last_input and last_channels and position == 0:
                weight = _to_channels_first(weight, last_channels)
            if weight is not None and tuple(weight.shape) == tuple(linear.weight.shape):
                taken = (index, weight, layer)
                break
        if taken is None:
            fresh.append(name)
            continue
        index, weight, layer = taken
        _copy(linear, weight, layer.bias)
        loaded.append(name)
        used_denses.add(index)
        cursor = index + 1
    if linears:
        fresh.append(linears[-1][0])
    # BatchNorm layers (vgg16_bn, ...) keep their initialisation: these files carry no statistics for them.
    fresh += [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    ignored = [f"{layer.name} ({layer.shape_text})" for i, layer in enumerate(weights.convs) if i not in used_convs]
    ignored += [f"{layer.name} ({layer.shape_text})" for i, layer in enumerate(weights.denses)
                if i not in used_denses]
    return {"loaded": loaded, "fresh": fresh, "ignored": ignored}


def _copy(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    module.weight.copy_(weight)
    if module.bias is not None:
        # A layer saved without a bias (Keras use_bias=False) computes the same as a zero bias.
        if bias is None:
            module.bias.zero_()
        else:
            module.bias.copy_(bias)
