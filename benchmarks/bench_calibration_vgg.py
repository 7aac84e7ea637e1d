"""Data-free against data-aware decomposition on the trained-VGG16 benchmark, straight after.

The protocol of ``bench_budget.py`` (vgg16 whose 13 convs come trained from ``--weights``,
Fashion-MNIST T-shirt/top vs Shirt at 64 px, trained ``--epochs`` at the tool's rates, the
first conv kept, the hidden FC layers by SVD at 5% of their rank); then for each method
(Tucker-2, CP) and each target -- the MACs ratio plain VBMF reaches for that method, and 5x
and 8x by the budget (the tool's default sum rule) -- one plan, applied twice:

* ``data-free``: factors from the weights, the filter-norm correction on (the tool's default
  without calibration data);
* ``data-aware``: ``decompose_model(calibration=...)`` on ``--calibration`` training images
  (the tool's default with ``--train_path``; VGG16 has no BatchNorm to correct).

Accuracy on the test folder straight after decomposition (no fine-tuning), the seconds each
decomposition took, and with ``--ft_after N`` the accuracy after N fine-tuning epochs (of
``--ft_images`` augmented training images, at the rate ``--fine_tune`` would use).  One JSON
per seed in ``--out_dir``; ``--summarize`` tabulates them.  ``--size``, ``--train_images`` and
``--test_images`` run the same protocol on other folders, e.g. CIFAR-10 at 32 px (the shared
JPEG folders, extracted with ``tar xzf``); ``--cache_dir`` keeps each seed's trained model.
``--int8`` adds each data-aware model's and the original's accuracy in int8 (the tool's
``--quantize int8``: onnxruntime QDQ, calibrated on 64 of the calibration images) beside
their float32 accuracy through onnxruntime, and the ONNX file sizes.

    python benchmarks/bench_calibration_vgg.py /tmp/cifar --weights "$(python -c 'import main; print(main.demo_weights())')" \
        --size 32 --train_images 10000 --test_images 2000 --epochs 1 --methods tucker --targets vbmf,2,3,5 \
        --cache_dir /tmp --out_dir benchmarks/results/calibration/vgg16_cifar32

    python benchmarks/make_fashion_mnist.py /tmp/fmnist-shirt
    python benchmarks/bench_calibration_vgg.py /tmp/fmnist-shirt --weights "$(python -c 'import main; print(main.demo_weights())')" --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent
for _path in (BENCH_DIR.parent, BENCH_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import bench_real  # noqa: E402
import calibration  # noqa: E402
import dataset  # noqa: E402
import decompositions  # noqa: E402
import finetune  # noqa: E402
import main as main_cli  # noqa: E402 - the tool's default learning rates
import models  # noqa: E402
import ranks  # noqa: E402
import report  # noqa: E402
import runtime  # noqa: E402

logger = logging.getLogger("bench_calibration_vgg")

ARCH = "vgg16"
SIZE = 64
DEFAULT_OUT = BENCH_DIR / "results" / "calibration" / "vgg16_fmnist"
#: --fc: the tool's --fc for each.  "svd": the FC layers at the fixed --fc_rank_ratio (this
#: benchmark's protocol); "budget": at the ranks the budget (or VBMF) gives them, as --fc svd
#: without --fc_rank_ratio does; "none": kept dense, the tool's default (the convs then carry
#: the whole budget).
FC_MODES = {"svd": "svd", "budget": "svd", "none": "none"}


def _subset(ds, images: int, seed: int):
    """A seeded subset of ``images`` items of ``ds`` (0: all of it)."""
    if not images or images >= len(ds):
        return ds
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:images]
    return torch.utils.data.Subset(ds, order.tolist())


def _loader(ds, args: argparse.Namespace, seed: int, *, train: bool):
    loaders = dataset.build_loaders(ds if train else None, None if train else ds, batch_size=args.batch_size,
                                    workers=args.workers, seed=seed)
    return loaders[0] if train else loaders[1]


def _int8(net: nn.Module, test_loader, batches: list[torch.Tensor]) -> dict[str, Any]:
    """``net`` through onnxruntime in float32 and in int8 (``--quantize int8``): test accuracy of
    both, how often their classes agree, the file sizes."""
    import inference

    calib, count = [], 0
    for batch in batches:  # the tool's 64 calibration images for int8
        calib.append(batch[:main_cli.INT8_CALIBRATION_IMAGES - count].cpu())
        count += len(calib[-1])
        if count >= main_cli.INT8_CALIBRATION_IMAGES:
            break
    float_bytes, int8_bytes = inference.onnx_float_and_int8(copy.deepcopy(net).cpu(), calib[0], calib)
    top1 = inference.float_and_int8_top1(inference.onnx_runner(float_bytes), inference.onnx_runner(int8_bytes),
                                         test_loader)
    return {"acc_onnx_float32": top1["accuracy_float32"], "acc_int8": top1["accuracy_int8"],
            "int8_agreement": top1["agreement"], "bytes_float32": len(float_bytes), "bytes_int8": len(int8_bytes)}


def run_seed(args: argparse.Namespace, seed: int, device: torch.device) -> dict[str, Any]:
    progress = not args.quiet
    size = args.size
    input_size = (3, size, size)
    runtime.seed_everything(seed)
    train_dir, test_dir = os.path.join(args.data, "train"), os.path.join(args.data, "test")
    train_ds, test_ds, classes = dataset.build_datasets(train_dir, test_dir, image_size=size)
    train_ds, test_ds = _subset(train_ds, args.train_images, seed), _subset(test_ds, args.test_images, seed)
    train_loader, test_loader = _loader(train_ds, args, seed, train=True), _loader(test_ds, args, seed, train=False)
    model, pretrained = models.build_pretrained(ARCH, len(classes), weights=args.weights)
    model.to(device)
    start = time.perf_counter()
    # Named by everything the training depends on, so that another folder or weights never match.
    key = hashlib.sha256(repr((os.path.abspath(args.data), os.path.abspath(args.weights), size, len(train_ds),
                               args.epochs, args.batch_size, seed, main_cli.DEFAULT_LR["train"])).encode()).hexdigest()
    cached = os.path.join(args.cache_dir, f"{ARCH}-{key[:16]}.pt") if args.cache_dir else None
    if cached and os.path.exists(cached):
        model.load_state_dict(torch.load(cached, map_location=device, weights_only=True))
    else:
        finetune.fit(model, train_loader, None,
                     recipe=finetune.Recipe(epochs=args.epochs, lr=main_cli.DEFAULT_LR["train"],
                                            lr_scale={n: main_cli.DEFAULT_PRETRAINED_LR_SCALE for n in pretrained}),
                     device=device, show_progress=progress, log=logger)
        if cached:
            os.makedirs(args.cache_dir, exist_ok=True)
            torch.save(model.state_dict(), cached)
    model.eval()
    acc_original = finetune.evaluate(model, test_loader, device=device, show_progress=progress)["acc"]
    result: dict[str, Any] = {"seed": seed, "acc_original": acc_original, "train_s": time.perf_counter() - start,
                              "n_train": len(train_ds), "n_test": len(test_ds), "rows": []}
    logger.info("seed %d: original %.2f%%", seed, 100 * acc_original)
    # The calibration images as --decompose takes them: test-time transforms, a seeded subset.
    loader, _ = dataset.build_calibration_loader(train_dir, image_size=size, images=args.calibration,
                                                 batch_size=args.batch_size, workers=args.workers, seed=seed)
    batches = calibration.collect(loader, device=device)
    if args.int8:
        result["int8_original"] = _int8(model, test_loader, batches)
        logger.info("seed %d: original int8 %.2f%%", seed, 100 * result["int8_original"]["acc_int8"])
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    macs0 = report.count_macs(model, input_size)
    for method, fc in ((m, f) for m in args.methods for f in args.fc):
        fc_policy = {"fc_rank_ratio": args.fc_rank_ratio} if fc == "svd" else {}
        base = {"conv": method, "fc": FC_MODES[fc], **fc_policy, "skip": {first: "first conv kept"}}
        spectra: dict = {}
        for target in args.targets:
            policy = ranks.Policy(**base) if target == "vbmf" else ranks.Policy(target_macs=float(target), **base)
            plan = ranks.plan_decomposition(model, policy, input_size, spectra=spectra)
            for variant in ("data-free", "data-aware"):
                net = copy.deepcopy(model)
                start = time.perf_counter()
                rows = decompositions.decompose_model(net, plan, input_size=input_size, seed=seed,
                                                      calibration=batches if variant == "data-aware" else None)
                seconds = time.perf_counter() - start
                acc = finetune.evaluate(net, test_loader, device=device, show_progress=progress)["acc"]
                row = {"method": method, "fc": fc, "target": target, "variant": variant,
                       "macs_ratio": macs0 / report.count_macs(net, input_size), "acc": acc, "seconds": seconds,
                       "data_free_layers": [r.name for r in rows if "data-free" in (r.reason or "")]}
                if args.int8 and variant == "data-aware":
                    row.update(_int8(net, test_loader, batches))
                if args.ft_after:
                    # At the rate --fine_tune uses for this model (benchmarks: one short epoch of the
                    # training images, augmented).
                    runtime.seed_everything(seed)
                    lr = main_cli.DEFAULT_LR["cp" if any(r.method == "cp" for r in rows) else "tucker"]
                    finetune.fit(net, _loader(_subset(train_ds, args.ft_images, seed + 1), args, seed, train=True),
                                 None, recipe=finetune.Recipe(epochs=args.ft_after, lr=lr), device=device,
                                 show_progress=progress, log=logger)
                    net.eval()
                    row["acc_ft"] = finetune.evaluate(net, test_loader, device=device, show_progress=progress)["acc"]
                    row["ft_epochs"], row["ft_images"] = args.ft_after, args.ft_images
                result["rows"].append(row)
                logger.info("seed %d %s (fc %s) %s %s: %.2fx MACs, %.2f%% (original %.2f%%), %.1f s", seed, method,
                            fc, target, variant, row["macs_ratio"], 100 * acc, 100 * acc_original, seconds)
                del net
    return result


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f}"


def summarize(runs: list[dict[str, Any]]) -> str:
    """Per method, target and variant: accuracy straight after and its drop from each seed's original."""
    originals = [100 * r["acc_original"] for r in runs]
    lines = [f"seeds {', '.join(str(r['seed']) for r in runs)}; original (fine-tuned) {_mean_sd(originals)}%", "",
             "| method | target | variant | MACs ratio | straight after | drop (paired) | after fine-tuning "
             "| drop (paired) | seconds |", "|---|---|---|--:|--:|--:|--:|--:|--:|"]
    def key(row: dict) -> tuple:  # rows from before --fc had the FC layers at the fixed ratio
        return row["method"], row.get("fc", "svd"), row["target"], row["variant"]

    keys = list(dict.fromkeys(key(row) for r in runs for row in r["rows"]))
    for method, fc, target, variant in keys:
        pairs = [(r, row) for r in runs for row in r["rows"] if key(row) == (method, fc, target, variant)]
        ratios = [row["macs_ratio"] for _, row in pairs]
        shown = method if fc == "svd" else f"{method}, fc {fc}"
        lines.append(f"| {shown} | {target} | {variant} | {min(ratios):.2f}-{max(ratios):.2f}x | "
                     f"{_mean_sd([100 * row['acc'] for _, row in pairs])} | "
                     f"{_mean_sd([100 * (r['acc_original'] - row['acc']) for r, row in pairs])} | "
                     f"{_mean_sd(tuned) if (tuned := [100 * row['acc_ft'] for _, row in pairs if 'acc_ft' in row]) else '-'} | "
                     f"{_mean_sd(d) if (d := [100 * (r['acc_original'] - row['acc_ft']) for r, row in pairs if 'acc_ft' in row]) else '-'} | "
                     f"{statistics.fmean(row['seconds'] for _, row in pairs):.1f} |")
    int8 = [(r, row) for r in runs for row in r["rows"] if "acc_int8" in row]
    if int8:
        lines += ["", "int8 (onnxruntime QDQ, 64 calibration images) against float32 through onnxruntime, "
                  "straight after decomposition; mean ± sd over seeds", "",
                  "| model | float32 | int8 | int8 - float32 | classes agree | file float32 -> int8 |",
                  "|---|--:|--:|--:|--:|--:|"]
        originals = [r["int8_original"] for r in runs if "int8_original" in r]
        groups = [("original", originals)] + [
            (f"{m} {t} data-aware", [row for _, row in int8 if (row["method"], row["target"]) == (m, t)])
            for m, t in dict.fromkeys((row["method"], row["target"]) for _, row in int8)]
        for name, rows in groups:
            if rows:
                lines.append(
                    f"| {name} | {_mean_sd([100 * x['acc_onnx_float32'] for x in rows])} | "
                    f"{_mean_sd([100 * x['acc_int8'] for x in rows])} | "
                    f"{_mean_sd([100 * (x['acc_int8'] - x['acc_onnx_float32']) for x in rows])} | "
                    f"{_mean_sd([100 * x['int8_agreement'] for x in rows])}% | "
                    f"{rows[0]['bytes_float32'] / 2**20:.1f} -> {rows[0]['bytes_int8'] / 2**20:.1f} MB |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", nargs="?", default=str(bench_real.DEFAULT_DATA), help="folder with train/ and test/")
    parser.add_argument("--weights", help="the trained conv stack (ONNX, Keras .h5 or state_dict)")
    parser.add_argument("--seeds", type=bench_real._csv(int), default=[0, 1, 2])
    parser.add_argument("--methods", type=bench_real._csv(str), default=["tucker", "cp"])
    parser.add_argument("--targets", type=bench_real._csv(str), default=["vbmf", "5", "8"],
                        help="'vbmf' (plain VBMF's ratio) or MACs ratios for the budget")
    parser.add_argument("--calibration", type=int, default=calibration.DEFAULT_IMAGES)
    parser.add_argument("--size", type=int, default=SIZE, help="image size (the model's, for training and tests)")
    parser.add_argument("--train_images", type=int, default=0, help="seeded subset of train/ for training (0: all)")
    parser.add_argument("--test_images", type=int, default=0, help="seeded subset of test/ (0: all)")
    parser.add_argument("--cache_dir", help="keep each seed's trained model here and reuse it")
    parser.add_argument("--ft_after", type=int, default=0, help="fine-tuning epochs after each decomposition")
    parser.add_argument("--ft_images", type=int, default=0, help="seeded subset of train/ that the fine-tuning epochs go through (0: all)")
    parser.add_argument("--int8", action="store_true", help="also each data-aware model's accuracy in int8")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--fc", type=bench_real._csv(str), default=["svd"],
                        help="FC layers: 'svd' (at --fc_rank_ratio), 'budget' (SVD at the budget's ranks), 'none'")
    parser.add_argument("--fc_rank_ratio", type=float, default=bench_real.DEFAULT_FC_RANK_RATIO)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out_dir", default=str(DEFAULT_OUT))
    parser.add_argument("--summarize", action="store_true", help="only tabulate the seed files in --out_dir")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not args.summarize and not args.weights:
        parser.error("--weights FILE is needed (the trained conv stack)")
    if set(args.fc) - set(FC_MODES):
        parser.error(f"--fc takes {', '.join(FC_MODES)}, got {','.join(args.fc)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.summarize:
        device = runtime.resolve_device(args.device)
        os.makedirs(args.out_dir, exist_ok=True)
        for seed in args.seeds:
            result = run_seed(args, seed, device)
            result["settings"] = dict(vars(args))
            report.write_json(os.path.join(args.out_dir, f"seed{seed}.json"), result)
    runs = []
    for path in sorted(glob.glob(os.path.join(args.out_dir, "seed*.json"))):
        with open(path) as fh:
            runs.append(json.load(fh))
    if runs:
        table = summarize(sorted(runs, key=lambda r: r["seed"]))
        with open(os.path.join(args.out_dir, "summary.md"), "w") as fh:
            fh.write(table + "\n")
        print(table)


if __name__ == "__main__":
    main()
