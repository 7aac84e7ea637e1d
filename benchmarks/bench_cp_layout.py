"""CP's layout against its speed: the (kh,1) and (1,kw) depthwise pair or one depthwise kh x kw.

The tool's CP layer (Lebedev et al. 2014) is four convs: 1x1 S->R, depthwise (3,1), depthwise
(1,3), 1x1 R->T.  The two depthwise convs can be one depthwise 3x3 whose kernels are their outer
products (3 convs, 9R instead of 6R MACs per pixel: under 1% more in total).  This times, on
VGG16's conv shapes with R = the channel count, batch ``--batch``, onnxruntime on this CPU,
interleaved: the dense 3x3 conv, the 4-conv and the 3-conv layout, and prints each layout's
speedup as a share of its MACs ratio (issue 20's target: 80%).

    python benchmarks/bench_cp_layout.py [--batch 8] [--repeats 7]

Time it alone: another process on the 2 cores changes every figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import inference  # noqa: E402

#: VGG16's 3x3 convs (channels, input size at 224 px), one per stage.
SHAPES = ((64, 224), (128, 112), (256, 56), (512, 28), (512, 14))


def layouts(channels: int, rank: int) -> dict[str, tuple[nn.Module, int]]:
    """Each layout and its MACs per output pixel."""
    c, r = channels, rank
    four = nn.Sequential(nn.Conv2d(c, r, 1, bias=False),
                         nn.Conv2d(r, r, (3, 1), padding=(1, 0), groups=r, bias=False),
                         nn.Conv2d(r, r, (1, 3), padding=(0, 1), groups=r, bias=False), nn.Conv2d(r, c, 1))
    three = nn.Sequential(nn.Conv2d(c, r, 1, bias=False), nn.Conv2d(r, r, 3, padding=1, groups=r, bias=False),
                          nn.Conv2d(r, c, 1))
    return {"dense": (nn.Conv2d(c, c, 3, padding=1), 9 * c * c), "cp 4 convs": (four, 2 * c * r + 6 * r),
            "cp 3 convs": (three, 2 * c * r + 9 * r)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    calls, macs = {}, {}
    for channels, size in SHAPES:
        example = torch.randn(args.batch, channels, size, size)
        for name, (module, per_pixel) in layouts(channels, channels).items():
            run = inference.onnx_runner(inference._onnx_bytes(module.eval(), example, opset=None))
            calls[(channels, size, name)] = lambda run=run, x=example: run(x)
            macs[(channels, size, name)] = per_pixel
    times = inference.time_interleaved(calls, warmup=2, repeats=args.repeats, devices=[torch.device("cpu")])
    print(f"batch {args.batch}, onnxruntime, median of {args.repeats} interleaved rounds; R = channels")
    for channels, size in SHAPES:
        dense = statistics.median(times[(channels, size, "dense")])
        row = [f"{channels} ch {size} px: dense {dense:.1f} ms"]
        for name in ("cp 4 convs", "cp 3 convs"):
            ms = statistics.median(times[(channels, size, name)])
            ratio = macs[(channels, size, "dense")] / macs[(channels, size, name)]
            row.append(f"{name} {ms:.1f} ms ({dense / ms:.2f}x at {ratio:.2f}x MACs: {100 * dense / ms / ratio:.0f}%)")
        print("; ".join(row))


if __name__ == "__main__":
    main()
