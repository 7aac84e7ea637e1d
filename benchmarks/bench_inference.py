"""Does a decomposed VGG16 run as much faster as it has fewer MACs?

The configuration of the project's speed goal: torchvision VGG16 (seeded random
weights, ``weights="none"``: timings do not depend on the values), a 2-class head,
Tucker-2 on convs 2-13 at ranks ``(out_channels // 3, in_channels // 3)`` with the
first conv left alone: 5.07x fewer MACs at 224 px.  The original and the
decomposed model are run through every backend of :mod:`inference` (eager,
channels_last, frozen TorchScript, ONNX + onnxruntime; plus ``onnx-unpadded``, the
ONNX backend without the zero-padding of the Tucker ranks to whole channel blocks,
to show what that padding is worth), all in this one process, in interleaved
rounds (:func:`inference.time_interleaved`): one warm-up round (more with
``--warmup``), then the median over ``--repeats`` rounds.

Goal (2-core CPU, 224 px, batch 8): a measured speedup >= 3x on the same backend on
both sides, and >= 60% of the MAC ratio.

Usage::

    python benchmarks/bench_inference.py [--repeats 10] [--json OUT]
    python benchmarks/bench_inference.py --quick --image_size 32 --batch_size 2   # smoke test

Printed per backend: original ms, decomposed ms, speedup (original / decomposed),
the MAC ratio, the speedup as a fraction of the MAC ratio, and the largest
relative output difference of each predictor from the eager model.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Run as ``python benchmarks/bench_inference.py``: the project modules live one level up.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import decompositions  # noqa: E402
import inference  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402
from threads import lapack_threads  # noqa: E402

logger = logging.getLogger("bench_inference")

ARCH = "vgg16"
NUM_CLASSES = 2
RANK_DIVISOR = 3          # Tucker ranks (out_channels // 3, in_channels // 3)
DEFAULT_IMAGE_SIZE = 224
DEFAULT_BATCH_SIZE = 8
DEFAULT_REPEATS = 10
DEFAULT_WARMUP = 2
QUICK_REPEATS = 2
QUICK_WARMUP = 1
SEED = 0
#: The ONNX backend without rank padding, as a comparison row.
UNPADDED = "onnx-unpadded"
SPEEDUP_GOAL = 3.0
MAC_FRACTION_GOAL = 0.6


def build_pair(*, image_size: int, seed: int = SEED,
               rank_divisor: int = RANK_DIVISOR) -> tuple[nn.Module, nn.Module, list[dict]]:
    """The original VGG16 and its Tucker-2 copy (ranks ``// rank_divisor``, first conv kept).

    Returns
    -------
    original, decomposed : nn.Module
        Both in eval mode, the decomposed one built from the original's weights.
    layers : list of dict
        :func:`decompositions.decompose_model`'s per-layer report.
    """
    torch.manual_seed(seed)
    original = models.build_model(ARCH, NUM_CLASSES, weights="none").eval()
    decomposed = models.build_model(ARCH, NUM_CLASSES, weights="none").eval()
    decomposed.load_state_dict(original.state_dict())
    convs = [(name, m) for name, m in decomposed.named_modules() if isinstance(m, nn.Conv2d)]
    input_size = (3, image_size, image_size)
    # The benchmark's fixed protocol, written as an explicit plan (as a user's plan file would
    # be): floor division keeps the published figures' ranks (170 for 512 channels, not 171).
    plan = {convs[0][0]: {"method": "none", "reason": "first conv kept"}}
    plan.update({name: {"method": "tucker", "ranks": [m.out_channels // rank_divisor, m.in_channels // rank_divisor]}
                 for name, m in convs[1:]})
    with lapack_threads():  # the decompositions' small LAPACK calls (threads.py says why)
        rows = decompositions.decompose_model(decomposed, plan, input_size=input_size)
    return original, decomposed.eval(), [r.as_dict() for r in rows]


def _backends(requested: Sequence[str] | None) -> list[str]:
    available = inference.available_backends()
    if requested is None:
        return [*available, UNPADDED] if "onnx" in available else list(available)
    allowed = (*inference.BACKENDS, UNPADDED)
    for name in requested:
        if name not in allowed:
            raise SystemExit(f"error: unknown backend {name!r}; choose from {allowed}")
    return list(requested)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build both models, time them under every backend, return the results as a dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = _backends(args.backends)
    start = time.perf_counter()
    original, decomposed, layers = build_pair(image_size=args.image_size, seed=args.seed)
    decompose_s = time.perf_counter() - start
    input_size = (3, args.image_size, args.image_size)
    macs = {"original": report.count_macs(original, input_size),
            "decomposed": report.count_macs(decomposed, input_size)}
    padded = inference.pad_ranks(decompositions.apply_plan(
        models.build_model(ARCH, NUM_CLASSES), decompositions.model_plan(decomposed)),
        inference.ONNX_RANK_MULTIPLE)
    macs["decomposed_padded"] = report.count_macs(padded, input_size)
    del padded
    mac_ratio = macs["original"] / macs["decomposed"]
    example = torch.randn(args.batch_size, *input_size, generator=torch.Generator().manual_seed(args.seed))
    nets = {"original": original, "decomposed": decomposed}
    predictors, diffs, prepare_s = {}, {}, {}
    for backend in backends:
        for name, net in nets.items():
            t0 = time.perf_counter()
            if backend == UNPADDED:
                predictor = inference.prepare(net, example, backend="onnx", check=False, rank_multiple=None)
            else:
                predictor = inference.prepare(net, example, backend=backend, check=False)
            prepare_s[backend, name] = time.perf_counter() - t0
            predictors[backend, name] = predictor
    with torch.inference_mode():
        reference = {name: net(example) for name, net in nets.items()}
    for (backend, name), predictor in predictors.items():
        out = predictor(example)
        diffs[backend, name] = float((out - reference[name]).abs().max() / reference[name].abs().max())
    calls = {key: (lambda p=p: p(example)) for key, p in predictors.items()}
    times = inference.time_interleaved(calls, warmup=args.warmup, repeats=args.repeats, progress=not args.quiet,
                                       desc="rounds")
    rows = []
    for backend in backends:
        t_orig = statistics.median(times[backend, "original"])
        t_dec = statistics.median(times[backend, "decomposed"])
        speedup = t_orig / t_dec
        rows.append({
            "backend": backend,
            "original_ms": t_orig,
            "decomposed_ms": t_dec,
            "speedup": speedup,
            "mac_ratio": mac_ratio,
            "fraction_of_mac_ratio": speedup / mac_ratio,
            "original_times_ms": times[backend, "original"],
            "decomposed_times_ms": times[backend, "decomposed"],
            "max_rel_diff": max(diffs[backend, "original"], diffs[backend, "decomposed"]),
            "prepare_s": {"original": prepare_s[backend, "original"],
                          "decomposed": prepare_s[backend, "decomposed"]},
        })
    return {
        "config": {"arch": ARCH, "num_classes": NUM_CLASSES, "image_size": args.image_size,
                   "batch_size": args.batch_size, "rank_divisor": RANK_DIVISOR, "first_conv": "kept",
                   "weights": "none (seeded random)", "seed": args.seed, "warmup": args.warmup,
                   "repeats": args.repeats, "quick": args.quick},
        "machine": machine_info(),
        "macs": macs,
        "mac_ratio": mac_ratio,
        "params": {"original": report.count_params(original), "decomposed": report.count_params(decomposed)},
        "decompose_s": decompose_s,
        "layers": layers,
        "rows": rows,
    }


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")),
                               platform.processor())
    except OSError:
        info["cpu"] = platform.processor()
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def format_rows(result: dict[str, Any]) -> str:
    """A Markdown table of the per-backend rows."""
    cfg = result["config"]
    lines = [
        f"{cfg['arch']} {cfg['image_size']} px, batch {cfg['batch_size']}, Tucker-2 ranks //{cfg['rank_divisor']} "
        f"on convs 2-13; MACs {result['macs']['original'] / 1e9:.2f} G -> {result['macs']['decomposed'] / 1e9:.2f} G "
        f"per image ({result['mac_ratio']:.2f}x fewer; {result['macs']['decomposed_padded'] / 1e9:.2f} G with the "
        f"ranks padded to multiples of {inference.ONNX_RANK_MULTIPLE} for onnx); median of {cfg['repeats']} "
        f"interleaved rounds, {result['machine']['torch_threads']} threads",
        "",
        "| backend | original ms | decomposed ms | speedup | MAC ratio | speedup / MAC ratio | max rel. diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['backend']} | {r['original_ms']:.1f} | {r['decomposed_ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['mac_ratio']:.2f}x | {r['fraction_of_mac_ratio']:.0%} | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--image_size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed rounds (default {DEFAULT_REPEATS}, {QUICK_REPEATS} with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed rounds (default {DEFAULT_WARMUP}, {QUICK_WARMUP} with --quick)")
    parser.add_argument("--backends", type=lambda s: [b for b in s.split(",") if b], default=None,
                        help=f"comma-separated subset of {(*inference.BACKENDS, UNPADDED)} (default: all available)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke test, not a measurement")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    args.warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP)
    models.check_image_size(ARCH, args.image_size)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch_size and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run(args)
    print(format_rows(result))
    best = max(result["rows"], key=lambda r: r["speedup"])
    met = best["speedup"] >= SPEEDUP_GOAL and best["fraction_of_mac_ratio"] >= MAC_FRACTION_GOAL
    print(f"\nbest: {best['backend']} {best['speedup']:.2f}x ({best['fraction_of_mac_ratio']:.0%} of the MAC ratio); "
          f"goal >= {SPEEDUP_GOAL:g}x and >= {MAC_FRACTION_GOAL:.0%}: {'met' if met else 'not met'}"
          f"{' (quick run: not the goal workload)' if args.quick else ''}")
    if args.json:
        report.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
