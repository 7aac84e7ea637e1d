"""Accuracy at equal measured speed: ``--target_latency`` against ``--target_macs``.

A trained VGG16 (a torchvision ``vgg16`` state_dict, e.g. the Fashion-MNIST one of
``bench_calibration_vgg.py``), Tucker-2 on convs 2-13 and FC SVD at a fixed rank ratio (0.05,
the benchmarks' default), data-aware on ``--calibration`` training images, accuracy on the
test folder straight after decomposition (no fine-tuning). For each ``--targets`` R: the
latency budget's plan (measured speed-up S), then the MACs budget at a grid of ratios, each
timed; the MACs plan whose measured speed-up is closest to S is decomposed and evaluated
beside the latency plan. Layers and plans are timed with onnxruntime at the model's image
size, batch ``--batch``.

    python benchmarks/bench_latency_accuracy.py --state_dict /tmp/vggfmnist/vgg16-*.pt \\
        --train_path /tmp/fmnist-shirt/train --test_path /tmp/fmnist-shirt/test --size 64 --targets 3 \\
        --json benchmarks/results/latency_accuracy_fmnist.json

Time it alone: another process on the 2 cores changes every figure.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import calibration  # noqa: E402
import dataset  # noqa: E402
import decompositions as D  # noqa: E402
import finetune  # noqa: E402
import latency  # noqa: E402
import ranks  # noqa: E402
import report  # noqa: E402

FC_RANK_RATIO = 0.05
MACS_GRID = (0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 1.75, 2.0)  # multiples of R tried for the MACs budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state_dict", required=True)
    parser.add_argument("--train_path", required=True)
    parser.add_argument("--test_path", required=True)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--targets", type=float, nargs="+", default=[3.0])
    parser.add_argument("--cache", default="/tmp/bench_latency_cache.json")
    parser.add_argument("--json")
    args = parser.parse_args()

    torch.manual_seed(0)
    _, test_ds, classes = dataset.build_datasets(None, args.test_path, image_size=args.size)
    model = torchvision.models.vgg16(weights=None, num_classes=len(classes))
    model.load_state_dict(torch.load(args.state_dict, weights_only=True))
    model.eval()
    test_loader = dataset.build_loaders(None, test_ds, batch_size=32, workers=1, seed=0)[1]
    cal_loader, _ = dataset.build_calibration_loader(args.train_path, image_size=args.size, images=args.calibration,
                                                     batch_size=32, workers=1, seed=0)
    batches = calibration.collect(cal_loader)
    cpu = torch.device("cpu")

    def accuracy(net) -> float:
        return 100 * finetune.evaluate(net, test_loader, device=cpu, show_progress=False)["acc"]

    input_size = (3, args.size, args.size)
    skip = {"features.0": "first conv kept"}
    table = latency.LatencyTable(backend="onnx", batch=args.batch, cache_path=args.cache)
    original = table.model_ms(model, input_size)
    result = {"size": args.size, "batch": args.batch, "original_acc": accuracy(model), "original_ms": original,
              "machine": table.key, "rows": []}
    print(f"original: {result['original_acc']:.2f}%, {original:.1f} ms", flush=True)

    def decomposed_accuracy(plan) -> float:
        net = copy.deepcopy(model)
        D.decompose_model(net, plan, input_size=input_size, calibration=batches)
        return accuracy(net)

    def measured(plan) -> float:
        skeleton = D.apply_plan(copy.deepcopy(model), {n: e for n, e in plan.items() if e["method"] != "none"})
        return original / table.model_ms(skeleton, input_size)

    for target in args.targets:
        common = {"conv": "tucker", "fc": "svd", "fc_rank_ratio": FC_RANK_RATIO, "skip": skip}
        plan = ranks.plan_decomposition(model, ranks.Policy(target_latency=target, **common), input_size,
                                        latency_table=table)
        speed = table.report["reached"]
        macs = ranks.plan_cost(model, plan, input_size)["macs_ratio"]
        row = {"target": target, "latency": {"speedup": speed, "macs_ratio": macs, "acc": decomposed_accuracy(plan)}}
        print(f"--target_latency {target:g}: measured {speed:.2f}x, MACs {macs:.2f}x, "
              f"{row['latency']['acc']:.2f}%", flush=True)
        candidates = []
        for k in MACS_GRID:
            try:
                p = ranks.plan_decomposition(model, ranks.Policy(target_macs=k * target, **common), input_size)
            except ranks.BudgetError:
                continue
            speed_k = measured(p)
            print(f"  --target_macs {k * target:g}: measured {speed_k:.2f}x", flush=True)
            candidates.append((abs(speed_k / speed - 1), k * target, p, speed_k))
        _, ratio, best, speed_m = min(candidates, key=lambda c: c[0])
        row["macs"] = {"target_macs": ratio, "speedup": speed_m,
                       "macs_ratio": ranks.plan_cost(model, best, input_size)["macs_ratio"],
                       "acc": decomposed_accuracy(best)}
        print(f"--target_macs {ratio:g} (closest measured speed): measured {speed_m:.2f}x, "
              f"{row['macs']['acc']:.2f}%", flush=True)
        result["rows"].append(row)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        report.write_json(args.json, result)


if __name__ == "__main__":
    main()
