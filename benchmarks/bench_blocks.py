"""Ranks the kernels like: measured speed against planned MACs, with and without ``--rank_multiple``.

VGG16 (seeded random weights: timings do not depend on the values; a 2-class head, the
first conv kept) planned by the MACs budget at each ``--targets`` ratio, once with free
ranks and once with ranks in blocks of ``--multiple`` (``Policy.rank_multiple``); every
model exported to ONNX as the tool exports it (free ranks are zero-padded to blocks of 16
there, so they run MACs the plan did not count) and timed in onnxruntime on this CPU,
interleaved with the original (:func:`inference.time_interleaved`), median of ``--repeats``
rounds.  Printed: the planned MACs ratio, the MACs the exported graph runs, the measured
speedup and the speedup as a share of the planned ratio.

    python benchmarks/bench_blocks.py [--targets 2,3,5] [--image_size 224] [--batch_size 8] [--json OUT]

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
    parser.add_argument("--targets", default="2,3,5")
    parser.add_argument("--multiple", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()

    torch.manual_seed(0)
    original = torchvision.models.vgg16(num_classes=2).eval()
    input_size = (3, args.image_size, args.image_size)
    example = torch.randn(args.batch_size, *input_size)
    macs0 = report.count_macs(original, input_size)
    spectra: dict = {}
    models = {"original": original}
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        for multiple in (None, args.multiple):
            policy = ranks.Policy(target_macs=target, skip={"features.0": "first conv kept"}, rank_multiple=multiple)
            plan = ranks.plan_decomposition(original, policy, input_size, spectra=spectra)
            model = torchvision.models.vgg16(num_classes=2).eval()
            decompositions.decompose_model(model, plan, input_size=input_size)  # in place
            name = f"{target:g}x {'blocks of %d' % multiple if multiple else 'free ranks'}"
            models[name] = model.eval()
            planned = macs0 / report.count_macs(model, input_size)
            run = macs0 / _padded_macs(model, input_size, inference.ONNX_RANK_MULTIPLE)
            rows.append({"model": name, "target": target, "multiple": multiple, "planned_macs_ratio": planned,
                         "exported_macs_ratio": run})
            print(f"planned {name}: {planned:.2f}x fewer MACs planned, {run:.2f}x in the exported graph", flush=True)
    predictors = {name: inference.prepare(m, example, backend="onnx") for name, m in models.items()}
    times = inference.time_interleaved({n: (lambda p=p: p(example)) for n, p in predictors.items()},
                                       warmup=args.warmup, repeats=args.repeats, devices=[torch.device("cpu")])
    base = statistics.median(times["original"])
    print(f"\nonnxruntime, {args.image_size} px, batch {args.batch_size}, median of {args.repeats} interleaved rounds; "
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
            json.dump({"rows": rows, "image_size": args.image_size, "batch_size": args.batch_size,
                       "repeats": args.repeats}, fh, indent=1)


if __name__ == "__main__":
    main()
