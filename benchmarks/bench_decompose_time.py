"""Wall time of data-free against data-aware decomposition of one trained model.

The issue's time target: decomposing VGG16 at 64 px with calibration takes at most twice as
long as data-free.  The model is a ``--model`` file (e.g. the demo's ``runs/demo/model``),
the plan the tool's default for it (VBMF Tucker-2, the first conv kept, FC SVD at 5%),
the calibration images as ``--decompose`` takes them from ``--train_path``.  Run it alone on
the machine: a second process on 2 cores stalls OpenMP.

    python main.py --demo
    python benchmarks/bench_decompose_time.py --model runs/demo/model --train_path data/demo/train
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import calibration  # noqa: E402
import dataset  # noqa: E402
import decompositions  # noqa: E402
import models  # noqa: E402
import ranks  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--train_path", required=True)
    p.add_argument("--calibration", type=int, default=calibration.DEFAULT_IMAGES)
    p.add_argument("--fc_rank_ratio", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    model, meta = models.load_model(args.model)
    model.eval()
    size = meta["image_size"]
    loader, _ = dataset.build_calibration_loader(args.train_path, image_size=size, images=args.calibration,
                                                 batch_size=32, workers=0, seed=0)
    batches = calibration.collect(loader)
    inputs = (3, size, size)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    policy = ranks.Policy(conv="tucker", fc="svd", fc_rank_ratio=args.fc_rank_ratio, skip={convs[0]: "first conv"})
    plan = ranks.plan_decomposition(model, policy, inputs)
    times: dict[str, list[float]] = {"data-free": [], "data-aware": []}
    for _ in range(args.repeats):
        for variant in times:
            net = copy.deepcopy(model)
            start = time.perf_counter()
            decompositions.decompose_model(net, plan, input_size=inputs,
                                           calibration=batches if variant == "data-aware" else None)
            times[variant].append(time.perf_counter() - start)
    free, aware = (min(v) for v in times.values())
    print(f"{meta['arch']} at {size} px, {sum(len(b) for b in batches)} calibration images: data-free {free:.1f} s, "
          f"data-aware {aware:.1f} s ({aware / free:.1f}x); threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
