"""Every step under torchrun: two gloo processes on CPU, each launch with a timeout.

Under torchrun --train and --fine_tune train on both ranks (DDP); --decompose (with its
test-set evaluation and the diagonal FC annealing), --eval and --export run on rank 0
alone while rank 1 waits for the outcome.  Before this was so, --train --decompose --eval
deadlocked (rank 0 reducing in evaluate, rank 1 at a barrier) and --eval alone crashed.
Where rank 0 works alone the result must equal a single process's; the single-process
reference runs in this process with one thread, as each torchrun worker does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
import models
from conftest import REPO_ROOT, make_image_folder

SIZE = models.MIN_IMAGE_SIZE["alexnet"]
TIMEOUT_S = 300
COMMON = ["--batch_size", "8", "--workers", "0", "--quiet", "--latency_repeats", "1", "--latency_batch", "2",
          "--device", "cpu"]
# Options of --train (and --epochs, of --fine_tune too): the other steps refuse them.
TRAIN_ONLY = ["--arch", "alexnet", "--image_size", str(SIZE), "--weights", "none", "--epochs", "1"]
# Small FC layers (SVD rank 16) keep DDP's gradient reduction and the ONNX file small.
DECOMPOSE = ["--fc", "svd", "--fc_rank", "16", "--target_macs", "3"]


def torchrun(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(REPO_ROOT / "main.py"), *map(str, argv)],
            capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun {' '.join(map(str, argv))} did not finish in {TIMEOUT_S} s (a rank is blocked)")


def single(capsys, *argv: str) -> tuple[int, str]:
    """The same command in this process, with one thread like each torchrun worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main.run([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert code == 0, err
    return code, out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One torchrun launch through every step: train, decompose (+ test set, budget, plan), fine-tune,
    eval, export."""
    root = tmp_path_factory.mktemp("torchrun")
    train, test = make_image_folder(root / "data", n_train=8, n_test=4, size=SIZE)
    # --epochs 2 comes after TRAIN_ONLY's 1: one epoch checkpoint, written by rank 0 under DDP.
    proc = torchrun(root, "--train", "--decompose", "--fine_tune", "--eval", "--train_path", train, "--test_path",
                    test, *TRAIN_ONLY, *COMMON, "--epochs", "2", *DECOMPOSE, "--save_plan", "plan.json", "--json",
                    "eval.json", "--export", "onnx", "m.onnx")
    return root, train, test, proc


def test_every_step_in_one_launch(pipeline):
    root, _, _, proc = pipeline
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 writes, and the epoch checkpoints are gone once the models are saved.
    assert sorted(os.listdir(root)) == ["data", "decomposed_model", "eval.json", "m.onnx", "model", "plan.json"]
    log = proc.stdout + proc.stderr
    # Both ranks trained, but one speaks: each epoch of the train and the fine-tune once.
    assert log.count("epoch 1/2") == 2 and log.count("epoch 2/2") == 2 and log.count("saved model ") == 1
    assert "test accuracy:" in log and "budget: 3x fewer MACs requested" in log
    _, info = models.load_model(str(root / "decomposed_model"))
    assert len(info["meta"]["fine_tune"]["history"]) == 2 and info["plan"]


def test_rank_0_alone_gives_the_single_process_results(pipeline, capsys, tmp_path):
    root, train, test, proc = pipeline
    assert proc.returncode == 0, proc.stderr[-3000:]
    # --eval: rank 0 evaluated the whole test set itself.
    single(capsys, "--eval", "--model", root / "decomposed_model", "--test_path", test, *COMMON,
           "--json", tmp_path / "eval.json")
    ours, theirs = (json.loads(p.read_text()) for p in (tmp_path / "eval.json", root / "eval.json"))
    assert (ours["test_images"], ours["accuracy"]) == (theirs["test_images"], theirs["accuracy"])
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    # --decompose: rank 0 chose the same plan from the same model.
    # (the same calibration images from --train_path: the plan notes the layers too small to fit to them)
    single(capsys, "--decompose", "--model", root / "model", "--decomposed_model", tmp_path / "d", *COMMON,
           *DECOMPOSE, "--train_path", train, "--save_plan", tmp_path / "plan.json")
    assert (json.loads((tmp_path / "plan.json").read_text())["layers"] ==
            json.loads((root / "plan.json").read_text())["layers"])


def test_diagonal_annealing_on_rank_0_equals_a_single_process(pipeline, capsys, tmp_path):
    root, train, test, proc = pipeline
    assert proc.returncode == 0, proc.stderr[-3000:]
    argv = ["--decompose", "--model", root / "model", "--fc", "diagonal", "--fc_anneal_epochs", "1",
            "--train_path", train, "--test_path", test, *COMMON]
    run = torchrun(tmp_path, *argv, "--decomposed_model", "by_torchrun")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "anneal: mask factor 0.000" in run.stdout + run.stderr
    single(capsys, *argv, "--decomposed_model", tmp_path / "by_one")
    (a, info_a), (b, info_b) = (models.load_model(str(tmp_path / n)) for n in ("by_torchrun", "by_one"))
    assert info_a["plan"] == info_b["plan"] and any(e["method"] == "diagonal" for e in info_a["plan"].values())
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_a_failure_on_rank_0_stops_both_ranks_with_one_line_each(pipeline, tmp_path):
    root, _, _, proc = pipeline
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, other = make_image_folder(tmp_path / "other", n_train=1, n_test=2, size=SIZE, classes=("x", "y"))
    run = torchrun(tmp_path, "--eval", "--model", root / "model", "--test_path", other, *COMMON)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert any("classes" in line for line in errors), run.stderr[-2000:]
    assert any("rank 0 stopped" in line for line in errors), run.stderr[-2000:]
    # Our ranks print no traceback; torchrun's own report of the failed ranks follows theirs.
    ours = run.stderr.split("distributed/elastic")[0]
    assert "error: rank 0 stopped" in ours and "Traceback" not in ours


# ------------------------------------------- ranks that disagree, ranks that die
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, cwd: Path, *argv) -> subprocess.Popen:
    """One worker as torchrun starts it (its environment), so that each rank can be given its own
    arguments, as two nodes with their own folders would have."""
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "main.py"), *map(str, argv)], cwd=cwd, env=env,
                            stderr=subprocess.PIPE, text=True)


def _errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-2000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_ranks_with_different_data_stop_with_one_line_before_training(tmp_path):
    """Was: both ranks blocked in a collective for gloo's 30 minutes, deaf to SIGTERM."""
    small, _ = make_image_folder(tmp_path / "small", n_train=4, n_test=1, size=SIZE)
    large, _ = make_image_folder(tmp_path / "large", n_train=12, n_test=1, size=SIZE)
    port = _free_port()
    procs = [_rank(r, port, tmp_path, "--train", "--train_path", path, "--model", tmp_path / f"m{r}", *TRAIN_ONLY,
                   *COMMON) for r, path in enumerate((small, large))]
    for proc in procs:
        _, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 2
        errors = _errors(err)
        assert len(errors) == 1 and "the ranks' data differ (training images 8 on rank 0, 24 on rank 1" in errors[0]
    assert not list(tmp_path.glob("m*"))


def test_a_killed_rank_stops_the_other_with_one_line(tmp_path):
    """Was: the surviving rank ended with a gloo traceback ("Connection reset by peer")."""
    import signal
    import time

    train, _ = make_image_folder(tmp_path / "data", n_train=16, n_test=1, size=SIZE)
    port = _free_port()
    argv = ["--train", "--train_path", train, *TRAIN_ONLY, *COMMON, "--epochs", "1000", "--batch_size", "4"]
    procs = [_rank(r, port, tmp_path, *argv, "--model", tmp_path / f"m{r}") for r in (0, 1)]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (tmp_path / "m0.checkpoint").exists():  # rank 0 wrote epoch 1's: both ranks are training
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the ranks did not train"
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        _, err = procs[0].communicate(timeout=TIMEOUT_S)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert procs[0].returncode == 1
    errors = _errors(err)
    assert len(errors) == 1 and "another rank stopped or cannot be reached" in errors[0], errors
