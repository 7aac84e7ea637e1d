"""Tests for dataset.py, benchmarks/make_fashion_mnist.py and the shipped data/demo folder."""

from __future__ import annotations

import gzip
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

import dataset
from conftest import REPO_ROOT, make_image_folder
from dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageLoadError,
    ShardSampler,
    build_datasets,
    build_loaders,
    build_transforms,
    check_image_folder,
    to_rgb,
)
from errors import UserError

IMAGE_SIZE = 32
DEMO_DIR = REPO_ROOT / "data" / "demo"
DEMO_CLASSES = ["shirt", "tshirt_top"]
DEMO_MAX_BYTES = 2 * 1024 * 1024


def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is not an image")


def _truncate(path: Path) -> None:
    # Keeps the PNG signature and part of the header: opens, fails to verify.
    path.write_bytes(path.read_bytes()[:40])


# --------------------------------------------------------------------- check_image_folder


def test_check_image_folder_returns_sorted_classes_and_ignores_hidden(tmp_path):
    train, _ = make_image_folder(tmp_path, classes=("zebra", "ant", "moose"), n_train=1, n_test=1)
    (train / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a class
    (train / "ant" / "._000.png").write_bytes(b"macOS resource fork")  # nor an image
    assert check_image_folder(train, role="train") == ["ant", "moose", "zebra"]
    assert check_image_folder(str(train), role="train") == ["ant", "moose", "zebra"]


def test_check_image_folder_missing(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=r"^train folder .*nope does not exist$"):
        check_image_folder(missing, role="train")


def test_check_image_folder_file_instead_of_dir(tmp_path):
    path = tmp_path / "file.png"
    path.write_bytes(b"x")
    with pytest.raises(UserError, match=r"test folder .*file\.png is not a directory"):
        check_image_folder(path, role="test")


def test_check_image_folder_no_class_subfolders(tmp_path):
    (tmp_path / "loose.png").write_bytes(b"x")  # images straight in the root
    with pytest.raises(UserError, match="has no class subfolders"):
        check_image_folder(tmp_path, role="train")


def test_check_image_folder_one_class(tmp_path):
    train, _ = make_image_folder(tmp_path, classes=("only",), n_train=2, n_test=1)
    with pytest.raises(UserError, match=r"only 1 class \('only'\).*at least 2"):
        check_image_folder(train, role="train")


def test_check_image_folder_empty_class(tmp_path):
    train, _ = make_image_folder(tmp_path, n_train=2, n_test=1)
    (train / "bird").mkdir()
    (train / "bird" / "notes.txt").write_text("not an image extension")
    with pytest.raises(UserError, match=r"class folder\(s\) 'bird' contain no images") as info:
        check_image_folder(train, role="train")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------- build_datasets


def test_build_datasets_basic(image_folder):
    train, test = image_folder
    train_ds, test_ds, classes = build_datasets(train, test, image_size=IMAGE_SIZE)
    assert classes == ["cat", "dog"]
    assert train_ds.classes == test_ds.classes == classes
    assert (len(train_ds), len(test_ds)) == (16, 8)
    assert sorted(set(train_ds.targets)) == [0, 1]
    x, y = train_ds[0]
    assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
    assert y == 0


def test_build_datasets_test_only(image_folder):
    _, test = image_folder
    train_ds, test_ds, classes = build_datasets(None, test, image_size=IMAGE_SIZE)
    assert train_ds is None and len(test_ds) == 8 and classes == ["cat", "dog"]
    with pytest.raises(ValueError, match="neither"):
        build_datasets(None, None, image_size=IMAGE_SIZE)


def test_build_datasets_class_mismatch(tmp_path):
    train, _ = make_image_folder(tmp_path / "a", classes=("cat", "dog"), n_train=1, n_test=1)
    _, test = make_image_folder(tmp_path / "b", classes=("bird", "cat"), n_train=1, n_test=1)
    with pytest.raises(UserError, match=r"only in train: \['dog'\]; only in test: \['bird'\]"):
        build_datasets(train, test, image_size=IMAGE_SIZE)


def test_build_datasets_checks_test_folder_before_scanning(image_folder, tmp_path):
    train, _ = image_folder
    with pytest.raises(UserError, match="test folder .* does not exist"):
        build_datasets(train, tmp_path / "missing", image_size=IMAGE_SIZE)


def test_corrupt_images_are_skipped_with_one_warning(image_folder):
    train, test = image_folder
    _corrupt(train / "cat" / "000.png")
    _truncate(train / "dog" / "001.png")
    with pytest.warns(UserWarning) as record:
        train_ds, test_ds, _ = build_datasets(train, test, image_size=IMAGE_SIZE)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    assert "skipped 2 unreadable image file(s) in train folder" in messages[0]
    assert "000.png" in messages[0] and "001.png" in messages[0]
    assert len(train_ds) == 14 and len(test_ds) == 8
    paths = {Path(p).name for p, _ in train_ds.samples}
    assert "000.png" not in {Path(p).name for p, t in train_ds.samples if t == 0}
    assert "001.png" in paths  # still there for cat, only dog's was bad


def test_all_images_of_a_class_corrupt(image_folder):
    train, test = image_folder
    for path in (test / "dog").iterdir():
        _corrupt(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match=r"test folder .*every image of class\(es\) 'dog' is unreadable"):
            build_datasets(train, test, image_size=IMAGE_SIZE)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_images_become_three_channels(tmp_path, mode):
    train, test = make_image_folder(tmp_path, n_train=2, n_test=2, size=20, mode=mode)
    assert Image.open(next((train / "cat").iterdir())).mode == mode
    train_ds, test_ds, _ = build_datasets(train, test, image_size=IMAGE_SIZE)
    for ds in (train_ds, test_ds):
        x, _ = ds[0]
        assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    if mode == "L":
        x, _ = test_ds[0]
        # Grey replicated to RGB: equal channels once the normalization is undone.
        raw = x * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
        assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_16_bit_and_float_images_keep_their_contrast(mode):
    """Pillow's convert clips 16-bit pixels to 255 (a 16-bit scan turns white) and float ones to
    0 (a 0..1 image turns black): to_rgb scales them by their type's range."""
    ramp = np.linspace(0, 1, 64).reshape(8, 8)
    values = (ramp * 65535).astype(np.uint16) if mode == "I;16" else ramp.astype(np.float32)
    img = Image.fromarray(values)
    assert img.mode == mode
    rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (8, 8, 3) and rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255
    assert abs(float(rgb[..., 0].mean()) - 127.5) < 2


def test_an_extremely_elongated_image_is_refused_before_it_is_decoded(tmp_path):
    """A 1 x 100000 px strip is a few hundred bytes, and 20 GB once its short side is resized."""
    path = tmp_path / "strip.png"
    Image.new("L", (100000, 1)).save(path)
    with pytest.raises(ImageLoadError, match="an aspect ratio beyond 50:1"):
        dataset.load_rgb(str(path))
    Image.new("L", (400, 10)).save(path)   # 40:1 is still read
    assert dataset.load_rgb(str(path)).size == (400, 10)


def test_a_class_folder_linked_to_another_class_is_refused(tmp_path):
    train, _ = make_image_folder(tmp_path / "data", n_train=2, n_test=1, size=8)
    (train / "wolf").symlink_to("dog")
    with pytest.raises(UserError, match="class folder 'wolf' is the same folder as 'dog' .*two labels"):
        check_image_folder(train, role="train")


@pytest.mark.parametrize("train", [True, False])
def test_normalization_is_imagenet(train):
    colour = (255, 0, 128)
    img = Image.new("RGB", (50, 40), colour)  # uniform: any crop or resize keeps the value
    x = build_transforms(IMAGE_SIZE, train=train)(img)
    assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    for c in range(3):
        expected = (colour[c] / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(x[c], torch.full_like(x[c], expected), atol=1e-5)


def test_transform_recipe():
    test_tf = build_transforms(224, train=False)
    resize = next(t for t in test_tf.transforms if type(t).__name__ == "Resize")
    crop = next(t for t in test_tf.transforms if type(t).__name__ == "CenterCrop")
    assert resize.size == 256 and tuple(crop.size) == (224, 224)
    train_tf = build_transforms(224, train=True)
    rrc = next(t for t in train_tf.transforms if type(t).__name__ == "RandomResizedCrop")
    assert tuple(rrc.scale) == dataset.TRAIN_CROP_SCALE
    assert any(type(t).__name__ == "RandomHorizontalFlip" for t in train_tf.transforms)
    # A non-square image: the test transform still gives a square crop.
    wide = Image.new("L", (300, 100), 7)
    assert test_tf(wide).shape == (3, 224, 224)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "224"])
def test_image_size_validation(bad, image_folder):
    with pytest.raises(ValueError, match=f"image_size must be an int >= 1, got {bad!r}"):
        build_transforms(bad, train=False)
    with pytest.raises(ValueError, match="image_size"):
        build_datasets(*image_folder, image_size=bad)


def test_load_time_failure_names_the_file(image_folder):
    train, test = image_folder
    _, test_ds, _ = build_datasets(train, test, image_size=IMAGE_SIZE)
    bad = test / "dog" / "002.png"
    _corrupt(bad)  # broken after the scan
    index = [p for p, _ in test_ds.samples].index(str(bad))
    with pytest.raises(ImageLoadError, match=r"^cannot load image .*002\.png: not a recognised image format$"):
        test_ds[index]
    assert isinstance(ImageLoadError("x"), UserError)


def test_load_time_failure_in_worker_is_one_line(image_folder):
    train, test = image_folder
    _, test_ds, _ = build_datasets(train, test, image_size=IMAGE_SIZE)
    _corrupt(test / "cat" / "000.png")
    _, loader, _ = build_loaders(None, test_ds, batch_size=4, workers=1)
    with pytest.raises(ImageLoadError) as info:
        for _ in loader:
            pass
    # Shut the worker down now; left to the garbage collector after a worker
    # error, torch waits MP_STATUS_CHECK_INTERVAL (5 s) for it to exit.
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        iterator._shutdown_workers()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("cannot load image ") and "000.png" in message


# --------------------------------------------------------------------- build_loaders


def test_build_loaders_single_process(image_folder):
    train_ds, test_ds, _ = build_datasets(*image_folder, image_size=IMAGE_SIZE)
    train_loader, test_loader, sampler = build_loaders(train_ds, test_ds, batch_size=5, workers=0, seed=3)
    assert sampler is None
    assert isinstance(train_loader.sampler, RandomSampler)
    assert isinstance(test_loader.sampler, SequentialSampler)
    assert train_loader.pin_memory == test_loader.pin_memory == torch.cuda.is_available()
    assert not train_loader.persistent_workers
    # 16 / 5: the last image, alone in its batch, is dropped (BatchNorm); 8 / 5: the test set keeps it.
    assert (len(train_loader), len(test_loader)) == (3, 2)
    x, y = next(iter(test_loader))
    assert x.shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE) and y.tolist() == [0, 0, 0, 0, 1]

    def order(seed):
        loader, _, _ = build_loaders(train_ds, None, batch_size=5, workers=0, seed=seed)
        return list(loader.sampler)

    assert order(3) == order(3)
    assert order(3) != order(4)


def test_build_loaders_workers_persist(image_folder):
    train_ds, test_ds, _ = build_datasets(*image_folder, image_size=IMAGE_SIZE)
    train_loader, test_loader, _ = build_loaders(train_ds, test_ds, batch_size=4, workers=2)
    assert train_loader.num_workers == 2 and train_loader.persistent_workers
    assert test_loader.persistent_workers


def test_no_training_batch_of_one_image():
    # BatchNorm in training mode cannot normalize a batch of one image at a 1x1 feature map.
    from torch.utils.data import TensorDataset

    def batches(n: int, **kwargs) -> list[int]:
        data = TensorDataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long))
        loader = build_loaders(data, None, batch_size=4, workers=0, **kwargs)[0]
        return [len(b[1]) for b in loader]

    assert batches(9) == [4, 4]            # the last image would have been a batch alone
    assert batches(10) == [4, 4, 2]
    assert batches(9, distributed=True, num_replicas=2, rank=0) == [4]  # 5 per rank: 4 + 1 dropped
    assert batches(6, distributed=True, num_replicas=2, rank=1) == [3]


def test_build_loaders_none_datasets():
    assert build_loaders(None, None, batch_size=1, workers=0) == (None, None, None)


def test_build_loaders_distributed(image_folder):
    train, test = image_folder
    train_ds, test_ds, _ = build_datasets(train, test, image_size=IMAGE_SIZE)
    seen_train, seen_test = [], []
    for rank in (0, 1):
        train_loader, test_loader, sampler = build_loaders(
            train_ds, test_ds, batch_size=4, workers=0, distributed=True, seed=1,
            num_replicas=2, rank=rank,
        )
        assert isinstance(sampler, DistributedSampler) and train_loader.sampler is sampler
        assert sampler.shuffle and sampler.seed == 1
        assert isinstance(test_loader.sampler, ShardSampler)
        assert len(sampler) == len(train_ds) // 2
        seen_train += list(sampler)
        seen_test += list(test_loader.sampler)
    assert sorted(seen_train) == list(range(len(train_ds)))  # a partition of the data
    assert sorted(seen_test) == list(range(len(test_ds)))


def test_build_loaders_distributed_test_shards_are_not_padded(tmp_path):
    train, test = make_image_folder(tmp_path, n_train=2, n_test=3)  # 6 test images
    _, test_ds, _ = build_datasets(None, test, image_size=IMAGE_SIZE)
    shards = [list(build_loaders(None, test_ds, batch_size=2, workers=0, distributed=True, num_replicas=4,
                                 rank=rank)[1].sampler) for rank in range(4)]
    # DistributedSampler would give each of the 4 ranks 2 images (8: two counted twice).
    assert [len(s) for s in shards] == [2, 2, 1, 1]
    assert sorted(sum(shards, [])) == list(range(6))
    with pytest.raises(ValueError, match="rank must be in"):
        ShardSampler(6, num_replicas=2, rank=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0, workers=0), "batch_size must be an int >= 1, got 0"),
        (dict(batch_size=2.0, workers=0), "batch_size must be an int >= 1, got 2.0"),
        (dict(batch_size=2, workers=-1), "workers must be an int >= 0, got -1"),
        (dict(batch_size=2, workers=0, num_replicas=2), "need distributed=True"),
    ],
)
def test_build_loaders_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_loaders(None, None, **kwargs)


def test_fixture_images_are_learnable(tmp_path):
    """A tiny CNN trained with the real train transforms beats chance on the test split."""
    torch.manual_seed(0)
    train, test = make_image_folder(tmp_path, n_train=24, n_test=12, size=IMAGE_SIZE)
    train_ds, test_ds, _ = build_datasets(train, test, image_size=IMAGE_SIZE)
    train_loader, test_loader, _ = build_loaders(train_ds, test_ds, batch_size=16, workers=0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d((4, 4)),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 2),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(8):
        for x, y in train_loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test_loader)
    assert correct / len(test_ds) >= 0.8


# --------------------------------------------------------------------- make_fashion_mnist


@pytest.fixture(scope="module")
def fashion():
    path = REPO_ROOT / "benchmarks" / "make_fashion_mnist.py"
    spec = importlib.util.spec_from_file_location("make_fashion_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Gzipped IDX file of unsigned bytes: 0, 0, 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_source(tmp_path):
    """IDX files with 10 images per label in train and 4 in t10k; pixel [0, 0] = index % 256."""
    source = tmp_path / "source"
    source.mkdir()
    rng = np.random.default_rng(0)
    for prefix, per_label in (("train", 10), ("t10k", 4)):
        labels = rng.permutation(np.repeat(np.arange(10), per_label)).astype(np.uint8)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(len(labels)) % 256
        _write_idx(source / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return source


def test_read_idx_roundtrip(fashion, tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(fashion.read_idx(tmp_path / "a.gz"), array)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(bytes([0, 0, 0x0D, 1, 0, 0, 0, 5]))  # float type code
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        fashion.read_idx(tmp_path / "bad.gz")


def test_fashion_layout_counts_and_content(fashion, fake_source, tmp_path):
    out = tmp_path / "out"
    counts = fashion.make_fashion_mnist(out, source=fake_source, train_per_class=6, test_per_class=4, seed=0)
    assert counts == {"train": {"tshirt_top": 6, "shirt": 6}, "test": {"tshirt_top": 4, "shirt": 4}}
    assert check_image_folder(out / "train", role="train") == ["shirt", "tshirt_top"]
    assert check_image_folder(out / "test", role="test") == ["shirt", "tshirt_top"]
    images = {p: fashion.read_idx(fake_source / f"{p}-images-idx3-ubyte.gz") for p in ("train", "t10k")}
    labels = {p: fashion.read_idx(fake_source / f"{p}-labels-idx1-ubyte.gz") for p in ("train", "t10k")}
    for split, prefix, n in (("train", "train", 6), ("test", "t10k", 4)):
        for name, label in (("tshirt_top", 0), ("shirt", 6)):
            files = sorted((out / split / name).iterdir())
            assert len(files) == n
            for f in files:
                assert f.name.startswith(f"{prefix}_") and f.suffix == ".png"
                index = int(f.stem.split("_")[1])
                assert labels[prefix][index] == label
                img = Image.open(f)
                assert img.mode == "L" and img.size == (28, 28)
                np.testing.assert_array_equal(np.asarray(img), images[prefix][index])


def test_fashion_is_deterministic_and_nested(fashion, fake_source, tmp_path):
    def names(out, **kwargs):
        fashion.make_fashion_mnist(out, source=fake_source, test_per_class=2, **kwargs)
        return sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))

    a = names(tmp_path / "a", train_per_class=3, seed=0)
    assert a == names(tmp_path / "b", train_per_class=3, seed=0)
    assert a != names(tmp_path / "c", train_per_class=3, seed=1)
    assert set(a) <= set(names(tmp_path / "d", train_per_class=8, seed=0))  # smaller subset nested


def test_fashion_errors(fashion, fake_source, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion.make_fashion_mnist(tmp_path / "out", source=tmp_path / "empty")
    with pytest.raises(ValueError, match="test_per_class=5 but the t10k split has only 4"):
        fashion.make_fashion_mnist(tmp_path / "out", source=fake_source, train_per_class=1, test_per_class=5)
    assert not (tmp_path / "out").exists()  # nothing written on a bad count
    with pytest.raises(ValueError, match="train_per_class must be an int >= 1, got 0"):
        fashion.make_fashion_mnist(tmp_path / "out", source=fake_source, train_per_class=0)

    out = tmp_path / "out"
    fashion.make_fashion_mnist(out, source=fake_source, train_per_class=2, test_per_class=2)
    with pytest.raises(FileExistsError, match="--overwrite"):
        fashion.make_fashion_mnist(out, source=fake_source, train_per_class=1, test_per_class=1)
    fashion.make_fashion_mnist(out, source=fake_source, train_per_class=1, test_per_class=1, overwrite=True)
    assert len(list((out / "train" / "shirt").iterdir())) == 1

    status = fashion.main([str(tmp_path / "cli"), "--source", str(tmp_path / "empty")])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "apt-get install dataset-fashion-mnist" in err


def test_fashion_cli(fashion, fake_source, tmp_path):
    status = fashion.main([str(tmp_path / "cli"), "--source", str(fake_source),
                           "--train_per_class", "2", "--test_per_class", "1", "--seed", "5"])
    assert status == 0
    assert len(list((tmp_path / "cli").rglob("*.png"))) == 2 * 2 + 2 * 1


# --------------------------------------------------------------------- shipped demo data


def test_demo_folder_is_valid_and_small():
    assert check_image_folder(DEMO_DIR / "train", role="train") == DEMO_CLASSES
    assert check_image_folder(DEMO_DIR / "test", role="test") == DEMO_CLASSES
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every shipped image must verify
        train_ds, test_ds, classes = build_datasets(DEMO_DIR / "train", DEMO_DIR / "test", image_size=IMAGE_SIZE)
    assert classes == DEMO_CLASSES
    assert np.bincount(train_ds.targets).tolist() == [120, 120]
    assert np.bincount(test_ds.targets).tolist() == [80, 80]
    x, _ = test_ds[0]
    assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert (DEMO_DIR / "README.md").is_file()
    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert total < DEMO_MAX_BYTES


SCAN_SCRIPT = """
import sys, warnings
sys.path.insert(0, {root!r})
import dataset
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train, _, classes = dataset.build_datasets({train!r}, None, image_size=32)
counts = [sum(1 for _, y in train.samples if y == i) for i in range(len(classes))]
print(repr((classes, counts, [str(w.message) for w in caught])))
"""


def test_linked_folders_are_read_once_and_never_outside_their_class(tmp_path):
    train, _ = make_image_folder(tmp_path / "data", classes=("shirt", "tshirt"), n_train=3, n_test=1, size=8)
    (train / "shirt" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(train / "shirt" / "sub" / "extra.png")
    (train / "shirt" / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(train / "shirt" / ".hidden" / "ignored.png")
    (train / "shirt" / "loop").symlink_to("..")            # a loop through the dataset root
    (train / "shirt" / "self").symlink_to(".")             # the class folder again
    (train / "shirt" / "again").symlink_to("sub")          # a folder already read
    (train / "tshirt" / "other").symlink_to("../shirt")    # another class's images
    # In a subprocess with a timeout: os.walk(followlinks=True) never returns on a loop.
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", SCAN_SCRIPT.format(root=str(REPO_ROOT), train=str(train))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    classes, counts, messages = eval(proc.stdout.strip())  # noqa: S307 - our own repr'd output
    assert classes == ["shirt", "tshirt"]
    assert counts == [4, 3]  # 3 + sub/extra.png; nothing hidden, nothing twice, nothing from the other class
    linked = [m for m in messages if m.startswith("skipped 4 linked folder(s)")]
    assert len(linked) == 1, messages
    # loop and other point outside their class folder; self and one of again/sub repeat a folder.
    assert "loop (links outside" in linked[0] and "(a folder already read)" in linked[0]


def test_truncated_jpeg_is_skipped_up_front_with_the_others(tmp_path):
    train, _ = make_image_folder(tmp_path / "data", n_train=3, n_test=1, size=32)
    rng = np.random.default_rng(0)
    for i, cls in enumerate(("cat", "dog")):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(train / cls / f"photo{i}.jpg",
                                                                                 quality=90)
    whole = (train / "dog" / "photo1.jpg").read_bytes()
    (train / "dog" / "photo1.jpg").write_bytes(whole[: len(whole) // 2])  # an interrupted copy
    with pytest.warns(UserWarning) as record:
        train_ds, _, _ = build_datasets(train, None, image_size=32)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "skipped 1 unreadable image file(s)" in messages[0]
    assert "photo1.jpg (truncated JPEG: no end-of-image marker)" in messages[0]
    names = {Path(p).name for p, _ in train_ds.samples}
    assert "photo0.jpg" in names and "photo1.jpg" not in names and len(train_ds) == 7
    for i in range(len(train_ds)):  # every kept image decodes: nothing left to fail mid-epoch
        assert train_ds[i][0].shape == (3, 32, 32)
