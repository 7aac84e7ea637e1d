"""Ranks the kernels like: measured speed against planned MACs, with and without ``--rank_multiple``.

``--arch`` (default VGG16; seeded random weights: timings do not depend on the values; a
2-class head, the first conv kept), its convs by ``--conv`` (Tucker-2, CP, or ``auto``:
Tucker-2 or CP per layer; 1x1 convs, as in ResNet-50's bottlenecks, become SVD pairs),
planned by the MACs budget at each ``--targets`` ratio, once with free
ranks and once with ranks in blocks of ``--multiple`` (``Policy.rank_multiple``); every
model exported to ONNX as the tool exports it (free ranks are zero-padded to blocks of 16
there, so they run MACs the plan did not count) and timed in onnxruntime on this CPU,
interleaved with the original (:func:`inference.time_interleaved`), median of ``--repeats``
rounds.  Printed: the planned MACs ratio, the MACs the exported graph runs, the measured
speedup and the speedup as a share of the planned ratio.

    python benchmarks/bench_blocks.py [--arch vgg16] [--conv tucker] [--targets 2,3,5] [--image_size 224] \
        [--batch_size 8] [--json OUT]

The models are built with the planned structure and default weights
(``decompositions.apply_plan``): no factorization of the weights is computed (CP's ALS on
VGG16 would take minutes and change no timing; ``--conv auto`` still runs the short CP fits
its planning measures errors with).

Time it alone: another process on the 2 cores changes every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import decompositions  # noqa: E402
import inference  # noqa: E402
import ranks  # noqa: E402
import report  # noqa: E402


def _padded_macs(model: torch.nn.Module, input_size, multiple: int) -> int:
    """MACs of the graph the ONNX export runs (ranks zero-padded to ``multiple``)."""
    return report.count_macs(inference.pad_ranks(copy.deepcopy(model), multiple), input_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vgg16", help="a torchvision model name")
    parser.add_argument("--conv", default="tucker", choices=("tucker", "cp", "auto"))
    parser.add_argument("--targets", default="2,3,5")
    parser.add_argument("--multiple", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()

    build = lambda: torchvision.models.get_model(args.arch, weights=None, num_classes=2).eval()  # noqa: E731
    torch.manual_seed(0)
    original = build()
    first = next(n for n, m in original.named_modules() if isinstance(m, torch.nn.Conv2d))
    input_size = (3, args.image_size, args.image_size)
    example = torch.randn(args.batch_size, *input_size)
    macs0 = report.count_macs(original, input_size)
    spectra: dict = {}
    models = {"original": original}
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        for multiple in (None, args.multiple):
            policy = ranks.Policy(conv=args.conv, target_macs=target, skip={first: "first conv kept"},
                                  rank_multiple=multiple)
            plan = ranks.plan_decomposition(original, policy, input_size, spectra=spectra)
            model = decompositions.apply_plan(build(), {n: e for n, e in plan.items() if e["method"] != "none"})
            methods = sorted({e["method"] for e in plan.values() if e["method"] != "none"})
            name = f"{target:g}x {'blocks of %d' % multiple if multiple else 'free ranks'}"
            models[name] = model.eval()
            planned = macs0 / report.count_macs(model, input_size)
            run = macs0 / _padded_macs(model, input_size, inference.ONNX_RANK_MULTIPLE)
            rows.append({"model": name, "target": target, "multiple": multiple, "planned_macs_ratio": planned,
                         "exported_macs_ratio": run, "methods": methods})
            print(f"planned {name}: {planned:.2f}x fewer MACs planned, {run:.2f}x in the exported graph", flush=True)
    predictors = {name: inference.prepare(m, example, backend="onnx") for name, m in models.items()}
    times = inference.time_interleaved({n: (lambda p=p: p(example)) for n, p in predictors.items()},
                                       warmup=args.warmup, repeats=args.repeats, devices=[torch.device("cpu")])
    base = statistics.median(times["original"])
    print(f"\n{args.arch}, convs by {args.conv}; onnxruntime, {args.image_size} px, batch {args.batch_size}, "
          f"median of {args.repeats} interleaved rounds; "
          f"original {base:.1f} ms")
    print("| model | planned MACs ratio | MACs ratio of the exported graph | ms | speedup | speedup / planned |")
    print("|---|--:|--:|--:|--:|--:|")
    for row in rows:
        ms = statistics.median(times[row["model"]])
        row.update(ms=ms, speedup=base / ms, share=base / ms / row["planned_macs_ratio"], original_ms=base)
        print(f"| {row['model']} | {row['planned_macs_ratio']:.2f}x | {row['exported_macs_ratio']:.2f}x | {ms:.1f} | "
              f"{row['speedup']:.2f}x | {100 * row['share']:.0f}% |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "arch": args.arch, "conv": args.conv, "image_size": args.image_size,
                       "batch_size": args.batch_size, "repeats": args.repeats}, fh, indent=1)


if __name__ == "__main__":
    main()
