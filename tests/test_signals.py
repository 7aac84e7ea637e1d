"""Ctrl-C and SIGTERM end a run with one line and leave the last good files whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import models
from conftest import REPO_ROOT, make_image_folder

SIZE = models.MIN_IMAGE_SIZE["alexnet"]


def _default_sigint() -> None:
    # The child gets what a user's interactive run has: Ctrl-C and SIGTERM at their defaults
    # and not blocked.  A test runner may hand down either ignored (a shell starts background
    # jobs with Ctrl-C ignored, and Python keeps an ignored SIGINT ignored) or blocked (a
    # library thread's signal mask), and the run would then never see the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _start_training(tmp_path, workers: int) -> tuple[subprocess.Popen, object]:
    train, test = make_image_folder(tmp_path / "data", n_train=8, n_test=2, size=SIZE)
    model = tmp_path / "model"
    model.write_bytes(b"the last good model")
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "main.py"), "--train", "--train_path", str(train), "--test_path", str(test),
         "--arch", "alexnet", "--image_size", str(SIZE), "--weights", "none", "--model", str(model),
         "--epochs", "200", "--batch_size", "4", "--workers", str(workers), "--quiet"],
        stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_default_sigint,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc, model


def _wait_for_training(proc: subprocess.Popen) -> list[str]:
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if line.startswith("epoch 1/"):  # the first epoch is done: training is under way
            return lines
        if not line and proc.poll() is not None:
            break
    raise AssertionError("training did not start: " + "".join(lines)[-2000:])


@pytest.mark.parametrize("sig,code,message,workers", [
    (signal.SIGINT, 130, "error: interrupted", 2),
    (signal.SIGTERM, 143, "error: terminated", 0),
])
def test_interrupted_training_ends_with_one_line(tmp_path, sig, code, message, workers):
    proc, model = _start_training(tmp_path, workers)
    try:
        _wait_for_training(proc)
        # Ctrl-C in a terminal reaches the whole process group, loader workers included.
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == message, err[-2000:]
    assert model.read_bytes() == b"the last good model"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    # The epoch checkpoint, written after "epoch 1/..." was logged, is whole: --resume can use it.
    import torch
    assert torch.load(tmp_path / "model.checkpoint", weights_only=True)["epoch"] >= 1


def test_ctrl_c_during_a_write_finishes_the_write_first(tmp_path):
    script = f"""
import os, signal, sys, threading, time
sys.path.insert(0, {str(REPO_ROOT)!r})
import torch
from atomic import atomic_open
payload = {{"w": torch.randn(8_000_000)}}
timer = threading.Timer(0.01, lambda: os.kill(os.getpid(), signal.SIGINT))
try:
    with atomic_open({str(tmp_path / 'model')!r}, "wb") as fh:
        timer.start()
        time.sleep(0.2)                      # the signal arrives in the middle of the write
        torch.save(payload, fh)
except KeyboardInterrupt:
    print("interrupted after the write", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          preexec_fn=_default_sigint)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "interrupted after the write"
    import torch
    assert torch.load(tmp_path / "model", weights_only=True)["w"].numel() == 8_000_000
    assert sorted(os.listdir(tmp_path)) == ["model"]


# ------------------------------------------- SIGTERM inside the broad exception handlers


def _raise_terminated(*args, **kwargs):
    import main

    raise main.Terminated()


def _inside_image_load(tmp_path, monkeypatch):
    import dataset

    monkeypatch.setattr(dataset.Image, "open", _raise_terminated)
    path = tmp_path / "x.png"
    path.write_bytes(b"not read")
    dataset.load_rgb(str(path))


def _inside_folder_scan(tmp_path, monkeypatch):
    import dataset

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"not read")
    monkeypatch.setattr(dataset.Image, "open", _raise_terminated)
    dataset._scan_folder(str(tmp_path), ["a"], role="train")


def _inside_onnx_read(tmp_path, monkeypatch):
    import onnx

    import importers

    monkeypatch.setattr(onnx, "load", _raise_terminated)
    path = tmp_path / "w.onnx"
    path.write_bytes(b"not read")
    importers._read_onnx(str(path))


def _inside_backend_choice(tmp_path, monkeypatch):
    import torch

    import inference

    monkeypatch.setattr(inference, "_verified", _raise_terminated)
    inference.prepare(torch.nn.Conv2d(3, 4, 3), torch.rand(1, 3, 8, 8))


def _inside_forward_probe(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_probe_model", lambda arch: _Raising())
    models._forward_works("alexnet", 64)


def _inside_torch_load(tmp_path, monkeypatch):
    monkeypatch.setattr(models.torch, "load", _raise_terminated)
    path = tmp_path / "m.pt"
    path.write_bytes(b"not read")
    models._torch_load(str(path), what="model file")


class _Raising(__import__("torch").nn.Linear):
    def __init__(self):
        super().__init__(1, 1)

    def forward(self, x):
        _raise_terminated()


@pytest.mark.parametrize("site", [_inside_image_load, _inside_folder_scan, _inside_onnx_read, _inside_backend_choice,
                                  _inside_forward_probe, _inside_torch_load], ids=lambda f: f.__name__)
def test_sigterm_inside_a_broad_handler_is_not_swallowed(tmp_path, monkeypatch, site):
    """SIGTERM arrives at any bytecode, also inside the ``except Exception`` handlers that turn a
    bad image, file or backend into one line: it must end the run (exit 143), not be reported as
    a bad file or an unusable backend."""
    import main

    with pytest.raises(main.Terminated):
        site(tmp_path, monkeypatch)


def test_sigterm_during_eval_backend_choice_ends_with_143(tmp_path, monkeypatch, capsys):
    import inference
    import main

    model = tmp_path / "model"
    net, _ = models.build_pretrained("alexnet", 2, weights="none")
    models.save_model(str(model), net, arch="alexnet", classes=["cat", "dog"], image_size=SIZE, meta={})
    _, test = make_image_folder(tmp_path / "data", n_train=2, n_test=2, size=SIZE)
    monkeypatch.setattr(inference, "_verified", _raise_terminated)
    code = main.run(["--eval", "--model", str(model), "--test_path", str(test), "--quiet"])
    err = capsys.readouterr().err
    assert code == 143 and err.strip().splitlines()[-1] == "error: terminated" and "Traceback" not in err
