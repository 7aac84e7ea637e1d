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

``--finetune_first N`` first fine-tunes the shipped weights on the JPEG ``train/`` folder
(the weights were trained on the original PNG images; random crop + flip, the tool's
``finetune.fit`` at its training rate), once, cached in ``--cache_dir``.  ``--ft_after N``
then fine-tunes the tool's default variants (data-free + BN correction, data-aware) for N
epochs of ``--ft_images`` training images each at the tool's ``--fine_tune`` rate, and
reports the accuracy after it too.  ``--seeds`` repeats everything that draws images.

    python benchmarks/bench_calibration.py --data DIR --weights shared/data/cifar10/resnet56-4bfd9763.th \\
        --arch resnet56 --targets 2,3 --calibration 64,256,1024 --json out.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torchvision
from torch import nn
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import calibration  # noqa: E402
import decompositions  # noqa: E402
import finetune  # noqa: E402
import main as main_cli  # noqa: E402 - the tool's default learning rates
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
    p.add_argument("--seeds", default="0", help="comma-separated: each draws the test subset, the calibration "
                   "and fine-tuning images")
    p.add_argument("--no_data_ranks", action="store_true", help="skip the plans from response spectra")
    p.add_argument("--finetune_first", type=int, default=0, help="epochs on the JPEG train folder before anything")
    p.add_argument("--cache_dir", default="/tmp", help="where --finetune_first keeps its weights")
    p.add_argument("--ft_after", type=int, default=0, help="fine-tuning epochs after decomposition")
    p.add_argument("--ft_images", type=int, default=10000, help="images per fine-tuning epoch (0: all)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="append one JSON line per result")
    p.add_argument("--summarize", metavar="JSONL", help="print a markdown table of a results file and exit "
                   "(a repeated measurement: the last one)")
    return p


def summarize(path: str) -> str:
    """One row per (arch, method, target, calibration size, variant): the mean over seeds (the
    last line of each seed), with the spread of the drop from the original when seeds differ."""
    rows: dict[tuple, dict[int, dict]] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            key = (r["arch"], r["method"], r["target"], r["calibration"], r["variant"])
            rows.setdefault(key, {})[r.get("seed", 0)] = r

    def drop(values: list[float]) -> str:
        if not values:
            return "-"
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{statistics.fmean(values):+.2f}{spread}"

    lines = ["| arch | method | MACs | calibration | variant | seeds | accuracy | vs original | after fine-tuning "
             "| vs original | seconds |", "|---|---|--:|--:|---|--:|--:|--:|--:|--:|--:|"]
    for (arch, method, target, size, variant), by_seed in rows.items():
        runs = list(by_seed.values())
        tuned = [r for r in runs if "acc_ft" in r]
        seconds = [r["seconds"] for r in runs if "seconds" in r]
        acc_ft = f"{statistics.fmean(r['acc_ft'] for r in tuned):.2f}" if tuned else "-"
        lines.append(f"| {arch} | {method} | {target:g}x | {size} | {variant} | {len(runs)} | "
                     f"{statistics.fmean(r['acc'] for r in runs):.2f} | {drop([r['acc'] - r['original'] for r in runs])} | "
                     f"{acc_ft} | {drop([r['acc_ft'] - r['original'] for r in tuned])} | "
                     f"{f'{statistics.fmean(seconds):.1f}' if seconds else '-'} |")
    return "\n".join(lines)


def train_loader(args, seed: int, images: int) -> torch.utils.data.DataLoader:
    """Augmented training batches (random crop with 4 px padding, flip: He et al.'s CIFAR recipe)
    of a seeded subset of ``images`` (0: all)."""
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    train = torchvision.datasets.ImageFolder(os.path.join(args.data, "train"), tf)
    gen = torch.Generator().manual_seed(seed)
    if images:
        train = torch.utils.data.Subset(train, torch.randperm(len(train), generator=gen)[:images].tolist())
    return torch.utils.data.DataLoader(train, batch_size=128, shuffle=True, num_workers=args.workers, generator=gen)


def original_model(args, device) -> nn.Module:
    """The shipped weights, fine-tuned first on the JPEG train folder when asked (cached)."""
    model = cifar_resnet(args.arch, args.weights)
    if not args.finetune_first:
        return model.eval()
    path = os.path.join(args.cache_dir, f"{args.arch}-jpeg-ft{args.finetune_first}.pt")
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    finetune.fit(model, train_loader(args, 0, 0), None,
                 recipe=finetune.Recipe(epochs=args.finetune_first, lr=main_cli.DEFAULT_LR["train"]), device=device,
                 show_progress=False)
    os.makedirs(args.cache_dir, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def fine_tuned(args, model: nn.Module, method: str, seed: int, device, test_loader) -> float:
    """Accuracy after ``--ft_after`` epochs at the rate ``--fine_tune`` would use."""
    torch.manual_seed(seed)
    lr = main_cli.DEFAULT_LR["cp" if method == "cp" else "tucker"]
    finetune.fit(model, train_loader(args, seed, args.ft_images), None,
                 recipe=finetune.Recipe(epochs=args.ft_after, lr=lr), device=device, show_progress=False)
    return accuracy(model.eval(), test_loader)


def loaders(args, size: int):
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    test = torchvision.datasets.ImageFolder(os.path.join(args.data, "test"), tf)
    train = torchvision.datasets.ImageFolder(os.path.join(args.data, "train"), tf)
    gen = torch.Generator().manual_seed(args.seed)
    if args.test_images:
        test = torch.utils.data.Subset(test, torch.randperm(len(test), generator=gen)[:args.test_images].tolist())
    order = torch.randperm(len(train), generator=gen)[:size].tolist()
    calib = torch.utils.data.Subset(train, order)
    return (torch.utils.data.DataLoader(test, batch_size=250, num_workers=args.workers),
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
    device = torch.device("cpu")
    base = original_model(args, device)
    for seed in (int(s) for s in args.seeds.split(",")):
        args.seed = seed
        run_seed(args, base, device)


def run_seed(args, base: nn.Module, device) -> None:
    torch.manual_seed(args.seed)
    sizes = [int(s) for s in args.calibration.split(",")]
    test_loader, _ = loaders(args, 1)
    original = accuracy(base, test_loader)
    print(f"{args.arch}: original {original:.2f}% on {len(test_loader.dataset)} test images (seed {args.seed})",
          flush=True)

    def emit(record, model=None):
        if model is not None and args.ft_after:
            record["acc_ft"] = fine_tuned(args, model, record["method"], args.seed, device, test_loader)
            record["ft_epochs"], record["ft_images"] = args.ft_after, args.ft_images
        record.update(arch=args.arch, original=original, seed=args.seed, finetune_first=args.finetune_first)
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
                          seconds=time.perf_counter() - start, acc=accuracy(model, test_loader)), model)
                model = copy.deepcopy(base)
                start = time.perf_counter()
                decompositions.decompose_model(model, plan, input_size=INPUT, calibration=calib)
                aware = dict(method=method, target=target, variant="data-aware", calibration=size,
                             seconds=time.perf_counter() - start, acc=accuracy(model, test_loader))
                # the same factors, then the BatchNorm correction decompose_model applies with recalibrate_bn=True
                corrected = copy.deepcopy(model)
                calibration.reestimate_batchnorm(corrected, calib, reference=base)
                emit(aware, model)
                model = corrected
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
