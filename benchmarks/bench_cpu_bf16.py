"""Accuracy of CPU training in float32 against bfloat16 autocast + channels_last (``--cpu_bf16``).

The tool's two training steps on a real folder, each run twice from the same start -- float32
NCHW (``--cpu_bf16 off``) and bfloat16 autocast + channels_last (``on``) -- and evaluated in
float32 alike:

* ``train``: vgg16 with trained convs (``--weights``), new classifier, ``--epochs`` epochs at
  the tool's ``--train`` rates;
* ``fine_tune``: the float32-trained model decomposed as the demo does (Tucker-2 at VBMF
  ranks, the first conv kept, FC SVD at 5%; data-free, so that both runs start from the same
  factors), ``--epochs`` epochs at the tool's ``--fine_tune`` rate.

Accuracy on the test folder and the seconds each run took, per seed; the speed itself is
``bench_train_speed.py``'s (run alone).  Results as JSON lines.

    python benchmarks/make_fashion_mnist.py /tmp/fmnist-shirt
    python benchmarks/bench_cpu_bf16.py /tmp/fmnist-shirt --weights "$(python -c 'import main; print(main.demo_weights())')" \\
        --seeds 0,1,2 --json benchmarks/results/cpu_bf16.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataset  # noqa: E402
import decompositions  # noqa: E402
import finetune  # noqa: E402
import main as main_cli  # noqa: E402 - the tool's default rates
import models  # noqa: E402
import ranks  # noqa: E402
import runtime  # noqa: E402

VARIANTS = {"fp32": False, "bf16+cl": True}


def train(model: nn.Module, train_ds, test_loader, recipe: finetune.Recipe, fast: bool, seed: int,
          batch_size: int) -> dict:
    """``model`` trained by ``recipe`` in float32 or bf16 + channels_last; test accuracy in float32.
    The loader is built here, seeded, without workers: both variants see the same batches."""
    runtime.seed_everything(seed)
    loader = dataset.build_loaders(train_ds, None, batch_size=batch_size, workers=0, seed=seed)[0]
    recipe = finetune.Recipe(**{**recipe.__dict__, "cpu_bf16": fast, "channels_last": fast})
    start = time.perf_counter()
    finetune.fit(model, loader, None, recipe=recipe, device=torch.device("cpu"), show_progress=False)
    seconds = time.perf_counter() - start
    acc = finetune.evaluate(model, test_loader, device=torch.device("cpu"), show_progress=False)["acc"]
    return {"acc": acc, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="folder with train/ and test/")
    p.add_argument("--weights", required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--json")
    args = p.parse_args()
    if not runtime.cpu_bf16_supported():
        raise SystemExit("this CPU has no native bfloat16: nothing to compare")
    size = args.size
    train_ds, test_ds, classes = dataset.build_datasets(os.path.join(args.data, "train"),
                                                        os.path.join(args.data, "test"), image_size=size)
    for seed in (int(s) for s in args.seeds.split(",")):
        test_loader = dataset.build_loaders(None, test_ds, batch_size=args.batch_size, workers=1, seed=seed)[1]
        runtime.seed_everything(seed)
        start, pretrained = models.build_pretrained("vgg16", len(classes), weights=args.weights)
        recipe = finetune.Recipe(epochs=args.epochs, lr=main_cli.DEFAULT_LR["train"],
                                 lr_scale={n: main_cli.DEFAULT_PRETRAINED_LR_SCALE for n in pretrained})
        trained = {}
        for name, fast in VARIANTS.items():
            trained[name] = copy.deepcopy(start)
            row = {"step": "train", "seed": seed, "variant": name,
                   **train(trained[name], train_ds, test_loader, recipe, fast, seed, args.batch_size)}
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
        base = trained["fp32"].eval()
        convs = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]
        policy = ranks.Policy(conv="tucker", fc="svd", fc_rank_ratio=0.05, skip={convs[0]: "first conv"})
        plan = ranks.plan_decomposition(base, policy, (3, size, size))
        decompositions.decompose_model(base, plan, input_size=(3, size, size))
        recipe = finetune.Recipe(epochs=args.epochs, lr=main_cli.DEFAULT_LR["tucker"])
        for name, fast in VARIANTS.items():
            row = {"step": "fine_tune", "seed": seed, "variant": name,
                   **train(copy.deepcopy(base), train_ds, test_loader, recipe, fast, seed, args.batch_size)}
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
