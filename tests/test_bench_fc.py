"""Smoke test of benchmarks/bench_fc.py on a tiny synthetic folder: it runs end to end,
prints the Markdown table, writes JSON and Markdown, and its parameter matching is right.

No accuracy is asserted (one epoch on 16 images means nothing): only that the
script works, that the compressed rows have equal FC parameter counts, and that the
conversion after annealing is exact.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from conftest import make_image_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "bench_fc.py"
METHODS = ["dense (no compression)", "svd", "svd, equal budget", "diagonal, projection",
           "diagonal, projection, equal budget", "diagonal, projection + rescale", "diagonal, annealed"]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_fc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_prints_table_and_writes_json(tmp_path):
    make_image_folder(tmp_path / "data", n_train=8, n_test=4, size=32)
    out_json, out_md = tmp_path / "out" / "fc.json", tmp_path / "out" / "fc.md"
    # A subprocess keeps torch.set_num_threads and logging setup out of this session.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--data", str(tmp_path / "data"), "--threads", "1",
         "--budget-control", "all",
         "--json", str(out_json), "--markdown", str(out_md)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| method | b | FC params |" in proc.stdout
    for method in METHODS:
        assert f"| {method} |" in proc.stdout, method

    data = json.loads(out_json.read_text())
    assert set(data) == {"meta", "rows", "markdown"}
    meta = data["meta"]
    assert meta["quick"] is True and meta["arch"] == "alexnet" and meta["threads"] == 1
    assert meta["compressed_layers"] == ["classifier.1", "classifier.4"]
    assert meta["train_images"] == 16 and meta["test_images"] == 8
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == METHODS
    dense = rows["dense (no compression)"]
    # AlexNet's FC layers 9216->4096->4096 (weights and biases).
    assert dense["fc_params"] == 9216 * 4096 + 4096 + 4096 * 4096 + 4096
    # Default b = 26 matches SVD ranks 18 and 13 exactly.
    compressed = [rows[m] for m in METHODS[1:]]
    assert {r["fc_params"] for r in compressed} == {(9216 + 4096) * 26 + 2 * 4096}
    assert {r["total_params"] for r in compressed} == {
        dense["total_params"] - dense["fc_params"] + compressed[0]["fc_params"]}
    svd_layers = {layer["name"]: layer["ranks"] for layer in rows["svd"]["layers"]}
    assert svd_layers == {"classifier.1": [18], "classifier.4": [13]}
    for r in compressed:
        assert 0 <= r["acc_compressed"] <= 1 and 0 <= r["acc_finetuned"] <= 1
    assert rows["svd, equal budget"]["finetune_epochs"] == 2
    annealed = rows["diagonal, annealed"]
    assert annealed["extra_epochs"] == 1 and annealed["finetune_epochs"] == 1
    assert annealed["conversion"]["predictions_changed"] == 0
    assert annealed["conversion"]["max_abs_logit_change"] < 1e-4
    assert annealed["conversion"]["acc_before_conversion"] == annealed["acc_compressed"]
    assert annealed["anneal"]["off_mass"] == {"classifier.1": 0.0, "classifier.4": 0.0}
    assert all(g > 1 for g in annealed["anneal"]["gain"].values())  # rescaled by default
    assert all(layer["method"] == "diagonal" for layer in annealed["layers"])

    text = out_md.read_text()
    assert "--quick" in text and "torch" in text and data["markdown"] in text


def test_missing_source_is_reported(tmp_path, capsys):
    bench = _load_bench()
    status = bench.main(["--quick", "--data", str(tmp_path / "nothing"),
                         "--source", str(tmp_path / "no-fashion-mnist")])
    err = capsys.readouterr().err
    assert status == 2
    assert "no-fashion-mnist" in err and "dataset-fashion-mnist" in err
    assert err.count("\n") == 1  # one line


@pytest.mark.parametrize(("in_f", "out_f", "band", "rank"),
                         [(9216, 4096, 26, 18), (4096, 4096, 26, 13), (48, 32, 1, 1), (8, 4, 100, 5)])
def test_matched_svd_rank(in_f, out_f, band, rank):
    bench = _load_bench()
    assert bench.matched_svd_rank(nn.Linear(in_f, out_f), band) == rank


def test_compressed_fc_names_keep_the_classifier():
    bench = _load_bench()
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    assert bench.compressed_fc_names(model) == ["0", "2.0"]
