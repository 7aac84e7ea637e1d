"""Smoke test of benchmarks/bench_library.py: it runs, prints three figures, writes JSON.

No timing is asserted: only that the script works end to end and that its
reference implementations (EVBMF, tensorly wrappers) compute the right things.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "bench_library.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_library", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


def test_quick_run_prints_three_figures_and_writes_json(tmp_path, bench):
    out = tmp_path / "figures" / "bench.json"
    # A subprocess keeps torch.set_num_threads and logging setup out of this session;
    # one thread avoids oversubscribing a CPU that other tests share.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--skip-reference", "--threads", "1", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    for heading in ("== 1. VBMF ranks", "== 2. Tucker-2", "== 3. CP-ALS", "summary:"):
        assert heading in text, f"missing {heading!r} in:\n{text}"
    for figure in ("ours / limit", "thin SVD of both unfoldings", "torch.linalg.svdvals"):
        assert figure in text
    assert text.count("PASS") + text.count("MISS") >= 3

    data = json.loads(out.read_text())
    assert set(data) == {"meta", "vbmf", "tucker", "cp", "goals"}
    assert data["meta"]["quick"] is True and data["meta"]["threads"] == 1
    assert set(data["goals"]) == {"vbmf", "tucker", "cp"}
    # The summary's goals are the three figures' own verdicts.
    assert data["goals"] == {k: data[k]["pass"] for k in ("vbmf", "tucker", "cp")}

    v = data["vbmf"]
    n_layers = len(data["meta"]["layers"])
    assert v["matrices"] == 2 * n_layers == len(v["ranks_ours"])
    for key in ("ours_s", "limit_s", "limit_tall_s", "ratio"):
        assert v[key] > 0 and math.isfinite(v[key])
    assert v["ratio"] == pytest.approx(v["ours_s"] / v["limit_s"])
    assert v["reference_s"] is None  # --skip-reference

    t = data["tucker"]
    assert t["ratio"] == pytest.approx(t["ours_s"] / t["limit_s"])
    assert len(t["layers"]) == n_layers
    assert all(0 < row["error_ours"] < 1 for row in t["layers"])
    assert t["error_pass"] is None and t["reference_s"] is None

    cp = data["cp"]
    assert set(cp) == {"layer", "vgg16", "pass"}
    for run in ("full", "default_tol"):
        layer_run = cp["layer"][run]
        assert layer_run["ours_s"] > 0 and 0 < layer_run["error_check"] < 1
        # The error cp_als reports is the error of the factors it returns.
        assert layer_run["error_ours"] == pytest.approx(layer_run["error_check"], rel=1e-3)
        model_run = cp["vgg16"][run]
        assert len(model_run["per_layer"]) == n_layers
        assert model_run["ours_s"] > 0
        checks = (layer_run["time_pass"], layer_run["error_pass"], model_run["time_pass"])
        assert model_run["goal_pass"] == all(c is not False for c in checks)
        assert layer_run["time_pass"] == (layer_run["ours_s"] < bench.CP_LAYER_GOAL_S)
    assert cp["layer"]["reference_s"] is None


def _planted(shape, rank, noise, seed):
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
    return (signal + noise * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("shape", [(40, 100), (100, 40), (30, 30)])
def test_reference_evbmf_agrees_with_library(bench, shape):
    import vbmf

    y = _planted(shape, rank=5, noise=0.5, seed=1)
    ref = bench.reference_evbmf(y)
    ours = vbmf.evbmf(y)
    assert ref["rank"] == ours.rank == 5
    assert ref["sigma2"] == pytest.approx(ours.sigma2, rel=1e-3)
    np.testing.assert_allclose(ref["estimates"], ours.singular_values, rtol=1e-3)
    assert ref["u"].shape == (min(shape), 5) and ref["vt"].shape == (5, max(shape))


def test_reference_evbmf_pure_noise_gives_rank_zero(bench):
    y = np.random.default_rng(2).standard_normal((50, 200)).astype(np.float32)
    assert bench.reference_evbmf(y)["rank"] == 0


def test_reference_paths_on_a_tiny_layer(bench):
    # The tensorly references and error comparisons, on a layer small enough to be instant.
    torch.manual_seed(0)
    convs = [("tiny", torch.randn(9, 6, 3, 3))]
    tucker = bench.bench_tucker(convs, repeats=1, device=torch.device("cpu"), reference=True)
    row = tucker["layers"][0]
    assert row["ranks"] == [3, 2]
    assert 0 < row["error_reference"] < 1 and 0 < row["error_ours"] < 1
    assert tucker["worst_error_ratio"] == pytest.approx(row["error_ours"] / row["error_reference"])
    assert tucker["error_pass"] == (tucker["worst_error_ratio"] <= bench.TUCKER_ERROR_SLACK)

    cp = bench.bench_cp(convs, layer_name="tiny", repeats=1, device=torch.device("cpu"), reference=True,
                        reference_all=True)
    layer = cp["layer"]
    assert layer["rank"] == 3 and 0 < layer["error_reference"] < 1
    assert 1 <= layer["reference_iterations"] <= bench.CP_ITERATIONS
    assert layer["full"]["error_pass"] == (layer["full"]["error_check"] <= layer["error_reference"])
    assert "error_reference" in cp["vgg16"]["full"]["per_layer"][0]


def test_dense_reconstructions_match_definitions(bench):
    g = torch.Generator().manual_seed(3)
    core, u_out, u_in = torch.randn(2, 3, 3, 3, generator=g), torch.randn(5, 2, generator=g), torch.randn(4, 3, generator=g)
    dense = bench.tucker_dense(core, u_out, u_in)
    assert dense.shape == (5, 4, 3, 3)
    assert torch.allclose(dense[1, 2], sum(u_out[1, o] * u_in[2, i] * core[o, i] for o in range(2) for i in range(3)),
                          atol=1e-5)
    factors = [torch.randn(n, 2, generator=g) for n in (5, 4, 3, 3)]
    weights = torch.tensor([2.0, -1.0])
    full = bench.cp_dense(factors, weights)
    a, b, c, d = factors
    expected = sum(weights[r] * a[1, r] * b[2, r] * c[0, r] * d[2, r] for r in range(2))
    assert torch.allclose(full[1, 2, 0, 2], expected, atol=1e-5)


def test_unfold_shapes(bench):
    w = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    assert bench.unfold(w, 0).shape == (2, 60) and bench.unfold(w, 1).shape == (3, 40)
    assert torch.equal(bench.unfold(w, 1)[1], w[:, 1].reshape(-1))
