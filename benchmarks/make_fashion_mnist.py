"""Write a two-class Fashion-MNIST image folder: T-shirt/top vs Shirt.

These two classes are the most confused pair of Fashion-MNIST, which keeps a
binary task from being trivially easy. The output is an ``ImageFolder`` tree of
28x28 greyscale PNGs::

    OUT_DIR/train/{shirt,tshirt_top}/train_NNNNN.png   (from the IDX train split)
    OUT_DIR/test/{shirt,tshirt_top}/t10k_NNNNN.png     (from the IDX t10k split)

``NNNNN`` is the image's index in its IDX file. The selection is a seeded
permutation per (split, class), of which the first ``N`` are written, so a
smaller subset is contained in a larger one for the same seed. The t10k split
has exactly 1000 images per class, so ``--test_per_class 1000`` is the whole
test set of these two classes.

The source is Debian's ``dataset-fashion-mnist`` package, which installs the
original gzipped IDX files in ``/usr/share/datasets/fashion-mnist``.

Usage::

    python benchmarks/make_fashion_mnist.py OUT_DIR [--source DIR]
        [--train_per_class 1000] [--test_per_class 1000] [--seed 0] [--overwrite]

References
----------
.. [1] H. Xiao, K. Rasul and R. Vollgraf, "Fashion-MNIST: a Novel Image Dataset
   for Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017.
   https://github.com/zalandoresearch/fashion-mnist (MIT licence).
.. [2] Y. LeCun et al., the IDX file format: http://yann.lecun.com/exdb/mnist/
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
APT_HINT = "install them with `apt-get install dataset-fashion-mnist` or pass --source DIR"

# Fashion-MNIST label -> output folder name.
CLASSES = {0: "tshirt_top", 6: "shirt"}

# Output split -> IDX file prefix ("t10k" is the IDX name of the test split).
SPLITS = {"train": "train", "test": "t10k"}
SPLIT_IDS = {"train": 0, "test": 1}  # mixed into the seed: independent streams

# IDX magic numbers: two zero bytes, type code 0x08 (unsigned byte), number of dims.
IDX_UBYTE = 0x08
IDX_HEADER_BYTES = 4
IDX_DIM_BYTES = 4

DEFAULT_PER_CLASS = 1000


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes into an array.

    Parameters
    ----------
    path : str or os.PathLike
        ``*-idx1-ubyte.gz`` (labels, shape ``(n,)``) or ``*-idx3-ubyte.gz``
        (images, shape ``(n, rows, cols)``).

    Returns
    -------
    numpy.ndarray of uint8

    Raises
    ------
    ValueError
        If the file is not an unsigned-byte IDX file of the size its header says.
    """
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path} is not a readable gzip file: {exc}") from exc
    if len(data) < IDX_HEADER_BYTES or data[0] != 0 or data[1] != 0 or data[2] != IDX_UBYTE:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {data[:4].hex()})")
    ndim = data[3]
    start = IDX_HEADER_BYTES + ndim * IDX_DIM_BYTES
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=IDX_HEADER_BYTES))
    if len(data) != start + int(np.prod(shape)):
        raise ValueError(
            f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes) "
            f"but {len(data) - start} bytes follow"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(shape)


def _source_files(source: Path, split: str) -> tuple[Path, Path]:
    prefix = SPLITS[split]
    return source / f"{prefix}-images-idx3-ubyte.gz", source / f"{prefix}-labels-idx1-ubyte.gz"


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _prepare_out_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse to mix with an earlier output; with ``overwrite`` delete only our class folders."""
    for split in SPLITS:
        split_dir = out_dir / split
        if not split_dir.exists() or not any(split_dir.iterdir()):
            continue
        if not overwrite:
            raise FileExistsError(
                f"{split_dir} exists and is not empty; delete it, choose another OUT_DIR "
                "or pass --overwrite"
            )
        foreign = sorted(p.name for p in split_dir.iterdir() if p.name not in CLASSES.values())
        if foreign:
            raise FileExistsError(
                f"{split_dir} holds entries this script did not write ({', '.join(foreign)}); "
                "refusing to overwrite it"
            )
        for name in CLASSES.values():
            if (split_dir / name).exists():
                shutil.rmtree(split_dir / name)


def make_fashion_mnist(
    out_dir: Union[str, os.PathLike],
    *,
    source: Union[str, os.PathLike] = DEFAULT_SOURCE,
    train_per_class: int = DEFAULT_PER_CLASS,
    test_per_class: int = DEFAULT_PER_CLASS,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, dict[str, int]]:
    """Write the T-shirt/top vs Shirt image folder (see the module docstring).

    Parameters
    ----------
    out_dir : str or os.PathLike
        Gets ``train/`` and ``test/`` class folders.
    source : str or os.PathLike
        Folder with the four Fashion-MNIST ``*.gz`` IDX files.
    train_per_class, test_per_class : int
        Images per class taken from the train (6000 per class) and t10k (1000
        per class) splits.
    seed : int
        Seeds the selection; the same seed gives the same files.
    overwrite : bool
        Replace an earlier output in ``out_dir`` instead of refusing.

    Returns
    -------
    dict
        ``{split: {class_name: images_written}}``.

    Raises
    ------
    FileNotFoundError
        If the source files are missing (the message says how to install them).
    ValueError
        For a bad count, or more images per class than the split holds.
    FileExistsError
        If ``out_dir`` already holds a dataset and ``overwrite`` is false.
    """
    _check_count("train_per_class", train_per_class)
    _check_count("test_per_class", test_per_class)
    source, out_dir = Path(source), Path(out_dir)
    per_class = {"train": train_per_class, "test": test_per_class}

    files = {split: _source_files(source, split) for split in SPLITS}
    missing = [p.name for pair in files.values() for p in pair if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files missing from {source}: {', '.join(missing)}; {APT_HINT}"
        )

    # Read and select everything before writing, so a bad count writes nothing.
    selected = {}
    for split, (images_path, labels_path) in files.items():
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{images_path} and {labels_path} do not hold matching images "
                f"{images.shape} and labels {labels.shape}"
            )
        for label, name in CLASSES.items():
            available = np.flatnonzero(labels == label)
            if per_class[split] > len(available):
                raise ValueError(
                    f"{split}_per_class={per_class[split]} but the {SPLITS[split]} split has "
                    f"only {len(available)} images of class {name!r}"
                )
            # One independent stream per (split, class): changing one count
            # does not change the other selections.
            rng = np.random.default_rng([seed, SPLIT_IDS[split], label])
            chosen = np.sort(rng.permutation(available)[: per_class[split]])
            selected[split, name] = (images, chosen)

    _prepare_out_dir(out_dir, overwrite=overwrite)
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    for (split, name), (images, chosen) in selected.items():
        class_dir = out_dir / split / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for index in chosen:
            # A 2-D uint8 array becomes a greyscale ("L") 28x28 image.
            Image.fromarray(images[index]).save(class_dir / f"{SPLITS[split]}_{index:05d}.png", optimize=True)
        counts[split][name] = len(chosen)
        logger.info("wrote %d images to %s", len(chosen), class_dir)
    return counts


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write a two-class Fashion-MNIST ImageFolder (T-shirt/top vs Shirt).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="gets train/ and test/ class folders")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE),
                        help="folder with the Fashion-MNIST *.gz IDX files")
    parser.add_argument("--train_per_class", type=int, default=DEFAULT_PER_CLASS,
                        help="images per class from the train split (at most 6000)")
    parser.add_argument("--test_per_class", type=int, default=DEFAULT_PER_CLASS,
                        help="images per class from the t10k split (at most 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the selection")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the class folders of an earlier run in OUT_DIR")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (2 on a user error)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        counts = make_fashion_mnist(
            args.out_dir, source=args.source, train_per_class=args.train_per_class,
            test_per_class=args.test_per_class, seed=args.seed, overwrite=args.overwrite,
        )
    except (OSError, ValueError) as exc:  # FileNotFoundError, FileExistsError, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(n for split in counts.values() for n in split.values())
    print(f"wrote {total} images to {args.out_dir}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
