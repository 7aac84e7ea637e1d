"""Build the supported architectures, and save / load model files safely.

A model file is never a pickled module.  It is a dict that
``torch.load(path, weights_only=True)`` reads without running any code::

    {
        "format": "lowrank-cnn",        # FILE_FORMAT
        "version": 1,                   # FILE_VERSION
        "arch": "vgg16",                # one of ARCHS
        "classes": ["cat", "dog"],      # class names, in output order
        "image_size": 224,              # training / evaluation crop
        "plan": {"features.2": {"method": "tucker", "ranks": [21, 20]}, ...},
        "state_dict": {...},            # tensors only
        "meta": {...},                  # JSON-like: history, decomposition report, versions
    }

Loading builds ``arch`` with ``len(classes)`` outputs (on the meta device, so no
time is spent initializing weights that are overwritten), replaces the layers named
in ``plan`` by empty decomposed modules (:func:`decompositions.apply_plan`) and
loads ``state_dict`` strictly.  Saving writes a temporary file in the same folder and
renames it, so an interrupted run never leaves a half-written model.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import stat
import warnings
import zipfile
from typing import Any

import torch
import torchvision
from torch import nn

import decompositions
import importers
import runtime
from atomic import atomic_open
from errors import UserError
from report import short_list

logger = logging.getLogger(__name__)

__all__ = ["ARCHS", "MIN_IMAGE_SIZE", "MAX_IMAGE_SIZE", "FILE_FORMAT", "FILE_VERSION", "build_model", "build_pretrained", "check_image_size",
           "available_archs", "min_image_size", "head_name", "torchvision_model",
           "save_model", "load_model", "feature_parameters", "check_input_file", "save_checkpoint",
           "load_checkpoint"]

ARCHS = ("vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "alexnet")
# Smallest square input for which every pooling stage still has an output pixel.
# VGG: five 2x2/2 max-pools -> 2**5.  AlexNet: conv 11x11/4 (pad 2) and three
# 3x3/2 max-pools need 63 px (63 -> 15 -> 7 -> 3 -> 1).
MIN_IMAGE_SIZE = {"vgg16": 32, "vgg16_bn": 32, "vgg19": 32, "vgg19_bn": 32, "alexnet": 63}
# Largest crop: 9x ImageNet's 224 px.  One VGG image at 2048 px already holds 1 GiB of
# first-layer activations; far larger sizes end in PIL or allocator errors, not results.
MAX_IMAGE_SIZE = 2048
FILE_FORMAT = "lowrank-cnn"
FILE_VERSION = 1
REQUIRED_KEYS = ("format", "version", "arch", "classes", "image_size", "plan", "state_dict")
# torch.save writes its archive uncompressed: the entries' declared sizes add up to about
# the file's own.  More than this many times the file (plus the slack) is a compressed
# archive, possibly a zip bomb, refused before anything is inflated.
MAX_ZIP_EXPANSION = 1.5
#: The largest --weights file read: torchvision's largest weights here (VGG19, 548 MB) many
#: times over, and ONNX's 2 GiB protobuf limit twice.
MAX_WEIGHTS_BYTES = 4 << 30
ZIP_SLACK_BYTES = 16 * 1024 * 1024


@functools.lru_cache(maxsize=1)
def available_archs() -> tuple[str, ...]:
    """Every torchvision classification model name (``torchvision.models.list_models``)."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str) -> None:
    if arch not in ARCHS and arch not in available_archs():
        raise UserError(f"unknown architecture {str(arch)[:60]!r}; any torchvision classification model works "
                        f"(e.g. {', '.join(ARCHS)}, resnet50, densenet121, mobilenet_v2, efficientnet_b0; the list: "
                        f"torchvision.models.list_models(module=torchvision.models))")


#: Archs whose torchvision builder adds auxiliary classifiers (train-mode tuple outputs): built without.
AUX_ARCHS = ("googlenet", "inception_v3")
#: The size range :func:`min_image_size` searches for archs outside MIN_IMAGE_SIZE.
PROBE_MAX_SIZE = 512


def torchvision_model(arch: str) -> nn.Module:
    """``torchvision.models.get_model(arch, weights=None)`` with the ImageNet head (no auxiliary classifiers)."""
    check_arch(arch)
    # transform_input: what their ImageNet weights expect (torchvision sets it with weights); it
    # has no parameters, so model files stay the same either way.
    extra = {"aux_logits": False, "init_weights": True, "transform_input": True} if arch in AUX_ARCHS else {}
    return torchvision.models.get_model(arch, weights=None, **extra)


@functools.lru_cache(maxsize=4)
def _probe_model(arch: str) -> nn.Module:
    """``arch`` in eval mode for shape probes: on the meta device (no weights), or on the CPU for
    the few builders that compute with tensors while they build (regnet)."""
    try:
        with torch.device("meta"):
            return torchvision_model(arch).eval()
    except (RuntimeError, NotImplementedError):
        return torchvision_model(arch).eval().to("meta")  # built once on the CPU, probed without weights


def _forward_works(arch: str, size: int) -> bool:
    """Whether ``arch`` takes a ``size`` x ``size`` batch of two images (a forward on the probe model)."""
    model = _probe_model(arch)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(torch.empty(2, 3, size, size, device=device))
    except Exception:  # noqa: BLE001 - any failure (too small, fixed-size archs) means "does not take it"
        return False
    return True


@functools.lru_cache(maxsize=None)
def min_image_size(arch: str) -> int:
    """The smallest square input ``arch`` takes: the table for the five original archs, else a search.

    The search is a bisection over shape-only forward passes on the meta device (no
    weights, no compute), assuming that an arch taking ``s`` px takes every size above
    (pooling stages only need at least one output pixel).
    """
    if arch in MIN_IMAGE_SIZE:
        return MIN_IMAGE_SIZE[arch]
    return search_min_image_size(arch)


def search_min_image_size(arch: str) -> int:
    """:func:`min_image_size` by bisection, whatever the table says (the tests check they agree)."""
    low, high = 1, PROBE_MAX_SIZE
    if not _forward_works(arch, high):
        high = 224  # archs with a fixed input size (vision transformers) take ImageNet's
        if not _forward_works(arch, high):
            raise UserError(f"{arch} takes no square image up to {PROBE_MAX_SIZE} px here")
    while low < high:
        mid = (low + high) // 2
        if _forward_works(arch, mid):
            high = mid
        else:
            low = mid + 1
    return high


def check_image_size(arch: str, image_size: int) -> None:
    """UserError when ``image_size`` is too small for ``arch`` (:func:`min_image_size`), above
    MAX_IMAGE_SIZE, or (for archs outside the table) a size the arch does not take."""
    check_arch(arch)
    smallest = min_image_size(arch)
    if image_size < smallest:
        raise UserError(f"image size {image_size} is too small for {arch}: it needs at least {smallest} px")
    if image_size > MAX_IMAGE_SIZE:
        raise UserError(f"image size {image_size} is too large: at most {MAX_IMAGE_SIZE} px")
    if arch not in MIN_IMAGE_SIZE and not _forward_works(arch, image_size):
        raise UserError(f"{arch} does not take {image_size} px images (it has a fixed input size?); try "
                        f"--image_size {smallest}")


def head_name(model: nn.Module) -> str:
    """The classifier: the model's last ``nn.Linear`` (``fc``, ``classifier.6``, ``heads.head``, ...)."""
    linears = [name for name, m in runtime.unwrap(model).named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{type(model).__name__} has no Linear classifier to replace (a conv classifier, as in "
                        f"squeezenet, is not supported)")
    return linears[-1]


def _replace_head(model: nn.Module, num_classes: int) -> None:
    name = head_name(model)
    last = model.get_submodule(name)
    model.set_submodule(name, nn.Linear(last.in_features, num_classes, bias=last.bias is not None,
                                        device=last.weight.device, dtype=last.weight.dtype))


def build_model(arch: str, num_classes: int, *, weights: str = "none") -> nn.Module:
    """Build ``arch`` with pretrained weights (optional) and a new ``num_classes`` head.

    See :func:`build_pretrained`, which also says which parameters came from ``weights``.
    """
    return build_pretrained(arch, num_classes, weights=weights)[0]


def build_pretrained(arch: str, num_classes: int, *, weights: str = "none") -> tuple[nn.Module, list[str]]:
    """Build ``arch`` with pretrained weights (optional) and a new ``num_classes`` head.

    Parameters
    ----------
    arch : one of ARCHS
    num_classes : int >= 2
    weights : "none", "DEFAULT" (torchvision's weights, downloaded once into the
        torch cache; or any name of the arch's weights enum, e.g.
        "IMAGENET1K_V1"), or the path of a file holding

        * an ImageNet ``state_dict`` of the arch (``torch.save(model.state_dict(), path)``);
        * an ONNX model (``.onnx``) or Keras weights (``.h5`` / ``.weights.h5``, needs
          h5py) whose conv kernels include the arch's conv stack, in order (see
          :mod:`importers`): the convs are taken from it, and the hidden FC layers
          where their shapes match torchvision's.

    Returns
    -------
    model : nn.Module
        The pretrained weights are loaded first, then ``classifier[-1]`` is replaced.
    pretrained : list of str
        Names of the parameters that came from ``weights`` (empty for "none"); the
        others (the new head, FC layers a foreign file lacks) are freshly initialised.
    """
    check_arch(arch)
    if num_classes < 2:
        raise UserError(f"need at least 2 classes, got {num_classes}")
    model = torchvision_model(arch)
    if weights.lower() == "none":
        _replace_head(model, num_classes)
        return model, []
    if os.path.lexists(weights):
        # Before anything opens it: a FIFO blocks a reader forever, a link to /dev/zero never ends.
        check_input_file(weights, what="weights file")
        size = os.path.getsize(weights)
        if size > MAX_WEIGHTS_BYTES:
            raise UserError(f"weights file {weights} holds {size} bytes, more than any {arch} weights "
                            f"({MAX_WEIGHTS_BYTES} at most); refused before reading")
        if importers.file_kind(weights) == "torch":
            _load_state_dict_file(model, weights, arch)
            loaded_modules = None  # everything
        else:
            if arch not in ARCHS:
                raise UserError(f"--weights {weights}: ONNX and Keras files are read for the VGG and AlexNet conv "
                                f"stacks only ({', '.join(ARCHS)}), not {arch}; give a state_dict of {arch}")
            foreign = importers.read_layers(weights)
            result = importers.load_into(model, foreign, arch=arch)
            loaded_modules = result["loaded"]
            logger.info("weights from %s (%s): %s", weights, foreign.kind, _layer_summary(result))
    else:
        _load_torchvision_weights(model, weights, arch)
        loaded_modules = None
    head = head_name(model)
    _replace_head(model, num_classes)
    if loaded_modules is None:
        pretrained = [n for n, _ in model.named_parameters() if not n.startswith(head + ".")]
    else:
        prefixes = tuple(m + "." for m in loaded_modules)
        pretrained = [n for n, _ in model.named_parameters() if n.startswith(prefixes)]
    return model, pretrained


def _layer_summary(result: dict[str, list[str]]) -> str:
    return (f"loaded {len(result['loaded'])} layers ({short_list(result['loaded'], 8)}); fresh: "
            f"{short_list(result['fresh'], 8)}; ignored in the file: {short_list(result['ignored'], 8)}")


def _non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _load_state_dict_file(model: nn.Module, path: str, arch: str) -> None:
    """Load a state_dict file into ``model`` (torchvision's ``arch``, ImageNet head).

    The head is replaced after loading, so a file whose head alone differs in shape (a model
    fine-tuned on another number of classes) is loaded without it.  Anything else that does not
    fit, and non-finite values, are one line naming what and how many.
    """
    state = _torch_load(path, what="weights file")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} does not hold a state_dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    head = head_name(model) + "."
    # The head is replaced after loading: whatever the file holds there (another number of
    # classes, no bias, nothing) is never loaded, and only the rest has to fit.
    file_head = [k for k in state if k.startswith(head)]
    if any(k not in expected or state[k].shape != expected[k].shape for k in file_head):
        logger.info("weights file %s: its head (%s) is not %s's ImageNet one; a new head is made for the data's "
                    "classes either way", path, head[:-1], arch)
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    body = [k for k in expected if not k.startswith(head)]
    # BatchNorm fills in a missing num_batches_tracked itself (files from before it existed).
    missing = [k for k in body if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    other_shape = [k for k in body if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {arch}'s tensors missing ({short_list(missing, 3)})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors {arch} does not have ({short_list(unexpected, 3)})")
    if other_shape:
        k = other_shape[0]
        problems.append(f"{len(other_shape)} of another shape ({k}: {list(state[k].shape)} in the file, "
                        f"{list(expected[k].shape)} in {arch})")
    if problems:
        raise UserError(f"weights file {path} is not a state_dict of {arch}: {'; '.join(problems)}")
    not_finite = _non_finite(state)
    if not_finite:
        raise UserError(f"weights file {path}: {short_list(not_finite, 3)} "
                        f"{'holds' if len(not_finite) == 1 else 'hold'} NaN or infinite values")
    try:
        # Not strict: the head is left out on purpose, and a file without num_batches_tracked
        # keeps the model's own (a count, not a weight).
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # e.g. a dtype PyTorch cannot copy
        first = str(exc).strip().splitlines()
        raise UserError(f"weights file {path} is not a state_dict of {arch}: "
                        f"{(first[1].strip() if len(first) > 1 else first[0])[:200]}") from None


def _load_torchvision_weights(model: nn.Module, weights: str, arch: str) -> None:
    try:
        enum = torchvision.models.get_model_weights(arch)
        chosen = enum[weights] if weights in enum.__members__ else enum.verify(weights)
    except (KeyError, ValueError):
        raise UserError(f"--weights {weights!r} is neither 'none', 'DEFAULT', a weights name of {arch} "
                        f"({', '.join(enum.__members__)}) nor an existing file") from None
    try:
        state = chosen.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # urllib/OSError/hash errors: all mean "no weights"
        raise UserError(f"could not download the {arch} ImageNet weights ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); offline, use "
                        f"--weights none or --weights FILE with a saved state_dict") from None
    if arch in AUX_ARCHS:  # their weights carry the auxiliary classifiers this tool builds without
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # e.g. ViT weights for another image size (position embeddings)
        detail = str(exc).strip().splitlines()
        raise UserError(f"--weights {weights} do not fit torchvision's default {arch}: "
                        f"{(detail[1] if len(detail) > 1 else detail[0]).strip()[:200]}") from None


def feature_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters outside the classifier (frozen by ``--freeze_features``): outside the model's
    ``classifier`` block where it has one holding the head (VGG's and AlexNet's three FC layers,
    as before; MobileNet's, EfficientNet's, DenseNet's head), else outside the head itself."""
    net = runtime.unwrap(model)
    name = head_name(net)
    block = "classifier" if name == "classifier" or name.startswith("classifier.") else name
    head = {id(p) for p in net.get_submodule(block).parameters()}
    return [p for p in runtime.unwrap(model).parameters() if id(p) not in head]


def save_model(path: str, model: nn.Module, *, arch: str, classes: list[str], image_size: int,
               meta: dict[str, Any] | None = None) -> None:
    """Save ``model`` as a dict of plain data (see module docstring), atomically.

    Refuses (ValueError) a model with non-finite weights: no saved model ever holds
    NaN or Inf.
    """
    model = runtime.unwrap(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = _non_finite(state)
    if bad:
        raise ValueError(f"refusing to save a model with non-finite weights in {', '.join(bad[:3])}")
    payload = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "arch": arch,
        "classes": list(classes),
        "image_size": int(image_size),
        "plan": decompositions.model_plan(model),
        "state_dict": state,
        "meta": meta or {},
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with atomic_open(path, "wb") as fh:
        torch.save(payload, fh)
    logger.info("saved %s (%s, %d parameters)", path, arch, sum(v.numel() for v in state.values()))


def save_checkpoint(path: str, state: dict[str, Any], *, config: dict[str, Any]) -> None:
    """Write a training checkpoint (``finetune.training_checkpoint``) atomically, with the run's options.

    Plain data only, like model files: :func:`load_checkpoint` reads it weights-only.  Like
    :func:`save_model` it creates the folder (the first checkpoint comes before the model).
    """
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_open(path, "wb") as fh:
            torch.save({**state, "config": config}, fh)
    except OSError as exc:
        raise UserError(f"cannot write the checkpoint {path}: {exc.strerror or type(exc).__name__}") from None


def _capped(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_checkpoint(path: str, *, config: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint of :func:`save_checkpoint`, refusing one written by a run with other options.

    Raises
    ------
    errors.UserError
        For a missing, non-regular or unreadable file, one that is not a checkpoint, or
        ``config`` entries that differ from the checkpoint's (each difference named).
    """
    from finetune import CHECKPOINT_FORMAT

    state = _torch_load(path, what="checkpoint")
    if (not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT
            or not isinstance(state.get("config"), dict)):
        raise UserError(f"{path} is not a training checkpoint of this tool")
    saved = state["config"]
    # The options are plain values (a file could hold anything there: compared only as such).
    plain = (type(None), bool, int, float, str)
    # Each value capped (a path, a file's edited string), three of them quoted, options the file
    # has first (then those it lacks: a file from an older version).
    # Options written only when on (cpu_bf16, rate_probe, fresh_lr) count when the file has them.
    keys = sorted(config, key=lambda k: k not in saved) + [k for k in saved if k not in config]
    differ = [f"{key} {_capped(repr(saved.get(key)))} there, {_capped(repr(config.get(key)))} here"
              for key in keys if not isinstance(saved.get(key), plain) or saved.get(key) != config.get(key)]
    if differ:
        raise UserError(f"checkpoint {path} is from a run with other options ({short_list(differ, 3, sep='; ')}); "
                        f"resume with the interrupted run's options, or drop --resume to start over")
    return state


def check_input_file(path: str, *, what: str) -> None:
    """UserError unless ``path`` is an existing regular file (a FIFO would block a reader forever)."""
    if not os.path.exists(path):
        raise UserError(f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise UserError(f"{what} {path} is not a regular file (a FIFO, device or socket)")


def _check_archive(path: str, *, what: str) -> None:
    """Refuse a zip archive whose entries declare far more bytes than the file holds."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a readable zip: torch.load names the problem
    if declared > size * MAX_ZIP_EXPANSION + ZIP_SLACK_BYTES:
        raise UserError(f"{what} {path} declares {declared} bytes inside a {size}-byte file: a compressed archive "
                        f"(model files are stored uncompressed), refused before reading")


def _torch_load(path: str, *, what: str) -> Any:
    check_input_file(path, what=what)
    _check_archive(path, what=what)
    try:
        # weights_only=True: tensors and plain containers only; pickled code
        # (classes, functions, __reduce__ payloads) is refused without running it.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # a class or function to import: running it is refused
            raise UserError(f"refused to load {path}: it holds pickled objects other than tensors "
                            f"(code would run); only weights-only files are read") from None
        raise UserError(f"{what} {path} is {_file_kind(path)}, not a PyTorch file written by torch.save") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure of a foreign/garbled file
        # Truncated zips, text files, old-format garbage: torch raises RuntimeError,
        # EOFError, BadZipFile, KeyError, ... depending on where parsing stops.
        kind = _file_kind(path)
        if kind not in ("a zip archive", "a plain pickle"):  # not torch.save's output at all
            raise UserError(f"{what} {path} is {kind}, not a PyTorch file written by torch.save") from None
        detail = str(exc).strip().split("\n")[0] or type(exc).__name__
        raise UserError(f"{what} {path} is truncated or not a model file ({type(exc).__name__}: {detail})") from None


#: Leading bytes of the formats a wrong file usually is, and how to name them.
_MAGIC = ((b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras weights go to --weights)"),
          (b"PK\x03\x04", "a zip archive"), (b"\x80", "a plain pickle"))


def _file_kind(path: str) -> str:
    """What a file that torch.load could not read is, going by its first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if path.lower().endswith(".onnx"):
        return "an ONNX file (ONNX models go to --weights)"
    return "neither a zip archive nor a pickle"


#: Tensor types a model file may hold: floating weights (converted to float32) and integer buffers.
_FILE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8,
                torch.int8, torch.int16, torch.bool)


def _float32_weights(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """The state_dict with every floating tensor in float32; non-finite weights refused.

    The tool trains and evaluates in float32 (autocast on GPU): a file saved in half or
    double precision (by another script) is converted, with a warning, rather than fail
    later with a dtype mismatch deep in a forward pass.
    """
    # A tensor is checked against the storage the file holds for it before any element is read:
    # a view with stride 0 (or overlapping strides) can claim 10^12 elements in a 2 kB file.
    for key, v in state.items():
        if v.numel() * v.element_size() > v.untyped_storage().nbytes():
            raise UserError(f"model file {path}: tensor {key!r} of shape {tuple(v.shape)} is larger than the data "
                            f"stored for it (a strided view)")
        if v.is_complex() or v.dtype not in _FILE_DTYPES:
            raise UserError(f"model file {path}: tensor {key!r} has dtype {str(v.dtype).replace('torch.', '')}, "
                            f"not a real floating or integer type")
    other = sorted({str(v.dtype).replace("torch.", "") for v in state.values()
                    if v.is_floating_point() and v.dtype != torch.float32})
    if other:
        warnings.warn(f"model file {path} holds {', '.join(other)} weights: converted to float32", stacklevel=3)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    bad = _non_finite(state)
    if bad:
        raise UserError(f"model file {path} has non-finite weights (NaN or Inf) in {short_list(bad, 3)}")
    return state


def load_model(path: str, *, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a model file written by :func:`save_model`.

    Returns
    -------
    model : nn.Module on ``device``, in eval mode
    info : dict with "arch", "classes", "image_size", "plan", "meta"
    """
    payload = _torch_load(path, what="model file")
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        raise UserError(f"{path} is not a model file of this tool (no '{FILE_FORMAT}' format tag)")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise UserError(f"model file {path} lacks {', '.join(missing)}")
    version = payload["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"model file {path} has a malformed format version {str(version)[:20]!r}")
    if version > FILE_VERSION:
        raise UserError(f"model file {path} has format version {version}; this tool reads up to {FILE_VERSION}")
    arch, classes, plan = payload["arch"], payload["classes"], payload["plan"]
    if not isinstance(arch, str):
        raise UserError(f"model file {path} has a malformed architecture name")
    check_arch(arch)
    if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes)
            or not isinstance(plan, dict)):
        raise UserError(f"model file {path} has a malformed class list or plan")
    image_size = payload["image_size"]
    if not isinstance(image_size, int) or isinstance(image_size, bool):
        raise UserError(f"model file {path} has a malformed image size {str(image_size)[:20]!r}")
    try:
        check_image_size(arch, image_size)
    except UserError as exc:
        raise UserError(f"model file {path}: {exc}") from None
    meta = payload.get("meta", {})
    if not isinstance(meta, dict):
        raise UserError(f"model file {path} has malformed metadata (a {type(meta).__name__}, not a mapping)")
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"model file {path} has a malformed state_dict (expected a mapping of names to tensors)")
    state = _float32_weights(state, path)
    try:
        # Build on the meta device: no memory or time spent on weights about to be replaced
        # (on the CPU for the builders that compute with tensors while they build: regnet).
        try:
            with torch.device("meta"):
                model = torchvision_model(arch)
        except (RuntimeError, NotImplementedError):
            model = torchvision_model(arch)
        with torch.device(next(model.parameters()).device):
            _replace_head(model, len(classes))
            decompositions.apply_plan(model, plan)
        expected = {k: t.dtype for k, t in model.state_dict().items()}
        wrong = [k for k, v in state.items() if k in expected and v.dtype != expected[k]]
        if wrong:
            raise UserError(f"model file {path}: {wrong[0]!r} is {str(state[wrong[0]].dtype).replace('torch.', '')}, "
                            f"the model's is {str(expected[wrong[0]]).replace('torch.', '')}")
        model.load_state_dict(state, strict=True, assign=True)
    except UserError:
        raise
    except (ValueError, RuntimeError) as exc:
        detail = str(exc).strip().splitlines()
        raise UserError(f"model file {path} does not match its architecture {arch}: "
                        f"{detail[1].strip() if len(detail) > 1 else detail[0]}") from None
    for module in model.modules():
        if isinstance(module, decompositions.DiagonalLinear):
            module.reset_index_buffers()
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise UserError(f"model file {path} lacks tensors for {', '.join(leftover[:3])}")
    model.to(device).eval()
    info = {k: payload[k] for k in ("arch", "classes", "image_size", "plan")}
    info["meta"] = meta
    return model, info
