"""Hostile inputs: each case once ended in a traceback, a hang or a silently wrong file.

Every one must now end with one ``error:`` line (exit status 2) before any work, or, where
the input is usable, work with a one-line warning.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import main
import models
import runtime
from conftest import REPO_ROOT, make_image_folder

SIZE = models.MIN_IMAGE_SIZE["alexnet"]
FAST = ["--workers", "0", "--quiet", "--latency_repeats", "1", "--latency_batch", "2", "--backend", "eager"]
MAX_ERROR_CHARS = 500  # a one-line error quotes a capped list, never a whole class list


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main.run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, needle: str) -> str:
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert needle in errors[0], errors[0]
    assert len(errors[0]) < MAX_ERROR_CHARS, len(errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, Path]:
    return make_image_folder(tmp_path_factory.mktemp("data"), n_train=2, n_test=2, size=SIZE)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """An untrained AlexNet model file (no training needed to test how files are read)."""
    path = tmp_path_factory.mktemp("good") / "model"
    torch.manual_seed(0)
    models.save_model(str(path), models.build_model("alexnet", 2), arch="alexnet", classes=["cat", "dog"],
                      image_size=SIZE)
    return path


def _edited(good: Path, tmp_path: Path, edit) -> Path:
    payload = torch.load(good, weights_only=True)
    edit(payload)
    path = tmp_path / "edited"
    torch.save(payload, path)
    return path


# ------------------------------------------------------------------------- model files
MALFORMED = {
    "state_dict list": (lambda p: p.update(state_dict=list(p["state_dict"].values())), "malformed state_dict"),
    "version string": (lambda p: p.update(version="1"), "malformed format version"),
    "image_size 0": (lambda p: p.update(image_size=0), "image size 0 is too small for alexnet"),
    "image_size 16": (lambda p: p.update(image_size=16), "image size 16 is too small for alexnet"),
    "image_size huge": (lambda p: p.update(image_size=10**6), "image size 1000000 is too large"),
    "image_size text": (lambda p: p.update(image_size="63"), "malformed image size"),
    "classes not text": (lambda p: p.update(classes=[1, 2]), "malformed class list"),
    "arch not text": (lambda p: p.update(arch=["vgg16"]), "malformed architecture name"),
    "NaN weights": (lambda p: p["state_dict"]["features.0.weight"].fill_(float("nan")),
                    "non-finite weights (NaN or Inf) in features.0.weight"),
    # 10^12 elements claimed by a view of one stored float (a 2 kB file): refused before reading.
    "strided view": (lambda p: p["state_dict"].update({"features.0.weight": torch.zeros(1).as_strided(
        (10**6, 10**6), (0, 0))}), "is larger than the data stored for it"),
    "complex weights": (lambda p: p["state_dict"].update({"features.0.weight": p["state_dict"][
        "features.0.weight"].to(torch.complex64)}), "not a real floating or integer type"),
    "integer bias": (lambda p: p["state_dict"].update({"features.0.bias": p["state_dict"][
        "features.0.bias"].long()}), "'features.0.bias' is int64, the model's is float32"),
    "meta not a mapping": (lambda p: p.update(meta=5), "malformed metadata (a int, not a mapping)"),
}


@pytest.mark.parametrize("step", ["--eval", "--decompose", "--export"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_model_files_give_one_line(tmp_path, capsys, folder, good, case, step):
    edit, needle = MALFORMED[case]
    bad = _edited(good, tmp_path, edit)
    argv = {"--eval": ["--eval", "--test_path", folder[1]], "--decompose": ["--decompose", "--rank_ratio", "0.5"],
            "--export": ["--export", "onnx", tmp_path / "m.onnx"]}[step]
    code, _, err = run_cli(capsys, *argv, "--model", bad, "--decomposed_model", tmp_path / "d", *FAST)
    one_line_error(code, err, needle)
    assert sorted(os.listdir(tmp_path)) == ["edited"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_other_float_precisions_are_converted_with_a_warning(tmp_path, capsys, folder, good, dtype):
    def to_dtype(payload):
        payload["state_dict"] = {k: v.to(dtype) if v.is_floating_point() else v
                                 for k, v in payload["state_dict"].items()}
    path = _edited(good, tmp_path, to_dtype)
    code, out, err = run_cli(capsys, "--eval", "--model", path, "--test_path", folder[1], *FAST)
    assert code == 0, err
    assert f"holds {str(dtype).replace('torch.', '')} weights: converted to float32" in err
    assert "accuracy" in out


def test_long_class_lists_are_quoted_capped(tmp_path, capsys, folder, good):
    path = _edited(good, tmp_path, lambda p: None)
    model, _ = models.load_model(str(path))
    many = [f"class{i:05d}" for i in range(10_000)]
    models.save_model(str(tmp_path / "many"), models.build_model("alexnet", len(many)), arch="alexnet",
                      classes=many, image_size=SIZE)
    code, _, err = run_cli(capsys, "--eval", "--model", tmp_path / "many", "--test_path", folder[1], *FAST)
    line = one_line_error(code, err, "differ from the model's (class00000, class00001")
    assert "and 9992 more" in line


def test_compressed_archive_is_refused_before_it_is_inflated(tmp_path, capsys, folder):
    bomb = tmp_path / "bomb"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (64 * 1024 * 1024))
    assert bomb.stat().st_size < 1024 * 1024
    code, _, err = run_cli(capsys, "--eval", "--model", bomb, "--test_path", folder[1], *FAST)
    one_line_error(code, err, "a compressed archive (model files are stored uncompressed), refused before reading")


def test_fifo_as_model_file_is_refused_not_read(tmp_path, folder):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # In a subprocess with a timeout: reading a FIFO nobody writes blocks forever.
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), "--eval", "--model", str(fifo), "--test_path",
                           str(folder[1]), "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: model file {fifo} is not a regular file (a FIFO, device "
                                                f"or socket)"]


# ----------------------------------------------------------------------- option sizes
@pytest.mark.parametrize("argv,needle", [
    (["--train", "--seed", str(2**64)], "--seed must be in [0, 4294967295]"),
    (["--train", "--seed", "-1"], "--seed must be in"),
    (["--train", "--image_size", "100000"], "--image_size 100000 is too large: at most 2048 px"),
    (["--train", "--batch_size", "100000000", "--image_size", "224"], "--batch_size 100000000 at 224 px needs about"),
    (["--eval", "--latency_batch", "100000000"], "--latency_batch 100000000 at 63 px needs about"),
])
def test_unbounded_sizes_are_bounded(tmp_path, capsys, folder, good, argv, needle):
    train_only = [] if "--eval" in argv else ["--arch", "alexnet", "--weights", "none"]
    code, _, err = run_cli(capsys, *argv, "--train_path", folder[0], "--test_path", folder[1], *train_only,
                           "--model", good if "--eval" in argv else tmp_path / "m", "--workers", "0", "--quiet")
    one_line_error(code, err, needle)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- output paths
@pytest.mark.parametrize("target", ["missing folder", "directory", "symlink", "same as export"])
def test_output_paths_are_checked_before_any_work(tmp_path, capsys, folder, good, target):
    (tmp_path / "dir").mkdir()
    (tmp_path / "real.json").write_text("{}")
    os.symlink(tmp_path / "real.json", tmp_path / "link.json")
    json_path = {"missing folder": tmp_path / "no" / "r.json", "directory": tmp_path / "dir",
                 "symlink": tmp_path / "link.json", "same as export": tmp_path / "out.onnx"}[target]
    needle = {"missing folder": "for --json does not exist", "directory": "--json " + str(tmp_path / "dir") +
              " is a directory", "symlink": "exists and is not a regular file",
              "same as export": "is the same file as --json"}[target]
    before = sorted(os.listdir(tmp_path))
    code, _, err = run_cli(capsys, "--eval", "--model", good, "--test_path", folder[1], "--json", json_path,
                           "--export", "onnx", tmp_path / "out.onnx", *FAST)
    one_line_error(code, err, needle)
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "real.json").read_text() == "{}" and os.path.islink(tmp_path / "link.json")


def test_dev_stdout_is_not_replaced(tmp_path, good, folder):
    if not os.path.islink("/dev/stdout"):
        pytest.skip("/dev/stdout is not a symlink here")  # pragma: no cover - Linux has it
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), "--eval", "--model", str(good), "--test_path",
                           str(folder[1]), "--json", "/dev/stdout", "--quiet", "--workers", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "exists and is not a regular file" in proc.stderr
    assert os.path.islink("/dev/stdout")


def test_model_output_that_is_a_directory(tmp_path, capsys, folder):
    (tmp_path / "model").mkdir()
    code, _, err = run_cli(capsys, "--train", "--train_path", folder[0], "--arch", "alexnet", "--image_size", SIZE,
                           "--weights", "none", "--model", tmp_path / "model", *FAST)
    one_line_error(code, err, "--model " + str(tmp_path / "model") + " is a directory")


# ---------------------------------------------------------------------------- unwrap
class HasModuleChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.module = nn.Linear(2, 2)
        self.head = nn.Linear(2, 1)


def test_unwrap_takes_off_only_real_wrappers():
    plain = HasModuleChild()
    assert runtime.unwrap(plain) is plain  # a child named "module" is not a wrapper
    assert runtime.unwrap(nn.DataParallel(plain)) is plain
    compiled = torch.compile(plain)
    assert runtime.unwrap(compiled) is plain
    assert all(not k.startswith("_orig_mod.") for k in runtime.unwrap(compiled).state_dict())


# ------------------------------------------------------- files of another format
FOREIGN = {
    "keras.h5": (b"\x89HDF\r\n\x1a\n" + bytes(64), "is an HDF5 file (Keras weights go to --weights)"),
    "model.onnx": (b"\x08\x07\x12\x07pytorch" + bytes(32), "is an ONNX file (ONNX models go to --weights)"),
    "notes.txt": (b"these are not weights\n", "is neither a zip archive nor a pickle"),
    "plain.pkl": (b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s.",
                  "is a plain pickle, not a PyTorch file"),
}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_a_file_of_another_format_is_named_not_called_pickled_code(tmp_path, capsys, folder, name):
    # Before: "it holds pickled objects other than tensors (code would run)" for all of them.
    content, needle = FOREIGN[name]
    path = tmp_path / name
    path.write_bytes(content)
    code, _, err = run_cli(capsys, "--eval", "--model", path, "--test_path", folder[1], *FAST)
    line = one_line_error(code, err, needle)
    assert "code would run" not in line


# ------------------------------------------------ --weights: the checks model files get
@pytest.mark.parametrize("name", ["fifo.onnx", "fifo.pt"])
def test_fifo_as_weights_is_refused_not_read(tmp_path, folder, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), "--train", "--arch", "alexnet", "--weights",
                           str(fifo), "--train_path", str(folder[0]), "--image_size", str(SIZE), "--model",
                           str(tmp_path / "model"), "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: weights file {fifo} is not a regular file (a FIFO, "
                                                    f"device or socket)")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("case", ["dev_zero_link", "dangling_link", "huge_sparse"])
def test_weights_that_are_no_file_or_too_large_are_refused_before_reading(tmp_path, capsys, folder, case):
    path = tmp_path / "w.onnx"
    if case == "dev_zero_link":  # read until memory ran out (4 GB in 7 s)
        path.symlink_to("/dev/zero")
        needle = "is not a regular file"
    elif case == "dangling_link":
        path.symlink_to(tmp_path / "nowhere.onnx")
        needle = "does not exist"
    else:  # a sparse file: no disk used
        with open(path, "wb") as fh:
            fh.truncate(models.MAX_WEIGHTS_BYTES + 1)
        needle = "refused before reading"
    code, _, err = run_cli(capsys, "--train", "--arch", "alexnet", "--weights", path, "--train_path", folder[0],
                           "--image_size", SIZE, "--model", tmp_path / "model", *FAST)
    one_line_error(code, err, needle)
    assert not (tmp_path / "model").exists()
