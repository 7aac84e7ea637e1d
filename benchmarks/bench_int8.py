"""int8 on top of low rank: the original and the decomposed model, each in float32 and int8.

For a pair of model files (an original from ``--train`` and its decomposition, e.g. the
demo's ``runs/demo/model`` and ``runs/demo/decomposed_model``): accuracy on ``--test_path``
of all four through onnxruntime (float32 and int8, at the models' image size), the ONNX
file sizes, and the latency of all four at ``--latency_size`` px, batch ``--batch``, timed
interleaved (:func:`inference.time_interleaved`) on this CPU.  int8 is the tool's
``--quantize int8`` (:func:`inference.quantize_int8`, calibrated on ``--calibration``
images of ``--train_path`` at the size being measured).

    python benchmarks/bench_int8.py --original runs/demo/model --decomposed runs/demo/decomposed_model \\
        --train_path data/demo/train --test_path data/demo/test --latency_size 224 --json OUT

Time it alone: another process on the 2 cores changes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import calibration  # noqa: E402
import dataset  # noqa: E402
import inference  # noqa: E402
import models  # noqa: E402


def _images(folder: str, size: int, count: int, batch: int, *, test: bool = False):
    if test:
        _, test_ds, _ = dataset.build_datasets(None, folder, image_size=size)
        loader = dataset.build_loaders(None, test_ds, batch_size=batch, workers=0)[1]
        return list(loader)
    loader, _ = dataset.build_calibration_loader(folder, image_size=size, images=count, batch_size=batch, workers=0)
    return calibration.collect(loader, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True)
    parser.add_argument("--decomposed", required=True)
    parser.add_argument("--train_path", required=True)
    parser.add_argument("--test_path", required=True)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--latency_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()

    loaded = {name: models.load_model(path) for name, path in (("original", args.original),
                                                               ("decomposed", args.decomposed))}
    size = loaded["original"][1]["image_size"]
    cal = _images(args.train_path, size, args.calibration, args.batch)
    test = _images(args.test_path, size, 0, 32, test=True)
    result: dict = {"image_size": size, "latency_size": args.latency_size, "batch": args.batch, "models": {}}
    for name, (model, _) in loaded.items():
        example = torch.randn(args.batch, 3, size, size)
        float_bytes, int8_bytes = inference.onnx_float_and_int8(model, example, cal)
        runs = {"float32": inference.onnx_runner(float_bytes), "int8": inference.onnx_runner(int8_bytes)}
        accs = {}
        for kind, run in runs.items():
            correct = sum(int((run(x).argmax(1) == y).sum()) for x, y in test)
            accs[kind] = correct / sum(len(y) for _, y in test)
        result["models"][name] = {"float32_bytes": len(float_bytes), "int8_bytes": len(int8_bytes),
                                  "float32_acc": accs["float32"], "int8_acc": accs["int8"]}
        print(f"{name}: accuracy float32 {100 * accs['float32']:.2f}%, int8 {100 * accs['int8']:.2f}%; "
              f"{len(float_bytes) / 1e6:.1f} MB -> {len(int8_bytes) / 1e6:.1f} MB", flush=True)

    # Latency at --latency_size: the same weights exported and quantized at that size.
    big_cal = _images(args.train_path, args.latency_size, args.calibration, args.batch)
    example = torch.randn(args.batch, 3, args.latency_size, args.latency_size)
    calls = {}
    for name, (model, _) in loaded.items():
        float_bytes, int8_bytes = inference.onnx_float_and_int8(model, example, big_cal)
        for kind, data in (("float32", float_bytes), ("int8", int8_bytes)):
            run = inference.onnx_runner(data)
            calls[f"{name} {kind}"] = lambda run=run: run(example)
    times = inference.time_interleaved(calls, warmup=2, repeats=args.repeats, devices=[torch.device("cpu")])
    base = statistics.median(times["original float32"])
    print(f"\nlatency at {args.latency_size} px, batch {args.batch}, onnxruntime, median of {args.repeats} "
          f"interleaved rounds:")
    for key, values in times.items():
        ms = statistics.median(values)
        result.setdefault("latency_ms", {})[key] = ms
        print(f"  {key}: {ms:.1f} ms ({base / ms:.2f}x the float32 original)")
    o, d = result["models"]["original"], result["models"]["decomposed"]
    print(f"file: {o['float32_bytes'] / 1e6:.1f} MB -> {d['int8_bytes'] / 1e6:.1f} MB "
          f"({o['float32_bytes'] / d['int8_bytes']:.1f}x smaller, decomposed + int8)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
