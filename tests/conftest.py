"""Shared pytest fixtures: tiny, learnable image folders.

``make_image_folder`` is a plain function (``from conftest import
make_image_folder``) for tests that need a non-default folder; the
``image_folder`` fixture gives the default two-class one.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
# Make the project modules importable however pytest is started
# (``python -m pytest`` adds the working directory, plain ``pytest`` does not).
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# pytest.ini runs the suite in two pytest-xdist workers, one per core of the CI machine.  Two
# processes that each start an OpenMP team of every core stall each other (the teams spin-wait
# for threads the other process holds), so each worker, and every process it starts, computes on
# one thread: the two workers then use the two cores without oversubscribing them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Pixel levels of the synthetic images: a dim background with one bright
# horizontal band whose position encodes the class, plus Gaussian noise.
BACKGROUND_LEVEL = 40
BAND_LEVEL = 215
NOISE_STD = 25

IMAGE_MODES = ("RGB", "L", "RGBA", "P")


def _class_image(label: int, n_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``(size, size, 3)`` uint8 image of class ``label``.

    The height is cut into ``n_classes`` horizontal bands and band ``label`` is
    bright, so with two classes class 0 is bright in the top half and class 1
    in the bottom half. Top/bottom rather than left/right because training
    uses random horizontal flips, which would swap left and right. The tint is
    random per image, so only the band's position tells the classes apart.
    """
    img = np.full((size, size, 3), BACKGROUND_LEVEL, dtype=np.float64)
    lo = label * size // n_classes
    hi = (label + 1) * size // n_classes
    tint = rng.uniform(0.7, 1.0, size=3)  # per-image colour, same brightness range
    img[lo:hi, :, :] = BAND_LEVEL * tint  # (rows, cols, channels): rows lo..hi
    img += rng.normal(0.0, NOISE_STD, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _to_mode(rgb: np.ndarray, mode: str) -> Image.Image:
    img = Image.fromarray(rgb)  # (H, W, 3) uint8 -> "RGB"
    if mode == "RGB":
        return img
    if mode == "RGBA":
        rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, dtype=np.uint8)])  # opaque
        return Image.fromarray(rgba)
    if mode == "P":
        return img.quantize(colors=64)
    return img.convert(mode)  # "L"


def make_image_folder(
    root: str | os.PathLike,
    *,
    classes: Sequence[str] = ("cat", "dog"),
    n_train: int = 8,
    n_test: int = 4,
    size: int = 32,
    mode: str = "RGB",
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``root/train/<class>/*.png`` and ``root/test/<class>/*.png``.

    Parameters
    ----------
    root : str or os.PathLike
        Created if needed.
    classes : sequence of str
        Class folder names; class ``i`` is bright in horizontal band ``i`` of
        ``len(classes)`` (with 2 classes: top half vs bottom half), plus noise,
        so that a small network can learn it, horizontal flips included.
    n_train, n_test : int
        Images per class in each split (0 leaves the class folder empty).
    size : int
        Image side in pixels.
    mode : {"RGB", "L", "RGBA", "P"}
        PIL mode of the saved PNGs.
    seed : int
        Seeds the noise; the same arguments give the same files.

    Returns
    -------
    train_dir, test_dir : pathlib.Path
    """
    if mode not in IMAGE_MODES:
        raise ValueError(f"mode must be one of {IMAGE_MODES}, got {mode!r}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    dirs = []
    for split, n in (("train", n_train), ("test", n_test)):
        split_dir = root / split
        for label, name in enumerate(classes):
            class_dir = split_dir / name
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rgb = _class_image(label, len(classes), size, rng)
                _to_mode(rgb, mode).save(class_dir / f"{i:03d}.png")
        dirs.append(split_dir)
    return dirs[0], dirs[1]


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, Path]:
    """``(train_dir, test_dir)`` of a tiny two-class ("cat", "dog") RGB folder."""
    return make_image_folder(tmp_path / "data")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a test's process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_and_wait(worker, *args, nprocs: int, timeout_s: float) -> None:
    """Run ``worker(rank, nprocs, port, *args)`` in ``nprocs`` processes, like torchrun.

    Fails the test if they do not finish in ``timeout_s``; re-raises a worker's error.
    """
    context = mp.spawn(worker, args=(nprocs, free_port(), *args), nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish in {timeout_s} s")


def decompose(model, input_size, *, rescale: bool = True, seed: int = 0, cp_max_iter: int | None = None, **policy):
    """Plan with ``ranks.Policy(**policy)`` and apply the plan: the two steps ``main.py`` takes."""
    import decompositions
    import ranks

    plan = ranks.plan_decomposition(model, ranks.Policy(**policy), input_size)
    extra = {} if cp_max_iter is None else {"cp_max_iter": cp_max_iter}
    return decompositions.decompose_model(model, plan, input_size=input_size, rescale=rescale, seed=seed, **extra)
