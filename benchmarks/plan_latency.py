"""Write a ``--target_latency`` plan for an image size other than the model's, for ``--decompose --plan``.

``--decompose --target_latency R`` times the layers at the model's own image size; a model
trained at 64 px (the demo's VGG16) and deployed at 224 px needs its plan made at 224 px.
This script plans with :func:`ranks.plan_decomposition` exactly as the command line does
(the first conv kept, Tucker-2 convs, FC layers by SVD at ``--fc_rank_ratio``), times on
onnxruntime at ``--size`` and ``--batch`` (in int8 with ``--quantize int8``, against the
float32 original), prints what the planned model measured and writes the plan file:

    python benchmarks/plan_latency.py --model runs/demo/model --target 10 --size 224 --out plan.json
    python main.py --decompose --model runs/demo/model --plan plan.json --train_path data/demo/train ...

Time it alone: another process on the 2 cores changes every figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import latency  # noqa: E402
import models  # noqa: E402
import ranks  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model file of the tool")
    parser.add_argument("--target", type=float, required=True, help="R: R times faster than the float32 original")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quantize", default="none", choices=latency.QUANTIZE)
    parser.add_argument("--fc_rank_ratio", type=float, default=0.05)
    parser.add_argument("--cache", default=None, help="the latency cache (default: the tool's)")
    parser.add_argument("--out", required=True, help="the plan file to write")
    args = parser.parse_args()

    model, info = models.load_model(args.model)
    model.eval()
    first = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    table = latency.LatencyTable(backend="onnx", batch=args.batch, cache_path=args.cache, quantize=args.quantize)
    policy = ranks.Policy(conv="tucker", fc="svd", fc_rank_ratio=args.fc_rank_ratio, skip={first: "first conv kept"},
                          target_latency=args.target)
    input_size = (3, args.size, args.size)
    start = time.perf_counter()
    plan = ranks.plan_decomposition(model, policy, input_size, latency_table=table)
    cost = ranks.plan_cost(model, plan, input_size)
    r = table.report
    print(f"{args.target:g}x asked, {r['reached']:.2f}x measured ({table.describe()}, {r['plans_tried']} plan(s), "
          f"{r['original_ms']:.1f} -> {r['planned_ms']:.1f} ms), {cost['macs_ratio']:.2f}x fewer MACs, "
          f"planned in {time.perf_counter() - start:.0f} s")
    ranks.write_plan(args.out, plan, arch=info["arch"], input_size=input_size)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
