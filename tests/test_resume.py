"""--resume: an interrupted --train or --fine_tune continues from its last completed epoch and
ends with the weights an uninterrupted run gives (CPU, same seed, --workers 0)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import finetune
import main
import models
from conftest import REPO_ROOT, make_image_folder

SIZE = models.MIN_IMAGE_SIZE["alexnet"]
COMMON = ["--batch_size", "8", "--workers", "0", "--quiet", "--device", "cpu"]
TRAIN_ONLY = ["--arch", "alexnet", "--image_size", str(SIZE), "--weights", "none"]  # the other steps refuse them
KILL_TIMEOUT_S = 300


def run(capsys, *argv) -> tuple[int, str]:
    code = main.run([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_same_weights(a: Path, b: Path) -> None:
    (first, _), (second, _) = models.load_model(str(a)), models.load_model(str(b))
    one, two = first.state_dict(), second.state_dict()
    assert one.keys() == two.keys()
    different = [k for k in one if not torch.equal(one[k], two[k])]
    assert not different, different


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), n_train=12, n_test=2, size=SIZE)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """--train for two epochs, uninterrupted: the reference, and the model the fine-tune tests start from."""
    path = tmp_path_factory.mktemp("reference") / "model"
    assert main.run([str(a) for a in ("--train", "--train_path", data[0], "--model", path, "--epochs", "2",
                                      *TRAIN_ONLY, *COMMON)]) == 0
    return path


def test_ctrl_c_in_training_then_resume_gives_the_uninterrupted_weights(tmp_path, capsys, caplog, monkeypatch,
                                                                        data, trained):
    out = tmp_path / "new"  # a folder the run creates: the first checkpoint comes before the model
    argv = ["--train", "--train_path", data[0], "--model", out / "model", "--epochs", "2", *TRAIN_ONLY, *COMMON]
    calls = []
    real = finetune.train_one_epoch

    def interrupted_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune, "train_one_epoch", interrupted_in_epoch_2)
    code, err = run(capsys, *argv)
    assert code == 130 and err.strip().splitlines()[-1] == "error: interrupted"
    # The last good file: the checkpoint after epoch 1; no model yet, no temporary file.
    assert sorted(os.listdir(out)) == ["model.checkpoint"]
    state = torch.load(out / "model.checkpoint", weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 1
    monkeypatch.setattr(finetune, "train_one_epoch", real)

    with caplog.at_level(logging.INFO):
        code, err = run(capsys, *argv, "--resume")
    assert code == 0, err
    assert "resuming after epoch 1/2" in caplog.text
    assert sorted(os.listdir(out)) == ["model"]  # the checkpoint goes once the model is saved
    assert_same_weights(out / "model", trained)
    _, info = models.load_model(str(out / "model"))
    assert [r["epoch"] for r in info["meta"]["history"]] == [1, 2]


def test_resume_refuses_other_options_and_a_missing_checkpoint(tmp_path, capsys, data):
    base = ["--train", "--train_path", data[0], "--model", tmp_path / "model", *TRAIN_ONLY, *COMMON]
    code, err = run(capsys, *base, "--epochs", "2", "--resume")
    assert code == 2 and f"nothing to resume: no checkpoint {tmp_path / 'model'}.checkpoint" in err
    torch.save({"format": finetune.CHECKPOINT_FORMAT, "epoch": 1, "config": {"lr": 0.5, "epochs": 2}},
               tmp_path / "model.checkpoint")
    code, err = run(capsys, *base, "--epochs", "2", "--resume")
    assert code == 2 and "is from a run with other options" in err and "lr 0.5 there" in err
    assert "Traceback" not in err
    code, err = run(capsys, "--decompose", "--model", tmp_path / "model", "--resume", *COMMON)
    assert code == 2 and "--resume continues --train or --fine_tune" in err
    code, err = run(capsys, "--decompose", "--fine_tune", "--train_path", data[0], "--model", tmp_path / "model",
                    "--resume", *COMMON)
    assert code == 2 and "resume --fine_tune alone" in err
    # A checkpoint of the right options whose contents do not fit (edited, or from another model).
    config = torch.load(tmp_path / "model.checkpoint", weights_only=True)["config"]
    config = {**config, "lr": main.DEFAULT_LR["train"], "epochs": 2, "batch_size": 8, "seed": 0, "step": "train",
              "arch": "alexnet", "weights": "none", "image_size": SIZE, "train_path": os.path.abspath(data[0]),
              "workers": 0, "world_size": 1, "freeze_features": False, "keep_last": False,
              "pretrained_lr_scale": main.DEFAULT_PRETRAINED_LR_SCALE, "fresh_lr": "scaled",
              "test_path": None, "device": "cpu",
              "source_sha256": None, **({"cpu_bf16": True} if main.runtime.cpu_bf16_supported() else {})}
    torch.save({"format": finetune.CHECKPOINT_FORMAT, "epoch": 1, "config": config, "model": {"x": torch.ones(1)}},
               tmp_path / "model.checkpoint")
    code, err = run(capsys, *base, "--epochs", "2", "--resume")
    assert code == 2 and "the checkpoint is damaged: no 'optimizer'" in err and "Traceback" not in err


def test_a_pipeline_with_freeze_features_resumes_its_fine_tuning(tmp_path, capsys, monkeypatch, data):
    """--train --freeze_features --decompose --fine_tune interrupted while fine-tuning resumes with
    --fine_tune --resume (which refuses --freeze_features): the option is --train's alone."""
    calls = []
    real = finetune.train_one_epoch

    def interrupted_in_fine_tuning_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # train 1, 2, fine-tune 1, then fine-tune 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune, "train_one_epoch", interrupted_in_fine_tuning_epoch_2)
    decomposed = tmp_path / "d"
    code, _ = run(capsys, "--train", "--freeze_features", *TRAIN_ONLY, "--decompose", "--fc", "svd", "--fc_rank", "8",
                  "--rank_ratio", "0.5", "--fine_tune", "--train_path", data[0], "--model", tmp_path / "m",
                  "--decomposed_model", decomposed, "--epochs", "2", *COMMON)
    assert code == 130 and Path(f"{decomposed}.checkpoint").exists()
    monkeypatch.setattr(finetune, "train_one_epoch", real)
    code, err = run(capsys, "--fine_tune", "--decomposed_model", decomposed, "--train_path", data[0], "--epochs", "2",
                    "--resume", *COMMON)
    assert code == 0, err
    assert not Path(f"{decomposed}.checkpoint").exists()


def _decomposed(tmp_path: Path, trained: Path) -> Path:
    path = tmp_path / "decomposed"
    assert main.run([str(a) for a in ("--decompose", "--model", trained, "--decomposed_model", path, "--fc", "svd",
                                      "--fc_rank", "16", "--rank_ratio", "0.5", *COMMON)]) == 0
    return path


def _fine_tune(path: Path, train: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "main.py"), "--fine_tune", "--decomposed_model",
                             str(path), "--train_path", str(train), "--epochs", "4", *COMMON, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_fine_tune_then_resume_gives_the_uninterrupted_weights(tmp_path, capsys, data, trained):
    decomposed = _decomposed(tmp_path, trained)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    reference.write_bytes(decomposed.read_bytes())
    killed.write_bytes(decomposed.read_bytes())
    proc = _fine_tune(reference, data[0])
    assert proc.wait(timeout=KILL_TIMEOUT_S) == 0, proc.stderr.read()[-2000:]

    proc = _fine_tune(killed, data[0])
    checkpoint = Path(f"{killed}.checkpoint")
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: as a crash or the OOM killer
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert killed.read_bytes() == decomposed.read_bytes()  # the input is only replaced at the end
    epoch = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= epoch < 4
    kept = checkpoint.read_bytes()

    proc = _fine_tune(killed, data[0], "--resume")
    assert proc.wait(timeout=KILL_TIMEOUT_S) == 0, proc.stderr.read()[-2000:]
    assert f"resuming after epoch {epoch}/4" in proc.stderr.read()
    assert not checkpoint.exists()
    assert_same_weights(killed, reference)
    # That checkpoint belongs to the model before fine-tuning: resuming it into another is refused.
    checkpoint.write_bytes(kept)
    code, err = run(capsys, "--fine_tune", "--decomposed_model", killed, "--train_path", data[0], "--epochs", "4",
                    "--resume", *COMMON)
    assert code == 2 and "is from a run with other options (source_sha256" in err
    assert killed.read_bytes() != decomposed.read_bytes()
    # --decompose replaces the model a fine-tuning checkpoint belongs to, and drops the checkpoint.
    assert main.run([str(a) for a in ("--decompose", "--model", trained, "--decomposed_model", killed, "--fc",
                                      "svd", "--fc_rank", "16", "--rank_ratio", "0.5", *COMMON)]) == 0
    assert not checkpoint.exists()
