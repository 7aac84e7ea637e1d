"""Data-free against data-aware decomposition, straight after decomposition (no fine-tuning).

Trained CIFAR-10 ResNet-20/56 (``shared/data/cifar10``, the JPEG image folders extracted
with ``tar xzf``), Tucker-2 and CP under a MACs budget (the first conv kept), each variant on
the same plan:

* data-free factors, as before;
* data-free factors with the BatchNorm correction (``data_aware=False``);
* data-aware factors on the weight-spectra plan, with and without the BatchNorm correction;
* data-aware factors on a plan from the layers' response spectra on the calibration images
  (``plan_decomposition(calibration=...)``: what ``--decompose`` does with ``--train_path``);

at each calibration size.  Accuracy on a seeded subset of the test folder, and the seconds
each decomposition took (wall clock, this process).  Results as JSON lines.

    python benchmarks/bench_calibration.py --data DIR --weights shared/data/cifar10/resnet56-4bfd9763.th \\
        --arch resnet56 --targets 2,3 --calibration 64,256,1024 --json out.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torchvision
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import calibration  # noqa: E402
import decompositions  # noqa: E402
import ranks  # noqa: E402
from cifar_resnet import MEAN, STD, cifar_resnet  # noqa: E402

INPUT = (3, 32, 32)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder holding train/ and test/ (CIFAR-10 JPEGs)")
    p.add_argument("--weights", help="resnet20-*.th or resnet56-*.th")
    p.add_argument("--arch", default="resnet56", choices=("resnet20", "resnet56"))
    p.add_argument("--methods", default="tucker,cp")
    p.add_argument("--targets", default="2,3", help="MACs reductions, comma-separated")
    p.add_argument("--calibration", default="256", help="calibration sizes, comma-separated")
    p.add_argument("--test_images", type=int, default=2000, help="seeded subset of the test folder (0: all)")
    p.add_argument("--seed", type=int, default=0, help="draws the test subset and the calibration images")
    p.add_argument("--no_data_ranks", action="store_true", help="skip the plans from response spectra")
    p.add_argument("--json", help="append one JSON line per result")
    p.add_argument("--summarize", metavar="JSONL", help="print a markdown table of a results file and exit "
                   "(a repeated measurement: the last one)")
    return p


def summarize(path: str) -> str:
    """One row per (arch, method, target, calibration size, variant), the last line of each."""
    rows = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            rows[(r["arch"], r["method"], r["target"], r["calibration"], r["variant"])] = r
    lines = ["| arch | method | MACs | calibration | variant | accuracy | vs original | seconds |",
             "|---|---|--:|--:|---|--:|--:|--:|"]
    for (arch, method, target, size, variant), r in rows.items():
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        lines.append(f"| {arch} | {method} | {target:g}x | {size} | {variant} | {r['acc']:.2f} | "
                     f"{r['acc'] - r['original']:+.2f} | {seconds} |")
    return "\n".join(lines)


def loaders(args, size: int):
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    test = torchvision.datasets.ImageFolder(os.path.join(args.data, "test"), tf)
    train = torchvision.datasets.ImageFolder(os.path.join(args.data, "train"), tf)
    gen = torch.Generator().manual_seed(args.seed)
    if args.test_images:
        test = torch.utils.data.Subset(test, torch.randperm(len(test), generator=gen)[:args.test_images].tolist())
    order = torch.randperm(len(train), generator=gen)[:size].tolist()
    calib = torch.utils.data.Subset(train, order)
    return (torch.utils.data.DataLoader(test, batch_size=250, num_workers=2),
            [x for x, _ in torch.utils.data.DataLoader(calib, batch_size=64)])


@torch.inference_mode()
def accuracy(model, loader) -> float:
    model.eval()
    right = total = 0
    for x, y in loader:
        right += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * right / total


def main(args) -> None:
    if not args.data or not args.weights:
        raise SystemExit("--data and --weights are needed (or --summarize FILE)")
    torch.manual_seed(args.seed)
    sizes = [int(s) for s in args.calibration.split(",")]
    test_loader, _ = loaders(args, 1)
    base = cifar_resnet(args.arch, args.weights).eval()
    original = accuracy(base, test_loader)
    print(f"{args.arch}: original {original:.2f}% on {len(test_loader.dataset)} test images", flush=True)

    def emit(record):
        record.update(arch=args.arch, original=original, seed=args.seed)
        print(json.dumps(record), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")

    for method in args.methods.split(","):
        for target in (float(t) for t in args.targets.split(",")):
            policy = ranks.Policy(conv=method, target_macs=target, skip={"conv1": "first conv kept"})
            plan = ranks.plan_decomposition(base, policy, INPUT)
            model = copy.deepcopy(base)
            start = time.perf_counter()
            decompositions.decompose_model(model, plan, input_size=INPUT)
            emit(dict(method=method, target=target, variant="data-free", calibration=0,
                      seconds=time.perf_counter() - start, acc=accuracy(model, test_loader)))
            for size in sizes:
                _, calib = loaders(args, size)
                model = copy.deepcopy(base)
                start = time.perf_counter()
                decompositions.decompose_model(model, plan, input_size=INPUT, calibration=calib, data_aware=False,
                                               recalibrate_bn=True)
                emit(dict(method=method, target=target, variant="data-free + BN correction", calibration=size,
                          seconds=time.perf_counter() - start, acc=accuracy(model, test_loader)))
                model = copy.deepcopy(base)
                start = time.perf_counter()
                decompositions.decompose_model(model, plan, input_size=INPUT, calibration=calib)
                emit(dict(method=method, target=target, variant="data-aware", calibration=size,
                          seconds=time.perf_counter() - start, acc=accuracy(model, test_loader)))
                # the same factors, then the BatchNorm correction decompose_model applies with recalibrate_bn=True
                calibration.reestimate_batchnorm(model, calib, reference=base)
                emit(dict(method=method, target=target, variant="data-aware + BN correction", calibration=size,
                          acc=accuracy(model, test_loader)))
                # ranks from the layers' response spectra on the same images (--ranks_from data)
                if args.no_data_ranks:
                    continue
                model = copy.deepcopy(base)
                start = time.perf_counter()
                data_plan = ranks.plan_decomposition(base, policy, INPUT, calibration=calib)
                reached = ranks.plan_cost(base, data_plan, INPUT)["macs_ratio"]
                decompositions.decompose_model(model, data_plan, input_size=INPUT, calibration=calib)
                emit(dict(method=method, target=target, variant="data-aware, data ranks", calibration=size,
                          seconds=time.perf_counter() - start, acc=accuracy(model, test_loader),
                          macs_ratio=reached))

if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    if arguments.summarize:
        print(summarize(arguments.summarize))
    else:
        main(arguments)
