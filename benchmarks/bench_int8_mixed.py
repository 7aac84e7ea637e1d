"""int8 only where it might pay: a decomposed model with its high-resolution layers kept in float32.

int8 convs on thin, high-resolution layers (e.g. VGG16's 64-channel rank-16 Tucker chains at 224 px)
run no faster than float32 in onnxruntime, while the wide low-resolution ones run about 3x faster.
This times, interleaved on this CPU, one model (``--model``, e.g. a ``--target_latency`` plan's
decomposition) exported at ``--size`` px, batch ``--batch``: float32; int8 everywhere (the tool's
``--quantize int8``); and int8 with every conv whose input is at least P px kept in float32
(:func:`inference.quantize_int8`'s ``keep_float``), for each P of ``--float_from``.

    python benchmarks/bench_int8_mixed.py --model runs/demo/decomposed_model --train_path data/demo/train \\
        --size 224 --float_from 224,112,56

Time it alone: another process on the 2 cores changes every figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import inference  # noqa: E402
import models  # noqa: E402
from bench_int8 import _images  # noqa: E402


def conv_input_sizes(float_bytes: bytes) -> dict[str, int]:
    """Each Conv node's input height in an exported model (ONNX shape inference)."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(onnx.load_from_string(float_bytes)).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*graph.value_info, *graph.input]}
    return {n.name: shapes[n.input[0]][2] for n in graph.node if n.op_type == "Conv"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--train_path", required=True, help="calibration images for int8")
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--float_from", default="224,112,56", help="comma-separated input sizes P")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model, _ = models.load_model(args.model)
    example = torch.randn(args.batch, 3, args.size, args.size)
    cal = _images(args.train_path, args.size, args.calibration, args.batch)
    float_bytes, int8_bytes = inference.onnx_float_and_int8(model, example, cal)
    sizes = conv_input_sizes(float_bytes)
    variants = {"float32": float_bytes, "int8 everywhere": int8_bytes}
    for p in (int(v) for v in args.float_from.split(",")):
        keep = [name for name, size in sizes.items() if size >= p]
        variants[f"int8, {len(keep)} convs at >= {p} px in float32"] = inference.quantize_int8(
            float_bytes, cal, keep_float=keep)
    runs = {name: inference.onnx_runner(data) for name, data in variants.items()}
    times = inference.time_interleaved({name: (lambda run=run: run(example)) for name, run in runs.items()},
                                       warmup=2, repeats=args.repeats, devices=[torch.device("cpu")])
    base = statistics.median(times["float32"])
    print(f"{args.model} at {args.size} px, batch {args.batch}, onnxruntime, median of {args.repeats} interleaved rounds:")
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"  {name}: {ms:.1f} ms ({base / ms:.2f}x float32)")


if __name__ == "__main__":
    main()
