"""Image folders -> torchvision ``ImageFolder`` datasets and ``DataLoader`` objects.

A dataset folder has one subfolder per class (the torchvision ``ImageFolder``
layout)::

    root/
    ├── cat/
    │   ├── 001.jpg
    │   └── ...
    └── dog/
        └── ...

Problems with the user's folders (missing, no classes, an empty class, train and
test classes that differ, every image of a class unreadable) raise
:class:`errors.UserError` with a one-line message. Unreadable image files are
found once, up front, and skipped with one warning; a file that still fails to
decode later, at load time, raises :class:`ImageLoadError` naming the file.

Hidden entries (names starting with ``.``, such as ``.ipynb_checkpoints/`` or
macOS ``._photo.jpg`` resource forks) are ignored, unlike plain ``ImageFolder``,
which would make them a class or try to decode them.
"""

from __future__ import annotations

import logging
import os
import signal
import warnings
from collections.abc import Sequence
from typing import Callable, Optional, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from errors import UserError

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# ImageNet statistics; the pretrained torchvision weights expect inputs
# normalized with them, and fine-tuning keeps the same input distribution.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Area range of RandomResizedCrop when fine-tuning. The ImageNet default lower
# bound of 0.08 suits training from scratch on 1.28M images; on a small
# fine-tuning set such tight crops often cut the object out of the picture, so
# keep at least about a third of the image.
TRAIN_CROP_SCALE = (0.35, 1.0)

# Evaluation crops the central 87.5% of the image: resize the short side to
# image_size / 0.875 (256 for 224), then center-crop image_size (torchvision
# reference recipe).
TEST_CROP_RATIO = 0.875

# How many offending names a warning or an error message lists before "...".
MAX_NAMES_SHOWN = 3


class ImageLoadError(UserError):
    """An image file that passed the up-front scan but failed to load.

    DataLoader workers send exceptions to the main process as
    ``type(exc)(text)``, where ``text`` is the worker's whole formatted
    traceback. To keep the command line's one-line ``error:`` message, the
    constructor recovers our own message from the last line of such a text.
    """

    def __init__(self, message: str) -> None:
        lines = message.strip().splitlines()
        if len(lines) > 1:
            tag = f"{type(self).__name__}: "
            for line in reversed(lines):
                if tag in line:
                    message = line.split(tag, 1)[1]
                    break
        super().__init__(message)


def _one_line(exc: BaseException) -> str:
    """Why Pillow failed, on one line (callers name the file themselves)."""
    if isinstance(exc, UnidentifiedImageError):
        # Its own text is "cannot identify image file <_io.BufferedReader name=...>".
        return "not a recognised image format"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _preview(names: Sequence[str], *, limit: int = MAX_NAMES_SHOWN, quote: bool = True) -> str:
    """``'a', 'b', 'c'`` plus ``and N more`` when there are more than ``limit``."""
    shown = ", ".join(repr(str(n)) if quote else str(n) for n in names[:limit])
    if len(names) > limit:
        shown += f" and {len(names) - limit} more"
    return shown


def _check_positive_int(name: str, value: object, *, minimum: int = 1) -> None:
    # bool is an int subclass, but ``batch_size=True`` is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _list_classes(root: str) -> list[str]:
    """Sorted non-hidden subfolder names of ``root`` (symlinks followed)."""
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not _is_hidden(e.name))


def _walk_images(class_dir: str) -> tuple[list[str], list[str]]:
    """Image files under ``class_dir``, recursively, in ``ImageFolder`` order, and the folders skipped.

    Linked folders are followed, but each real folder is read once and none outside
    ``class_dir``: ``os.walk(followlinks=True)`` loops forever on ``loop -> ..``, lists a
    folder again for every link to it, and ``up -> ..`` would label the other classes'
    images as this class.  Hidden folders are not entered.
    """
    top = os.path.realpath(class_dir)
    seen: set[str] = set()
    folders: list[tuple[str, list[str]]] = []
    skipped: list[str] = []
    pending = [class_dir]
    while pending:
        folder = pending.pop()
        real = os.path.realpath(folder)
        if real != top and not real.startswith(top + os.sep):
            skipped.append(f"{folder} (links outside {class_dir})")
            continue
        if real in seen:
            skipped.append(f"{folder} (a folder already read)")
            continue
        seen.add(real)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skipped.append(f"{folder} ({exc.strerror or type(exc).__name__})")
            continue
        files = [e.path for e in entries if not _is_hidden(e.name) and _has_image_extension(e.name)
                 and e.is_file()]
        folders.append((folder, files))
        pending.extend(e.path for e in reversed(entries) if not _is_hidden(e.name) and e.is_dir())
    # Sorted by folder path, as sorted(os.walk(...)) orders ImageFolder's samples.
    return [f for _, files in sorted(folders) for f in files], skipped


def _list_images(class_dir: str) -> list[str]:
    """Image files under ``class_dir`` (see :func:`_walk_images`)."""
    return _walk_images(class_dir)[0]


def check_image_folder(path: PathLike, *, role: str) -> list[str]:
    """Check that ``path`` is a usable image-classification folder.

    Only names are looked at (no image is opened), so this is cheap.

    Parameters
    ----------
    path : str or os.PathLike
        Folder with one subfolder of images per class.
    role : str
        What the folder is for (``"train"``, ``"test"``), used in messages.

    Returns
    -------
    list of str
        The class names, sorted (class ``i`` is ``classes[i]``).

    Raises
    ------
    errors.UserError
        If ``path`` is missing or not a directory, has no class subfolders, has
        a class folder without image files, or has fewer than 2 classes.
    """
    root = os.fspath(path)
    if not os.path.exists(root):
        raise UserError(f"{role} folder {root} does not exist")
    if not os.path.isdir(root):
        raise UserError(f"{role} folder {root} is not a directory")
    classes = _list_classes(root)
    if not classes:
        raise UserError(
            f"{role} folder {root} has no class subfolders "
            f"(expected {os.path.join(root, '<class>', '<image>')})"
        )
    # A class folder that is a link to another class (or into one) would give the same images
    # two labels.
    real = {c: os.path.realpath(os.path.join(root, c)) for c in classes}
    for a in sorted(classes, key=lambda c: not os.path.islink(os.path.join(root, c))):  # name a link first
        for b in classes:
            if a != b and (real[a] == real[b] or real[a].startswith(real[b] + os.sep)):
                where = "the same folder as" if real[a] == real[b] else "inside"
                raise UserError(f"{role} folder {root}: class folder {a!r} is {where} {b!r} (a link): its images "
                                f"would get two labels")
    empty = [c for c in classes if not _list_images(os.path.join(root, c))]
    if empty:
        raise UserError(
            f"{role} folder {root}: class folder(s) {_preview(empty)} contain no images "
            f"(extensions {', '.join(IMG_EXTENSIONS)})"
        )
    if len(classes) < 2:
        raise UserError(
            f"{role} folder {root} has only 1 class ({classes[0]!r}); a classifier needs at least 2"
        )
    return classes


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as a 3-channel RGB image (grey, RGBA, palette, CMYK, ...)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # 16-bit and float pixels: Pillow's convert clips them to 0..255 (a 16-bit scan turns
        # white, a float image in 0..1 black); scaled to 8 bits by their type's range instead.
        values = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0          # 0..65535 -> 0..255
        elif img.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0          # 0..1 -> 0..255
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        # Going through RGBA avoids Pillow's warning about palette transparency.
        img = img.convert("RGBA")
    return img.convert("RGB")


class ToRGB:
    """Transform that converts a PIL image to RGB (see :func:`to_rgb`)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_rgb(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: Images more elongated than this are treated as unreadable (see :func:`load_rgb`).
MAX_ASPECT_RATIO = 50


def load_rgb(path: str) -> Image.Image:
    """Decode the image at ``path`` fully, as RGB.

    Raises
    ------
    ImageLoadError
        If the file cannot be read or decoded; the message names the file.
    """
    try:
        # Open through a file object so the file is closed at once
        # (https://github.com/python-pillow/Pillow/issues/835).
        with open(path, "rb") as f:
            img = Image.open(f)
            # Checked from the header, before decoding: resizing the short side to the
            # network's size scales the long side too (a 1 x 100000 px strip of a few hundred
            # bytes would become 256 x 25.6M px, 20 GB).
            width, height = img.size
            if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
                raise ValueError(f"{width} x {height} px: an aspect ratio beyond {MAX_ASPECT_RATIO}:1")
            img.load()  # decode now, while the file is open (RGB is not converted)
            return to_rgb(img)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise ImageLoadError(f"cannot load image {path}: {_one_line(exc)}") from exc


def build_transforms(image_size: int, *, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """Preprocessing of a PIL image into a normalized ``(3, image_size, image_size)`` tensor.

    Parameters
    ----------
    image_size : int
        Side of the square network input, e.g. 224.
    train : bool
        ``True``: random resized crop (area in :data:`TRAIN_CROP_SCALE`) and
        horizontal flip. ``False``: resize the short side to
        ``round(image_size / TEST_CROP_RATIO)`` and center-crop ``image_size``.

    Returns
    -------
    torchvision.transforms.Compose
        Any PIL mode is converted to RGB first; the output is normalized with
        :data:`IMAGENET_MEAN` and :data:`IMAGENET_STD`.

    References
    ----------
    .. [1] torchvision classification reference scripts, ``presets.py``:
       https://github.com/pytorch/vision/tree/main/references/classification
    """
    _check_positive_int("image_size", image_size)
    if train:
        geometry = [
            transforms.RandomResizedCrop(image_size, scale=TRAIN_CROP_SCALE),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        geometry = [
            transforms.Resize(round(image_size / TEST_CROP_RATIO)),
            transforms.CenterCrop(image_size),
        ]
    return transforms.Compose(
        [
            ToRGB(),
            *geometry,
            transforms.ToTensor(),  # uint8 HWC [0, 255] -> float CHW [0, 1]
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ScannedImageFolder(ImageFolder):
    """An ``ImageFolder`` over a sample list that was scanned beforehand.

    It has the usual ``classes``, ``class_to_idx``, ``samples`` and ``targets``
    attributes; the unreadable files found by the scan are simply not in
    ``samples``. Images are loaded with :func:`load_rgb`.
    """

    def __init__(
        self,
        root: PathLike,
        *,
        classes: Sequence[str],
        samples: Sequence[tuple[str, int]],
        transform: Optional[Callable] = None,
    ) -> None:
        # ImageFolder.__init__ calls find_classes and make_dataset below.
        self._scanned = (list(classes), list(samples))
        super().__init__(os.fspath(root), transform=transform, loader=load_rgb)
        del self._scanned

    def find_classes(self, directory: PathLike) -> tuple[list[str], dict[str, int]]:
        classes = self._scanned[0]
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(  # type: ignore[override]  # a staticmethod in DatasetFolder
        self,
        directory: PathLike,
        class_to_idx: dict[str, int],
        extensions: Optional[tuple[str, ...]] = None,
        is_valid_file: Optional[Callable[[str], bool]] = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        return self._scanned[1]


# A JPEG ends with the end-of-image marker; encoders may pad a few bytes after it.
JPEG_END_MARKER = b"\xff\xd9"
JPEG_TAIL_BYTES = 64


def _check_jpeg_end(f) -> None:
    """OSError when a JPEG file lacks its end-of-image marker near the end: it is truncated.

    ``Image.verify()`` reads only a JPEG's header, so a file cut short (an interrupted
    download or copy) passes it and fails only when decoded, in the middle of training.
    """
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - JPEG_TAIL_BYTES))
    if JPEG_END_MARKER not in f.read():
        raise OSError("truncated JPEG: no end-of-image marker")


def _scan_folder(root: str, classes: Sequence[str], *, role: str, limit: int | None = None,
                 seed: int = 0) -> list[tuple[str, int]]:
    """List the samples of ``root`` and drop the files Pillow cannot verify.

    ``Image.verify()`` reads the header and, for PNG, checks every chunk's CRC,
    without decoding pixels; this finds non-images, empty and most broken files
    at a fraction of the cost of a decode; a JPEG must also end with its end-of-image
    marker (a truncated JPEG passes ``verify``).  What it still misses raises
    :class:`ImageLoadError` when loaded.

    ``limit``: only that many samples, drawn in a seeded random order and verified until
    that many pass (a calibration set of 256 images from a folder of a million files reads
    about 256 files, not the folder); every class need not be among them.
    """
    candidates, skipped = [], []
    for idx, cls in enumerate(classes):
        paths, passed = _walk_images(os.path.join(root, cls))
        candidates += [(path, idx) for path in paths]
        skipped += passed
    if skipped:
        warnings.warn(f"skipped {len(skipped)} linked folder(s) in {role} folder {root}: "
                      f"{_preview(skipped, quote=False)}", stacklevel=3)
    if limit is not None:
        order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed)).tolist()
        candidates = [candidates[i] for i in order]
    samples, bad = [], []
    for path, idx in tqdm(candidates, desc=f"checking {role} images", unit="img",
                          leave=False, disable=None):
        if limit is not None and len(samples) >= limit:
            break
        try:
            with open(path, "rb") as f:
                image = Image.open(f)
                fmt = image.format
                image.verify()
                if fmt == "JPEG":
                    _check_jpeg_end(f)
        except Exception as exc:  # Pillow raises many exception types for bad files
            bad.append(f"{path} ({_one_line(exc)})")
        else:
            samples.append((path, idx))
    if bad:
        warnings.warn(
            f"skipped {len(bad)} unreadable image file(s) in {role} folder {root}: {_preview(bad, quote=False)}",
            stacklevel=3,
        )
    if limit is not None:
        if not samples:
            raise UserError(f"{role} folder {root}: every image is unreadable")
        return sorted(samples)  # folder order: batches do not depend on the draw's order
    present = {idx for _, idx in samples}
    emptied = [c for i, c in enumerate(classes) if i not in present]
    if emptied:
        raise UserError(
            f"{role} folder {root}: every image of class(es) {_preview(emptied)} is unreadable"
        )
    return samples


def build_datasets(
    train_path: Optional[PathLike],
    test_path: Optional[PathLike],
    *,
    image_size: int,
) -> tuple[Optional[ScannedImageFolder], Optional[ScannedImageFolder], list[str]]:
    """Build the train and test datasets from two class folders.

    Parameters
    ----------
    train_path, test_path : str, os.PathLike or None
        Class folders (see :func:`check_image_folder`). Either may be ``None``
        (evaluation needs only a test folder), not both.
    image_size : int
        Network input size, see :func:`build_transforms`.

    Returns
    -------
    train_ds, test_ds : ScannedImageFolder or None
        ``None`` where the path was ``None``. Train uses the augmenting
        transforms, test the deterministic ones.
    classes : list of str
        Sorted class names, the same for both folders.

    Raises
    ------
    errors.UserError
        For the folder problems of :func:`check_image_folder`, when the test
        classes differ from the train classes, or when every image of a class is
        unreadable. Unreadable files are otherwise skipped with one warning.
    """
    _check_positive_int("image_size", image_size)
    if train_path is None and test_path is None:
        raise ValueError("build_datasets needs train_path or test_path, got neither")
    # Check every folder before the (slower) image scan so mistakes fail fast.
    folders = {}
    for role, path in (("train", train_path), ("test", test_path)):
        if path is not None:
            root = os.fspath(path)
            folders[role] = (root, check_image_folder(root, role=role))
    if len(folders) == 2:
        (train_root, train_classes), (test_root, test_classes) = folders["train"], folders["test"]
        if train_classes != test_classes:
            only_train = sorted(set(train_classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(train_classes))
            raise UserError(
                f"test folder {test_root} must have the same classes as train folder {train_root}: "
                f"only in train: [{_preview(only_train)}]; only in test: [{_preview(only_test)}]"
            )

    datasets: dict[str, ScannedImageFolder] = {}
    for role, (root, classes) in folders.items():
        samples = _scan_folder(root, classes, role=role)
        datasets[role] = ScannedImageFolder(
            root, classes=classes, samples=samples,
            transform=build_transforms(image_size, train=role == "train"),
        )
        logger.info("%s: %d images in %d classes from %s", role, len(samples), len(classes), root)
    classes = next(iter(folders.values()))[1]
    return datasets.get("train"), datasets.get("test"), classes


def _ignore_interrupts(worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which shuts them down.

    Ctrl-C reaches the whole process group; a worker that handled it would print its own
    KeyboardInterrupt traceback next to the main process's one-line message.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ShardSampler(Sampler[int]):
    """Every ``num_replicas``-th index from ``rank`` on, in order: a rank's share of a test set.

    Unlike ``DistributedSampler`` nothing is repeated to even out the shares (it pads
    with duplicates, which a sum over the ranks would count twice); the shares differ by
    at most one sample, which evaluation (no collective per batch) does not mind.
    """

    def __init__(self, length: int, *, num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        if num_replicas is None or rank is None:
            import torch.distributed as dist

            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.indices = range(rank, length, num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(
    train_ds: Optional[Dataset],
    test_ds: Optional[Dataset],
    *,
    batch_size: int,
    workers: int,
    distributed: bool = False,
    seed: int = 0,
    num_replicas: Optional[int] = None,
    rank: Optional[int] = None,
) -> tuple[Optional[DataLoader], Optional[DataLoader], Optional[DistributedSampler]]:
    """Wrap the datasets in DataLoaders.

    Parameters
    ----------
    train_ds, test_ds : Dataset or None
        ``None`` gives a ``None`` loader.
    batch_size : int
        Images per batch (per process when distributed).
    workers : int
        Loader worker processes; 0 loads in the main process. With workers,
        they persist across epochs (no re-fork per epoch).
    distributed : bool
        Train with a shuffled ``DistributedSampler``; give each rank every
        ``world_size``-th test image (:class:`ShardSampler`, no padding), so that
        the ranks' summed test figures equal a single process's exactly.
    seed : int
        Seeds the train shuffling and the worker RNGs (random augmentation).
    num_replicas, rank : int, optional
        This process's place; by default ``torch.distributed`` is asked. Only with
        ``distributed=True``.

    Returns
    -------
    train_loader, test_loader : DataLoader or None
    train_sampler : DistributedSampler or None
        Call ``train_sampler.set_epoch(epoch)`` every epoch so that each epoch
        is shuffled differently; ``None`` when not distributed.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("workers", workers, minimum=0)
    if not distributed and (num_replicas is not None or rank is not None):
        raise ValueError(
            f"num_replicas={num_replicas!r} and rank={rank!r} need distributed=True"
        )
    common = dict(
        batch_size=batch_size,
        num_workers=workers,
        # Page-locked host memory only helps copies to a GPU.
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        worker_init_fn=_ignore_interrupts if workers > 0 else None,
    )

    train_loader = train_sampler = None
    if train_ds is not None:
        # The generator also seeds each worker's RNGs, so the random crops and
        # flips are reproducible for a given seed and worker count.
        generator = torch.Generator().manual_seed(seed)
        if distributed:
            train_sampler = DistributedSampler(
                train_ds, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed
            )
            train_loader = DataLoader(train_ds, sampler=train_sampler, generator=generator,
                                      drop_last=len(train_sampler) % batch_size == 1, **common)
        else:
            # A last batch of one image is dropped: BatchNorm in training mode cannot normalize
            # one value per channel (ResNets reach 1x1 feature maps at small image sizes).
            train_loader = DataLoader(train_ds, shuffle=True, generator=generator,
                                      drop_last=len(train_ds) % batch_size == 1, **common)

    test_loader = None
    if test_ds is not None:
        test_sampler = ShardSampler(len(test_ds), num_replicas=num_replicas, rank=rank) if distributed else None
        test_loader = DataLoader(test_ds, sampler=test_sampler, shuffle=False, **common)
    return train_loader, test_loader, train_sampler


def build_calibration_loader(
    path: PathLike,
    *,
    image_size: int,
    images: int,
    batch_size: int,
    workers: int,
    seed: int = 0,
) -> tuple[DataLoader, list[str]]:
    """A calibration set: ``images`` images drawn at random (seeded) from a class folder.

    The deterministic test-time transforms (no augmentation: the statistics must be those
    of the images the model will see) at the model's ``image_size``; batches in a fixed
    order.  Unreadable files are skipped with one warning, as for training.  Returns the
    loader and the folder's classes.
    """
    _check_positive_int("images", images)
    _check_positive_int("batch_size", batch_size)
    root = os.fspath(path)
    classes = check_image_folder(root, role="train")
    # Only the drawn images are verified (and read): not the whole training folder.
    samples = _scan_folder(root, classes, role="train", limit=images, seed=seed)
    dataset = ScannedImageFolder(root, classes=classes, samples=samples,
                                 transform=build_transforms(image_size, train=False))
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=False, num_workers=workers,
                        worker_init_fn=_ignore_interrupts if workers > 0 else None)
    logger.info("calibration: %d images drawn from %s", len(dataset), root)
    return loader, classes
