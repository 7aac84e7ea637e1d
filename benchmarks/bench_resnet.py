"""Do decomposed ResNets run as much faster as they have fewer MACs, and which layers pay?

torchvision ResNet18 and ResNet50 (seeded random weights, ``weights="none"``: timings do
not depend on the values), a 2-class head, 224 px, batch 8, onnxruntime (the ``onnx``
backend of :mod:`inference`), all variants of one arch timed in this one process in
interleaved rounds (:func:`inference.time_interleaved`).  Ranks come from the budget
options (``ranks.Policy(target_macs=R)``, rule ``sum``; Tucker-2 on the k x k convs, SVD
pairs on the 1x1 convs, the stem conv and the head kept), at 2x and 3x fewer MACs.  To
see which layer kinds pay, the 3x plan is also applied in two halves: its k x k entries
alone ("3x, kxk only") and its 1x1 entries alone ("3x, 1x1 only"), and the 3x model is
also run without the zero-padding of its ranks to whole channel blocks ("3x, ranks
unpadded"; :func:`inference.pad_ranks`).

The ranks depend on the weights' spectra; with random weights the budget spreads the cuts
evenly (a flat spectrum everywhere), which is the pessimistic case for speed (no layer is
left whole).  Goal (issue 13): on resnet50, a measured speedup of at least 60% of the MAC
ratio.

Usage::

    python benchmarks/bench_resnet.py [--archs resnet18,resnet50] [--repeats 10] [--json OUT]
    python benchmarks/bench_resnet.py --quick     # smoke test: resnet18, 64 px, batch 2
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import decompositions  # noqa: E402
import inference  # noqa: E402
import models  # noqa: E402
import ranks  # noqa: E402
import report  # noqa: E402
from bench_inference import machine_info  # noqa: E402
from threads import lapack_threads  # noqa: E402

logger = logging.getLogger("bench_resnet")

NUM_CLASSES = 2
TARGETS = (2.0, 3.0)
SPLIT_TARGET = 3.0
MAC_FRACTION_GOAL = 0.6
SEED = 0


def _split(plan: dict[str, dict], model: torch.nn.Module, *, pointwise: bool) -> dict[str, dict]:
    """The plan's entries for 1x1 convs only (``pointwise``) or for the other layers only."""
    out = {}
    for name, entry in plan.items():
        layer = model.get_submodule(name)
        is_pointwise = isinstance(layer, torch.nn.Conv2d) and tuple(layer.kernel_size) == (1, 1)
        out[name] = entry if is_pointwise == pointwise else {"method": "none", "reason": "other half"}
    return out


def variants(arch: str, image_size: int) -> tuple[torch.nn.Module, dict[str, tuple[torch.nn.Module, dict]]]:
    """The original and each decomposed variant (model, per-kind MACs) of ``arch``."""
    torch.manual_seed(SEED)
    original = models.build_model(arch, NUM_CLASSES).eval()
    input_size = (3, image_size, image_size)
    first = next(n for n, m in original.named_modules() if isinstance(m, torch.nn.Conv2d))
    out = {}
    spectra: dict = {}
    plans = {}
    for target in TARGETS:
        policy = ranks.Policy(conv="tucker", fc="none", target_macs=target, skip={first: "stem conv kept"})
        plans[f"{target:g}x"] = ranks.plan_decomposition(original, policy, input_size, spectra=spectra)
    plans[f"{SPLIT_TARGET:g}x, kxk only"] = _split(plans[f"{SPLIT_TARGET:g}x"], original, pointwise=False)
    plans[f"{SPLIT_TARGET:g}x, 1x1 only"] = _split(plans[f"{SPLIT_TARGET:g}x"], original, pointwise=True)
    for name, plan in plans.items():
        model = copy.deepcopy(original)
        with lapack_threads():
            rows = decompositions.decompose_model(model, plan, input_size=input_size, seed=SEED)
        out[name] = (model.eval(), [r.as_dict() for r in rows])
    return original, out


def bench_arch(arch: str, *, image_size: int, batch_size: int, repeats: int, warmup: int,
               quiet: bool) -> dict[str, Any]:
    original, decomposed = variants(arch, image_size)
    input_size = (3, image_size, image_size)
    example = torch.randn(batch_size, *input_size)
    nets = {"original": (original, [])} | decomposed
    predictors = {name: inference.prepare(net, example, backend="onnx") for name, (net, _) in nets.items()}
    # The 3x model again without the zero-padding of its ranks to whole channel blocks.
    unpadded = f"{SPLIT_TARGET:g}x, ranks unpadded"
    nets[unpadded] = decomposed[f"{SPLIT_TARGET:g}x"]
    predictors[unpadded] = inference.prepare(nets[unpadded][0], example, backend="onnx", rank_multiple=None)
    times = inference.time_interleaved({name: (lambda p=p: p(example)) for name, p in predictors.items()},
                                       warmup=warmup, repeats=repeats, progress=not quiet, desc=arch)
    macs0 = report.count_macs(original, input_size)
    params0 = report.count_params(original)
    base = statistics.median(times["original"])
    rows = []
    for name, (net, layer_rows) in nets.items():
        median = statistics.median(times[name])
        macs = report.count_macs(net, input_size)
        kinds: dict[str, int] = {}
        for row in layer_rows:
            if not row["skipped"]:
                kind = "1x1" if row["kind"] == "conv" and row["method"] == "svd" else "kxk"
                kinds[kind] = kinds.get(kind, 0) + 1
        rows.append({"variant": name, "params": report.count_params(net), "params_ratio": params0 /
                     report.count_params(net), "macs": macs, "mac_ratio": macs0 / macs, "median_ms": median,
                     "times_ms": times[name], "speedup": base / median,
                     "fraction_of_mac_ratio": (base / median) / (macs0 / macs), "decomposed_layers": kinds})
    return {"arch": arch, "image_size": image_size, "batch_size": batch_size, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"### {result['arch']}, {result['image_size']} px, batch {result['batch_size']}, onnxruntime", "",
             "| variant | params | MACs | MAC ratio | median ms | speedup | speedup / MAC ratio | layers decomposed |",
             "|---|--:|--:|--:|--:|--:|--:|---|"]
    for r in result["rows"]:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(r["decomposed_layers"].items())) or "-"
        lines.append(f"| {r['variant']} | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e9:.2f} G | "
                     f"{r['mac_ratio']:.2f}x | {r['median_ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['fraction_of_mac_ratio']:.0%} | {kinds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="resnet18,resnet50")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", help="write the figures as JSON")
    parser.add_argument("--quick", action="store_true", help="smoke test: resnet18, 64 px, batch 2, 2 rounds")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.archs, args.image_size, args.batch_size, args.repeats, args.warmup = "resnet18", 64, 2, 2, 1
    result = {"machine": machine_info(), "command": " ".join(sys.argv),
              "archs": [bench_arch(a, image_size=args.image_size, batch_size=args.batch_size, repeats=args.repeats,
                                   warmup=args.warmup, quiet=args.quiet) for a in args.archs.split(",")]}
    for arch in result["archs"]:
        print(format_table(arch) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
