"""Real-data benchmark: train, decompose (Tucker-2, CP, Tucker-2 + FC SVD), fine-tune, measure.

For each architecture on a two-class image folder (default
``data/fashion-mnist-shirt``, T-shirt/top vs Shirt, built by
``benchmarks/make_fashion_mnist.py``) -- vgg16, vgg19 and alexnet with ImageNet
weights (``--weights_dir``), vgg16_bn, vgg19_bn and alexnet from scratch (see
:data:`SCRATCH_ARCHS` for why):

1. **train** the original: ImageNet weights when ``--weights_dir DIR`` holds
   ``DIR/<arch>.pth`` (a state_dict), else from scratch (the settings below);
2. **decompose** a copy of it three ways -- ``tucker`` (Tucker-2 of the convs),
   ``cp`` (CP of the convs), ``tucker+svd`` (Tucker-2 of the convs and truncated
   SVD of the hidden Linear layers) -- and **fine-tune** each;
3. **measure** test accuracy (original; decomposed before fine-tuning; after),
   parameters, MACs (at the benchmark size and at 224 px) and their ratios, CPU
   latency at batch 1 and 8 at the benchmark size and at 224 px (through
   :mod:`inference`, all models of an architecture timed in one process in
   interleaved rounds, median reported), decomposition and fine-tuning time.

From a trained weights file (``--weights FILE``: a state_dict, or an ONNX / Keras model
whose convs fit the arch, as ``main.py --weights``), the defaults change to what the tool
itself does with trained weights: plain ``vgg16`` at 64 px, three seeds (mean and spread
in a second table), the tool's learning rates (fresh layers 0.01, loaded ones 0.001;
fine-tuning 0.001 Tucker-2, 0.0001 CP), VBMF conv ranks and fixed FC ranks (the FC layers
start fresh), output in ``benchmarks/results/trained``.  ``--latency_from JSON``
re-times an earlier run's models on this machine, rebuilt from their ranks.

Outputs in ``--out_dir``: ``bench_real.json`` (everything, written after each
architecture), ``bench_real.md`` (the tables) and ``bench_real.png`` (test
accuracy against MACs, one colour per method).

Settings (from scratch, chosen to fit a 2-core CPU):

* image size: 32 px for VGG (Fashion-MNIST images are 28 px; 32 px is VGG's
  smallest input), 64 px for AlexNet (its smallest is 63 px);
* SGD momentum 0.9, weight decay 5e-4, warm-up + cosine (``finetune.fit``), batch
  32, 6 training epochs at :data:`TRAIN_LR` (0.002 for VGG, 0.02 for AlexNet), 3
  fine-tuning epochs at the training rate (Tucker-2) or half of it (CP: CP layers
  are unstable under large steps, Lebedev et al. 2015), see :data:`FT_LR_FACTOR`;
* the first conv (3 input channels) is never decomposed;
* ranks (``--ranks auto``): VBMF (EVBMF of the unfoldings, as in Kim et al. 2016)
  when it is usable, else ``--rank_ratio`` (0.25) of the channels.  VBMF on weights
  trained from scratch for a few epochs is degenerate (rank 0 = "only noise" in every
  layer, or nearly full ranks that save nothing), so "usable" means: no layer at rank
  0 and the conv MACs shrink at least :data:`MIN_VBMF_MAC_RATIO`-fold.  The CP rank
  of a layer is the larger of its two Tucker ranks.  The same test, with
  ``--fc_rank_ratio`` (0.05), picks the SVD ranks of the hidden Linear layers.  The
  JSON says which source was used and why.

Usage::

    python benchmarks/make_fashion_mnist.py data/fashion-mnist-shirt --train_per_class 1000 \\
        --test_per_class 1000 --seed 0
    python benchmarks/bench_real.py data/fashion-mnist-shirt              # full run
    python benchmarks/bench_real.py data/fashion-mnist-shirt --quick      # vgg16_bn on 250 images/class

References
----------
.. [1] Kim, Y.-D. et al. "Compression of Deep Convolutional Neural Networks for Fast
   and Low Power Mobile Applications", ICLR 2016, arXiv:1511.06530.
.. [2] Lebedev, V. et al. "Speeding-up Convolutional Neural Networks Using Fine-tuned
   CP-Decomposition", ICLR 2015, arXiv:1412.6553.
.. [3] Girshick, R. "Fast R-CNN", ICCV 2015 (truncated SVD of fc layers).
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Run as ``python benchmarks/bench_real.py``: the project modules live one level up.
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (REPO_ROOT, BENCH_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import dataset  # noqa: E402
import decompositions  # noqa: E402
import ranks  # noqa: E402
import finetune  # noqa: E402
import runtime  # noqa: E402
import inference  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402
import main as main_cli  # noqa: E402 - the tool's default learning rates
from bench_inference import machine_info  # noqa: E402
from threads import lapack_threads  # noqa: E402

logger = logging.getLogger("bench_real")

DEFAULT_DATA = REPO_ROOT / "data" / "fashion-mnist-shirt"
DEFAULT_OUT = BENCH_DIR / "results"
#: Where a run from a trained weights file (``--weights FILE``) writes by default.
TRAINED_OUT = DEFAULT_OUT / "trained"
#: Trained weights (``--weights FILE``): the archs, benchmark size and seeds by default.
TRAINED_ARCHS = ("vgg16",)
TRAINED_IMAGE_SIZE = 64
TRAINED_SEEDS = (0, 1, 2)
#: The issue's architectures, used with ImageNet weights (``--weights_dir``).
PRETRAINED_ARCHS = ("vgg16", "vgg19", "alexnet")
#: Trained from scratch (no weights file): plain VGG has no BatchNorm and does not train from
#: scratch in a CPU budget (measured: 67% after 6 epochs at lr 0.002; lr 0.01 diverges), and
#: every decomposition of it collapses to a constant prediction that fine-tuning cannot undo,
#: so the BatchNorm variants stand in for vgg16 and vgg19 there.
SCRATCH_ARCHS = ("vgg16_bn", "vgg19_bn", "alexnet")
METHODS = ("tucker", "cp", "tucker+svd")
#: Benchmark image size per architecture (from-scratch setting, see the module docstring).
DEFAULT_IMAGE_SIZE = {"vgg16": 32, "vgg19": 32, "vgg16_bn": 32, "vgg19_bn": 32, "alexnet": 64}
#: The size latency and MACs are also reported at (ImageNet's).
REFERENCE_SIZE = 224
DEFAULT_EPOCHS, QUICK_EPOCHS = 6, 5
#: --quick trains and tests on this many images per class (a seeded subset of the folder).
QUICK_PER_CLASS = 250
DEFAULT_FT_EPOCHS, QUICK_FT_EPOCHS = 3, 2
DEFAULT_BATCH_SIZE = 32
#: Training learning rate per architecture family (batch 32).  VGG at 32 px: VGG's 7x7
#: adaptive pool copies the 1x1 map 49 times into fc6, so its 49 weight copies move together
#: and the effective step is large; 0.002 trains vgg16_bn, 0.01 diverges.  AlexNet at 64 px
#: takes a larger rate (its pool input is not replicated as much).
TRAIN_LR = {"vgg": 0.002, "alexnet": 0.02}
#: Fine-tuning learning rate per method as a fraction of the training rate: CP layers are
#: unstable under large steps (Lebedev et al. [2]_).  A rate above the training one made
#: Tucker-2 fine-tuning of vgg16_bn unstable (train loss 0.85 > ln 2 at 0.005).
FT_LR_FACTOR = {"tucker": 1.0, "cp": 0.5, "tucker+svd": 1.0}
#: Fallback ranks as a fraction of the channels (Tucker: of each mode; CP: of the larger one).
DEFAULT_RANK_RATIO = 0.25
#: Fallback SVD rank of hidden Linear layers as a fraction of min(in, out).
DEFAULT_FC_RANK_RATIO = 0.05
#: VBMF ranks are used only when they shrink the decomposed layers' MACs at least this much.
MIN_VBMF_MAC_RATIO = 1.5
RANK_CHOICES = ("auto", "vbmf", "ratio")
LATENCY_BATCHES = (1, 8)
DEFAULT_LATENCY_BACKENDS = ("onnx", "eager")
QUICK_LATENCY_BACKENDS = ("onnx",)
DEFAULT_LATENCY_REPEATS, QUICK_LATENCY_REPEATS = 5, 3
LATENCY_WARMUP = 1
SEED = 0


# ----------------------------------------------------------------------------- ranks
def _conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]


def _hidden_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][:-1]


def choose_ranks(model: nn.Module, *, input_size: Sequence[int], policy: str = "auto",
                 rank_ratio: float = DEFAULT_RANK_RATIO, fc_rank_ratio: float = DEFAULT_FC_RANK_RATIO,
                 skip: Sequence[str] = (), fc_policy: str | None = None) -> dict[str, Any]:
    """The benchmark's plans: VBMF ranks, or a fraction of the channels (chosen by :mod:`ranks`).

    Parameters
    ----------
    model : nn.Module
        The trained model (not modified).
    input_size : (C, H, W)
        Where the MACs of the VBMF check are counted.
    policy : {"auto", "vbmf", "ratio"}
        ``"auto"``: VBMF where usable (no rank 0, at least :data:`MIN_VBMF_MAC_RATIO`
        fewer MACs in the decomposed convs; for the Linear layers: no rank 0 and a
        smaller layer), else the ratios.  ``"vbmf"`` forces VBMF (layers at rank 0
        are then kept), ``"ratio"`` the ratios.
    rank_ratio, fc_rank_ratio : float in (0, 1]
        The fallback fractions.
    skip : names of convs to leave alone.
    fc_policy : {"auto", "vbmf", "ratio"}, optional
        The same choice for the hidden Linear layers (default: ``policy``).

    Returns
    -------
    dict
        ``plans`` (``tucker``, ``cp``, ``svd``: a plan each), the ranks they hold as
        ``tucker`` (name -> (R_out, R_in)), ``cp`` and ``svd`` (name -> R),
        ``conv_source`` / ``fc_source`` ("vbmf" or "ratio"), ``conv_reason`` /
        ``fc_reason`` (why), ``vbmf_conv`` / ``vbmf_fc`` (the VBMF estimates, or None
        when not computed) and ``vbmf_conv_mac_ratio``.
    """
    fc_policy = policy if fc_policy is None else fc_policy
    if policy not in RANK_CHOICES or fc_policy not in RANK_CHOICES:
        raise ValueError(f"rank policies must be among {RANK_CHOICES}, got {policy!r} and {fc_policy!r}")
    kept = {name: "first conv kept" for name in skip}
    convs = [(n, m) for n, m in _conv_layers(model) if n not in skip]
    linears = _hidden_linears(model)
    result: dict[str, Any] = {"vbmf_conv": None, "vbmf_fc": None, "vbmf_conv_mac_ratio": None}

    spectra: dict = {}  # one SVD per matrix, shared by the Tucker, CP and SVD plans

    def plans(conv_rule: dict, fc_rule: dict) -> dict[str, dict]:
        with lapack_threads():
            out = {m: ranks.plan_decomposition(model, ranks.Policy(conv=m, skip=kept, **conv_rule), input_size,
                                               spectra=spectra)
                   for m in ("tucker", "cp")}
            out["svd"] = ranks.plan_decomposition(model, ranks.Policy(conv="none", fc="svd", **fc_rule), input_size,
                                                  spectra=spectra)
        return out

    # ---- convs
    conv_source, conv_reason = "ratio", "--ranks ratio"
    if policy != "ratio":
        vbmf_plans = plans({}, {})
        with lapack_threads():
            estimates = {n: tuple(int(r) for r in ranks.estimate_tucker_ranks(m)) for n, m in convs}
        result["vbmf_conv"] = {n: list(r) for n, r in estimates.items()}
        zero = [n for n, r in estimates.items() if min(r) == 0]
        conv_plan = {n: e for n, e in vbmf_plans["tucker"].items() if n in estimates}
        mac_ratio = _conv_mac_ratio(model, conv_plan, input_size)
        result["vbmf_conv_mac_ratio"] = mac_ratio
        if policy == "vbmf":
            conv_source, conv_reason = "vbmf", "--ranks vbmf"
        elif zero:
            conv_reason = f"VBMF found only noise (rank 0) in {len(zero)} of {len(convs)} convs"
        elif mac_ratio < MIN_VBMF_MAC_RATIO:
            conv_reason = (f"VBMF ranks would cut the conv MACs only {mac_ratio:.2f}x "
                           f"(< {MIN_VBMF_MAC_RATIO}x)")
        else:
            conv_source, conv_reason = "vbmf", f"VBMF usable ({mac_ratio:.2f}x fewer conv MACs)"
    ratio_plans = plans({"rank_ratio": rank_ratio}, {"fc_rank_ratio": fc_rank_ratio})
    chosen = vbmf_plans if conv_source == "vbmf" else ratio_plans
    result["plans"] = {"tucker": chosen["tucker"], "cp": chosen["cp"]}
    result["conv_source"], result["conv_reason"] = conv_source, conv_reason

    # ---- hidden Linear layers
    fc_source, fc_reason = "ratio", "--fc_ranks ratio"
    if fc_policy != "ratio" and linears:
        fc_vbmf = vbmf_plans["svd"] if policy != "ratio" else plans({}, {})["svd"]
        result["vbmf_fc"] = {n: e.get("rank", 0) for n, e in fc_vbmf.items() if n in dict(linears)}
        useless = [n for n, e in fc_vbmf.items() if e["method"] == "none" and n in dict(linears)]
        if fc_policy == "vbmf":
            fc_source, fc_reason = "vbmf", "--fc_ranks vbmf"
        elif useless:
            fc_reason = f"VBMF ranks are 0 or would not shrink {len(useless)} of {len(linears)} Linear layers"
        else:
            fc_source, fc_reason = "vbmf", "VBMF usable"
        if fc_source == "vbmf":
            result["plans"]["svd"] = fc_vbmf
    result["plans"].setdefault("svd", ratio_plans["svd"])
    result["fc_source"], result["fc_reason"] = fc_source, fc_reason
    result["tucker"] = {n: tuple(e["ranks"]) for n, e in result["plans"]["tucker"].items() if "ranks" in e}
    result["cp"] = {n: e["rank"] for n, e in result["plans"]["cp"].items() if "rank" in e}
    result["svd"] = {n: e["rank"] for n, e in result["plans"]["svd"].items() if "rank" in e}
    return result


def _conv_mac_ratio(model: nn.Module, plan: dict[str, dict], input_size: Sequence[int]) -> float:
    """How many times fewer MACs the planned convs need (the convs alone)."""
    shapes = report.record_input_shapes(model, input_size)
    before = sum(shapes[n][1] for n in plan if n in shapes)
    cost = ranks.plan_cost(model, plan, input_size)
    after = before - (cost["macs_before"] - cost["macs_after"])
    return before / after if after else float("inf")


# ------------------------------------------------------------------------ decompose
def decompose(model: nn.Module, method: str, ranks_: dict[str, Any], *, input_size: Sequence[int],
              skip: Sequence[str], cp_max_iter: int, seed: int, threads: int = 1, rescale: bool = True
              ) -> tuple[nn.Module, list[dict], float]:
    """A decomposed copy of ``model``: (copy, per-layer report rows, seconds).

    ``ranks_`` is :func:`choose_ranks`' result: its ``plans`` are applied (the conv
    method's, and the SVD plan for ``tucker+svd``); the layers in ``skip`` are kept.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    net = copy.deepcopy(model)
    plan = dict(ranks_["plans"]["cp" if method == "cp" else "tucker"])
    if method == "tucker+svd":
        plan.update(ranks_["plans"]["svd"])
    plan.update({name: {"method": "none", "reason": "first conv kept"} for name in skip})
    start = time.perf_counter()
    # One thread by default: many small LAPACK calls, see threads.py.  On a large idle
    # machine more threads speed up the FC SVD's big matrix products.
    with lapack_threads(threads):
        rows = decompositions.decompose_model(net, plan, input_size=input_size, cp_max_iter=cp_max_iter,
                                              seed=seed, rescale=rescale)
    seconds = time.perf_counter() - start
    return net, [r.as_dict() for r in rows], seconds


# -------------------------------------------------------------------------- latency
def measure_latencies(nets: dict[str, nn.Module], *, sizes: Sequence[int], backends: Sequence[str],
                      batches: Sequence[int] = LATENCY_BATCHES, repeats: int, warmup: int = LATENCY_WARMUP,
                      seed: int = SEED, progress: bool = False) -> dict[str, Any]:
    """CPU latency of every model, backend, image size and batch size.

    For each image size, one predictor per (model, backend) is prepared with
    :func:`inference.prepare` (checked against eager; a backend that fails is
    recorded with its error) and all of them are timed at every batch size in
    interleaved rounds (:func:`inference.time_interleaved`).

    Returns
    -------
    dict
        ``{model: {backend: {str(size): {str(batch): median_ms}}}}`` plus, under
        ``"errors"``, the backends that could not be prepared.
    """
    cpu = torch.device("cpu")
    out: dict[str, Any] = {name: {b: {} for b in backends} for name in nets}
    errors: dict[str, str] = {}
    gen = torch.Generator().manual_seed(seed)
    for size in sizes:
        examples = {b: torch.randn(b, 3, size, size, generator=gen) for b in batches}
        predictors = {}
        for name, net in nets.items():
            net_cpu = copy.deepcopy(net).to(cpu).eval()
            for backend in backends:
                try:
                    predictors[name, backend] = inference.prepare(net_cpu, examples[max(batches)], backend=backend)
                except Exception as exc:  # noqa: BLE001 - reported, the others still run
                    errors[f"{name}/{backend}/{size}"] = f"{type(exc).__name__}: {exc}"[:300]
                    logger.warning("latency: %s on %s at %d px failed: %s", name, backend, size, exc)
            del net_cpu
        calls = {(name, backend, b): (lambda p=p, x=examples[b]: p(x))
                 for (name, backend), p in predictors.items() for b in batches}
        times = inference.time_interleaved(calls, warmup=warmup, repeats=repeats, progress=progress,
                                           desc=f"latency {size} px")
        for (name, backend, b), values in times.items():
            out[name][backend].setdefault(str(size), {})[str(b)] = statistics.median(values)
        del predictors, calls
        gc.collect()
    out["errors"] = errors
    return out


# ---------------------------------------------------------------------------- output
def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.0f}" if value >= 100 else f"{value:.1f}")


def _fmt_s(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _latency(result: dict, name: str, backend: str, size: int, batch: int) -> float | None:
    return result.get("latency", {}).get(name, {}).get(backend, {}).get(str(size), {}).get(str(batch))


def format_markdown(payload: dict[str, Any]) -> str:
    """The Markdown tables of a run: the main one (first latency backend) and one per extra backend."""
    backends = payload["settings"]["latency_backends"]
    lines = []
    if not payload["archs"]:
        return "(no results)"
    main = backends[0] if backends else None
    lines.append(f"Latency: CPU, {main} backend, median ms of interleaved rounds; size = benchmark size / "
                 f"{REFERENCE_SIZE} px; speedup = original / decomposed at batch 8.")
    lines.append("")
    lines.append("| arch | method | size | acc. original | acc. decomposed | acc. fine-tuned | params | params ratio "
                 "| MACs | MACs ratio | MACs @224 | ms b1 / b8 | ms b1 / b8 @224 | speedup b8 / b8 @224 "
                 "| decompose s | fine-tune s |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arch, res in payload["archs"].items():
        size = res["image_size"]
        for row in res["rows"]:
            name = row["method"]
            lat = [_latency(res, name, main, s, b) for s in (size, REFERENCE_SIZE) for b in LATENCY_BATCHES]
            base = [_latency(res, "original", main, s, 8) for s in (size, REFERENCE_SIZE)]
            mine = [_latency(res, name, main, s, 8) for s in (size, REFERENCE_SIZE)]
            speed = " / ".join(f"{b / m:.2f}x" if b and m else "-" for b, m in zip(base, mine))
            acc_dec = "-" if row["acc_decomposed"] is None else f"{row['acc_decomposed']:.2%}"
            acc_ft = "-" if row["acc_finetuned"] is None else f"{row['acc_finetuned']:.2%}"
            lines.append(
                f"| {arch} | {name} | {size} | {res['acc_original']:.2%} | {acc_dec} | {acc_ft} | "
                f"{row['params'] / 1e6:.2f} M | {row['params_ratio']:.2f}x | {row['macs'] / 1e6:.0f} M | "
                f"{row['macs_ratio']:.2f}x | {row['macs_224'] / 1e9:.2f} G | {_fmt_ms(lat[0])} / {_fmt_ms(lat[1])} | "
                f"{_fmt_ms(lat[2])} / {_fmt_ms(lat[3])} | {speed} | "
                f"{_fmt_s(row['decompose_s'], 1)} | {_fmt_s(row['finetune_s'], 0)} |")
    for backend in backends[1:]:
        lines += ["", f"Latency on the {backend} backend (ms, batch 1 / batch 8):", "",
                  "| arch | method | size | ms b1 / b8 | ms b1 / b8 @224 | speedup b8 @224 |",
                  "|---|---|---:|---:|---:|---:|"]
        for arch, res in payload["archs"].items():
            size = res["image_size"]
            for row in res["rows"]:
                name = row["method"]
                lat = [_latency(res, name, backend, s, b) for s in (size, REFERENCE_SIZE) for b in LATENCY_BATCHES]
                base = _latency(res, "original", backend, REFERENCE_SIZE, 8)
                speed = f"{base / lat[3]:.2f}x" if base and lat[3] else "-"
                lines.append(f"| {arch} | {name} | {size} | {_fmt_ms(lat[0])} / {_fmt_ms(lat[1])} | "
                             f"{_fmt_ms(lat[2])} / {_fmt_ms(lat[3])} | {speed} |")
    lines += _seeds_markdown(payload)
    notes = []
    for arch, res in payload["archs"].items():
        r = res["ranks"]
        notes.append(f"- {arch}: {res['training']['source']}, trained for {res['training']['epochs']} epochs "
                     f"({res['training']['seconds']:.0f} s); conv ranks: {r['conv_source']} ({r['conv_reason']}); "
                     f"FC ranks: {r['fc_source']} ({r['fc_reason']})")
        if res["latency"].get("errors"):
            notes.append(f"  - latency errors: {res['latency']['errors']}")
    return "\n".join(lines + ["", *notes])


def _pm(stats: dict[str, float], scale: float = 100.0, digits: int = 2) -> str:
    return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"


def _seeds_markdown(payload: dict[str, Any]) -> list[str]:
    """The several-seed table: mean ± standard deviation (sample) over seeds, paired drops."""
    summarized = {arch: res["summary"] for arch, res in payload["archs"].items() if "summary" in res}
    if not summarized:
        return []
    lines = ["", "Over seeds (mean ± standard deviation; accuracy in %; drop = original - decomposed, in points, "
             "paired by seed; the main table above is the first seed):", "",
             "| arch | method | seeds | acc. original | acc. straight after | acc. fine-tuned | drop straight after "
             "| drop after fine-tuning | params ratio | MACs ratio |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arch, summary in summarized.items():
        seeds = ",".join(str(s) for s in summary["seeds"])
        for method, entry in summary["methods"].items():
            lines.append(f"| {arch} | {method} | {seeds} | {_pm(summary['acc_original'])} | "
                         f"{_pm(entry['acc_decomposed'])} | {_pm(entry['acc_finetuned'])} | "
                         f"{_pm(entry['drop_decomposed'])} | {_pm(entry['drop_finetuned'])} | "
                         f"{_pm(entry['params_ratio'], 1.0)}x | {_pm(entry['macs_ratio'], 1.0)}x |")
    return lines


def plot(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Test accuracy against MACs (log scale): original, and each method before/after fine-tuning."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter

    colors = {"original": "black", "tucker": "tab:blue", "cp": "tab:orange", "tucker+svd": "tab:green"}
    # One marker per architecture (the BatchNorm variants have their own).
    markers = {"vgg16": "o", "vgg16_bn": "D", "vgg19": "s", "vgg19_bn": "P", "alexnet": "^"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arch, res in payload["archs"].items():
        marker = markers.get(arch, "X")
        summary = res.get("summary")  # several seeds: means with a standard-deviation bar

        def point(key: str, row: dict) -> tuple[float | None, float]:
            if summary is None:
                return (res["acc_original"] if key == "acc_original" else row[key]), 0.0
            stats = summary["acc_original"] if key == "acc_original" else summary["methods"][row["method"]][key]
            return stats["mean"], stats["std"]

        y, err = point("acc_original", {})
        ax.errorbar(res["macs"], y, yerr=err or None, color=colors["original"], marker=marker, markersize=7,
                    linestyle="")
        for row in res["rows"]:
            if row["method"] == "original":
                continue
            color = colors.get(row["method"], "gray")
            before, before_err = point("acc_decomposed", row) if row["acc_decomposed"] is not None else (None, 0)
            after, after_err = point("acc_finetuned", row) if row["acc_finetuned"] is not None else (None, 0)
            if before is not None:
                ax.errorbar(row["macs"], before, yerr=before_err or None, color=color, marker=marker,
                            markerfacecolor="none", markersize=7, linestyle="")
            if after is not None:
                ax.errorbar(row["macs"], after, yerr=after_err or None, color=color, marker=marker, markersize=7,
                            linestyle="")
                if before is not None:
                    ax.annotate("", xy=(row["macs"], after), xytext=(row["macs"], before),
                                arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.4})
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=m) for m, c in colors.items()]
    handles += [plt.Line2D([], [], color="gray", marker=mk, linestyle="", label=a)
                for a, mk in markers.items() if a in payload["archs"]]
    handles.append(plt.Line2D([], [], color="gray", marker="o", markerfacecolor="none", linestyle="",
                              label="before fine-tuning"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a log axis overlap
    ax.set_xlabel("MACs per image at the benchmark size")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs MACs")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------ run
def _subset(ds, per_class: int | None, *, seed: int):
    """At most ``per_class`` images of each class, a seeded random choice (the whole set for None)."""
    if per_class is None:
        return ds
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds), generator=gen).tolist()
    taken: dict[int, int] = {}
    keep = []
    for i in order:
        label = ds.targets[i]
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return torch.utils.data.Subset(ds, sorted(keep))


def _weights_for(arch: str, args: argparse.Namespace) -> str:
    if getattr(args, "weights", None):
        return args.weights
    if args.weights_dir:
        path = os.path.join(args.weights_dir, f"{arch}.pth")
        if os.path.exists(path):
            return path
        logger.warning("%s not found: training %s from scratch", path, arch)
    return "none"


def train_lr(arch: str) -> float:
    """The default training rate of ``arch`` from scratch (:data:`TRAIN_LR`)."""
    return TRAIN_LR["alexnet" if arch.startswith("alexnet") else "vgg"]


def _learning_rates(arch: str, args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    """(training rate, fine-tuning rate per method): the tool's own defaults with ``--weights FILE``,
    else the from-scratch / ``--weights_dir`` protocol (:data:`TRAIN_LR`, :data:`FT_LR_FACTOR`)."""
    if args.weights:
        lr = args.lr or main_cli.DEFAULT_LR["train"]
        return lr, {m: main_cli.DEFAULT_LR["cp" if m == "cp" else "tucker"] for m in METHODS}
    lr = args.lr or train_lr(arch)
    return lr, {m: lr * FT_LR_FACTOR[m] for m in METHODS}


def run_arch(arch: str, args: argparse.Namespace, device: torch.device, *, seed: int | None = None,
             latency: bool = True) -> dict[str, Any]:
    """The whole benchmark for one architecture and one seed (latency only when ``latency``)."""
    seed = args.seed if seed is None else seed
    size = args.image_size or (TRAINED_IMAGE_SIZE if args.weights else DEFAULT_IMAGE_SIZE[arch])
    models.check_image_size(arch, size)
    input_size = (3, size, size)
    runtime.seed_everything(seed)
    train_ds, test_ds, classes = dataset.build_datasets(os.path.join(args.data, "train"),
                                                         os.path.join(args.data, "test"), image_size=size)
    train_ds = _subset(train_ds, args.train_per_class, seed=seed)
    test_ds = _subset(test_ds, args.test_per_class, seed=seed + 1)
    train_loader, test_loader, _ = dataset.build_loaders(train_ds, test_ds, batch_size=args.batch_size,
                                                         workers=args.workers, seed=seed)
    weights = _weights_for(arch, args)
    progress = not args.quiet
    model, pretrained = models.build_pretrained(arch, len(classes), weights=weights)
    model.to(device)
    lr, ft_lrs = _learning_rates(arch, args)
    scaled = bool(args.weights)  # the --weights_dir protocol trains every layer at one rate, as before
    lr_scale = {n: main_cli.DEFAULT_PRETRAINED_LR_SCALE for n in pretrained} if scaled else None
    start = time.perf_counter()
    history = finetune.fit(model, train_loader, None,
                           recipe=finetune.Recipe(epochs=args.epochs, lr=lr, lr_scale=lr_scale), device=device,
                           show_progress=progress, log=logger)
    train_s = time.perf_counter() - start
    acc_original = finetune.evaluate(model, test_loader, device=device, show_progress=progress)["acc"]
    logger.info("%s seed %d: trained (%s) in %.0f s, test accuracy %.2f%%", arch, seed, weights, train_s,
                100 * acc_original)
    model = model.cpu().eval()
    skip = [_conv_layers(model)[0][0]]
    chosen = choose_ranks(model, input_size=input_size, policy=args.ranks, rank_ratio=args.rank_ratio,
                          fc_rank_ratio=args.fc_rank_ratio, skip=skip, fc_policy=args.fc_ranks)
    logger.info("%s: conv ranks from %s (%s); FC ranks from %s (%s)", arch, chosen["conv_source"],
                chosen["conv_reason"], chosen["fc_source"], chosen["fc_reason"])
    params0 = report.count_params(model)
    macs0, macs0_224 = report.count_macs(model, input_size), report.count_macs(model, (3, REFERENCE_SIZE,
                                                                                        REFERENCE_SIZE))
    rows = [{"method": "original", "acc_decomposed": None, "acc_finetuned": None, "params": params0,
             "params_ratio": 1.0, "macs": macs0, "macs_ratio": 1.0, "macs_224": macs0_224, "macs_224_ratio": 1.0,
             "decompose_s": None, "finetune_s": None, "layers": [], "history": history}]
    nets = {"original": model}
    for method in METHODS:
        net, layer_rows, decompose_s = decompose(model, method, chosen, input_size=input_size, skip=skip,
                                                 cp_max_iter=args.cp_max_iter, seed=seed,
                                                 threads=args.decompose_threads, rescale=not args.no_rescale)
        net.to(device)
        acc_dec = finetune.evaluate(net, test_loader, device=device, show_progress=progress)["acc"]
        ft_lr = ft_lrs[method]
        start = time.perf_counter()
        ft_history = finetune.fit(net, train_loader, None, recipe=finetune.Recipe(epochs=args.ft_epochs, lr=ft_lr),
                                  device=device, show_progress=progress, log=logger)
        finetune_s = time.perf_counter() - start
        acc_ft = finetune.evaluate(net, test_loader, device=device, show_progress=progress)["acc"]
        net = net.cpu().eval()
        params, macs = report.count_params(net), report.count_macs(net, input_size)
        macs_224 = report.count_macs(net, (3, REFERENCE_SIZE, REFERENCE_SIZE))
        rows.append({"method": method, "acc_decomposed": acc_dec, "acc_finetuned": acc_ft, "params": params,
                     "params_ratio": params0 / params, "macs": macs, "macs_ratio": macs0 / macs,
                     "macs_224": macs_224, "macs_224_ratio": macs0_224 / macs_224, "decompose_s": decompose_s,
                     "finetune_s": finetune_s, "finetune_lr": ft_lr,
                     "layers": layer_rows, "history": ft_history,
                     "fallbacks": [r["name"] for r in layer_rows if "fell back" in (r["reason"] or "")]})
        logger.info("%s seed %d %s: %.2f%% -> %.2f%% after fine-tuning; %.2fx fewer MACs; decomposed in %.1f s, "
                    "fine-tuned in %.0f s", arch, seed, method, 100 * acc_dec, 100 * acc_ft, macs0 / macs,
                    decompose_s, finetune_s)
        nets[method] = net
    sizes = sorted({size, *args.latency_sizes}) if args.latency_sizes else [size, REFERENCE_SIZE]
    measured = (measure_latencies(nets, sizes=sizes, backends=args.latency_backends, repeats=args.latency_repeats,
                                  seed=seed, progress=progress)
                if args.latency_backends and latency else {"errors": {}})
    return {"arch": arch, "seed": seed, "image_size": size, "classes": classes, "n_train": len(train_ds),
            "n_test": len(test_ds), "acc_original": acc_original, "params": params0, "macs": macs0,
            "macs_224": macs0_224,
            "training": {"source": "trained weights" if pretrained else "from scratch", "weights": weights,
                         "pretrained_tensors": len(pretrained), "epochs": args.epochs, "lr": lr,
                         "pretrained_lr_scale": main_cli.DEFAULT_PRETRAINED_LR_SCALE if scaled else None,
                         "seconds": train_s},
            "ranks": {k: v for k, v in chosen.items()}, "rows": rows, "latency": measured, "latency_sizes": sizes}


def summarize_seeds(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, standard deviation and range over seeds of each method's accuracies and ratios."""
    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values), "n": len(values)}

    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "acc_original": stats([r["acc_original"] for r in runs]),
                           "methods": {}}
    for method in METHODS:
        rows = [next(row for row in r["rows"] if row["method"] == method) for r in runs]
        entry = {key: stats([row[key] for row in rows])
                 for key in ("acc_decomposed", "acc_finetuned", "params_ratio", "macs_ratio", "macs_224_ratio")}
        # Accuracy change against each seed's own original, the paired difference.
        entry["drop_decomposed"] = stats([r["acc_original"] - row["acc_decomposed"] for r, row in zip(runs, rows)])
        entry["drop_finetuned"] = stats([r["acc_original"] - row["acc_finetuned"] for r, row in zip(runs, rows)])
        out["methods"][method] = entry
    return out


def combine_seeds(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One architecture's entry from its per-seed results (latency comes from the first seed).

    The first seed's result, with ``seed_runs`` (every seed's result without latency)
    and ``summary`` (:func:`summarize_seeds`) added when there are several seeds.
    """
    first = dict(runs[0])
    if len(runs) > 1:
        first["seed_runs"] = [{k: v for k, v in r.items() if k != "latency"} for r in runs]
        first["summary"] = summarize_seeds(runs)
    return first


def plan_from_layers(layer_rows: Sequence[dict]) -> dict[str, dict]:
    """The decomposition plan (``decompositions.model_plan`` format) of a result's per-layer rows."""
    plan: dict[str, dict] = {}
    for row in layer_rows:
        if row["skipped"]:
            continue
        if row["method"] == "tucker":
            plan[row["name"]] = {"method": "tucker", "ranks": [int(r) for r in row["ranks"]]}
        elif row["method"] in ("cp", "svd"):
            plan[row["name"]] = {"method": row["method"], "rank": int(row["ranks"][0])}
        elif row["method"] == "diagonal":
            plan[row["name"]] = {"method": "diagonal", "bandwidth": int(row["ranks"][0])}
    return plan


def remeasure_latency(payload: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Time the models of an earlier run's JSON on this machine (``--latency_from``).

    Latency depends on the architecture and the ranks, not on the weights' values, so each
    model is rebuilt from its per-layer ranks with seeded random weights: a run whose
    accuracy was measured elsewhere (on a GPU) gets CPU latency from this machine.
    """
    torch.manual_seed(args.seed)
    for arch, res in payload["archs"].items():
        classes = len(res["classes"])
        nets = {"original": models.build_model(arch, classes).eval()}
        for row in res["rows"]:
            if row["method"] != "original":
                nets[row["method"]] = decompositions.apply_plan(models.build_model(arch, classes),
                                                                plan_from_layers(row["layers"])).eval()
        sizes = sorted({res["image_size"], *args.latency_sizes}) if args.latency_sizes else res["latency_sizes"]
        res["latency"] = measure_latencies(nets, sizes=sizes, backends=args.latency_backends,
                                           repeats=args.latency_repeats, seed=args.seed, progress=not args.quiet)
        res["latency_sizes"] = sizes
    payload["latency_machine"] = machine_info()
    payload["settings"]["latency_backends"] = list(args.latency_backends)
    payload["settings"]["latency_from"] = args.latency_from
    return payload


def write_outputs(payload: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """Write bench_real.json, bench_real.md and bench_real.png into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"bench_real.{k}") for k in ("json", "md", "png")}
    report.write_json(paths["json"], payload)
    with open(paths["md"], "w") as fh:
        fh.write(format_markdown(payload) + "\n")
    if payload["archs"]:
        plot(payload, paths["png"])
    return paths


def _csv(kind):
    def parse(text: str) -> list:
        return [kind(v) for v in text.split(",") if v]
    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", nargs="?", default=str(DEFAULT_DATA), help="folder with train/ and test/")
    parser.add_argument("--archs", type=_csv(str), default=None,
                        help=f"comma-separated (default {','.join(SCRATCH_ARCHS)} from scratch, "
                             f"{','.join(PRETRAINED_ARCHS)} with --weights_dir; only the first with --quick)")
    parser.add_argument("--weights_dir", help="folder with <arch>.pth ImageNet state_dicts (else: from scratch)")
    parser.add_argument("--weights", help="one trained weights file for every arch (state_dict, ONNX or Keras, as "
                                          f"main.py --weights FILE); default archs {','.join(TRAINED_ARCHS)}, "
                                          f"{TRAINED_IMAGE_SIZE} px, seeds {','.join(map(str, TRAINED_SEEDS))}, "
                                          f"the tool's default learning rates, output {TRAINED_OUT}")
    parser.add_argument("--seeds", type=_csv(int), default=None,
                        help="run every arch once per seed and report mean and spread (default: --seed alone; "
                             f"{','.join(map(str, TRAINED_SEEDS))} with --weights)")
    parser.add_argument("--image_size", type=int, default=None,
                        help=f"benchmark size for every arch (default {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default {DEFAULT_EPOCHS}, {QUICK_EPOCHS} with --quick)")
    parser.add_argument("--ft_epochs", type=int, default=None,
                        help=f"fine-tuning epochs (default {DEFAULT_FT_EPOCHS}, {QUICK_FT_EPOCHS} with --quick)")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--train_per_class", type=int, default=None,
                        help=f"use at most this many training images per class (all; {QUICK_PER_CLASS} with --quick)")
    parser.add_argument("--test_per_class", type=int, default=None,
                        help=f"use at most this many test images per class (all; {QUICK_PER_CLASS} with --quick)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"training learning rate (default per architecture family: {TRAIN_LR})")
    parser.add_argument("--ranks", choices=RANK_CHOICES, default="auto", help="rank source (see the docstring)")
    parser.add_argument("--fc_ranks", choices=RANK_CHOICES, default=None,
                        help="rank source of the hidden Linear layers (default: --ranks; ratio with --weights, "
                             "whose FC layers start fresh: VBMF would find noise after a short training)")
    parser.add_argument("--rank_ratio", type=float, default=DEFAULT_RANK_RATIO)
    parser.add_argument("--fc_rank_ratio", type=float, default=DEFAULT_FC_RANK_RATIO)
    parser.add_argument("--cp_max_iter", type=int, default=decompositions.CP_MAX_ITER)
    parser.add_argument("--no_rescale", action="store_true",
                        help="plain best approximations (main.py --no_rescale): no filter-norm correction")
    parser.add_argument("--decompose_threads", type=int, default=1,
                        help="torch threads while decomposing (1: fastest on a small shared CPU)")
    parser.add_argument("--latency_backends", type=_csv(str), default=None,
                        help=f"inference backends timed, the first in the main table (default "
                             f"{','.join(DEFAULT_LATENCY_BACKENDS)}; {','.join(QUICK_LATENCY_BACKENDS)} with --quick; "
                             f"'' for none)")
    parser.add_argument("--latency_sizes", type=_csv(int), default=None,
                        help=f"image sizes timed besides the benchmark size (default {REFERENCE_SIZE})")
    parser.add_argument("--latency_repeats", type=int, default=None,
                        help=f"timed rounds (default {DEFAULT_LATENCY_REPEATS}, {QUICK_LATENCY_REPEATS} with --quick)")
    parser.add_argument("--device", default="cpu", help="training device (auto, cpu, cuda, cuda:N, mps)")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out_dir", default=None,
                        help=f"where the outputs go (default {DEFAULT_OUT}; {DEFAULT_OUT / 'quick'} with --quick)")
    parser.add_argument("--latency_from", metavar="JSON",
                        help="no training: re-measure the latency of an earlier run's models (rebuilt from the "
                             "ranks in its bench_real.json) on this machine; outputs go beside that file unless "
                             "--out_dir is given")
    parser.add_argument("--quick", action="store_true",
                        help=f"first arch only (vgg16_bn, or vgg16 with --weights_dir), {QUICK_PER_CLASS} images per class, "
                             "fewer epochs and rounds: a smoke test")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.latency_from and not args.out_dir:
        args.out_dir = os.path.dirname(os.path.abspath(args.latency_from))
    base_out = TRAINED_OUT if args.weights else DEFAULT_OUT
    args.out_dir = args.out_dir or str(base_out / "quick" if args.quick else base_out)
    if args.weights and args.weights_dir:
        parser.error("give --weights (one file) or --weights_dir (one file per arch), not both")
    if args.weights and not os.path.isfile(args.weights):
        parser.error(f"--weights {args.weights}: no such file")
    if not args.archs:
        archs = TRAINED_ARCHS if args.weights else PRETRAINED_ARCHS if args.weights_dir else SCRATCH_ARCHS
        args.archs = list(archs[:1] if args.quick else archs)
    if args.fc_ranks is None:
        args.fc_ranks = "ratio" if args.weights else args.ranks
    if not args.seeds:
        args.seeds = list(TRAINED_SEEDS[:1] if args.quick else TRAINED_SEEDS) if args.weights else [args.seed]
    args.epochs = args.epochs or (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    if args.quick:
        args.train_per_class = args.train_per_class or QUICK_PER_CLASS
        args.test_per_class = args.test_per_class or QUICK_PER_CLASS
    args.ft_epochs = args.ft_epochs or (QUICK_FT_EPOCHS if args.quick else DEFAULT_FT_EPOCHS)
    if args.latency_backends is None:
        args.latency_backends = list(QUICK_LATENCY_BACKENDS if args.quick else DEFAULT_LATENCY_BACKENDS)
    args.latency_repeats = args.latency_repeats or (QUICK_LATENCY_REPEATS if args.quick else DEFAULT_LATENCY_REPEATS)
    for arch in args.archs:
        models.check_arch(arch)
    unknown = [b for b in args.latency_backends if b not in inference.BACKENDS]
    if unknown:
        parser.error(f"unknown latency backend(s) {unknown}; choose from {inference.BACKENDS}")
    if not 0 < args.rank_ratio <= 1 or not 0 < args.fc_rank_ratio <= 1:
        parser.error("--rank_ratio and --fc_rank_ratio must be in (0, 1]")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    if args.latency_from:
        import json

        with open(args.latency_from) as fh:
            payload = remeasure_latency(json.load(fh), args)
        paths = write_outputs(payload, args.out_dir)
        print(format_markdown(payload))
        print(f"\nre-measured latency; wrote {', '.join(paths.values())}")
        return payload
    device = runtime.resolve_device(args.device)
    start = time.perf_counter()
    payload: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items()}, "machine": machine_info(),
                               "device": str(device), "archs": {}}
    payload["settings"]["ft_lr_factor"] = dict(FT_LR_FACTOR)
    for arch in args.archs:
        runs = []
        for i, seed in enumerate(args.seeds):
            runs.append(run_arch(arch, args, device, seed=seed, latency=i == 0))
            payload["archs"][arch] = combine_seeds(runs)
            payload["total_s"] = time.perf_counter() - start
            paths = write_outputs(payload, args.out_dir)  # after each run: a long one keeps its partial results
    print(format_markdown(payload))
    print(f"\ntotal {payload['total_s']:.0f} s; wrote {', '.join(paths.values())}")
    return payload


if __name__ == "__main__":
    main()
