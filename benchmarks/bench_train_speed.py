"""Training speed on this machine: one SGD step per precision / memory layout, interleaved.

For each model file (an original and a decomposed one, e.g. the demo's), each image size and
each variant -- ``fp32`` (float32, NCHW: how the tool trained before), ``bf16`` (CPU autocast to
bfloat16), ``bf16+cl`` (autocast and channels_last), ``fp32+cl``, and on request the
``torch.compile`` ones (``fp32+compile``, ``bf16+cl+compile``) -- one SGD step of batch
``--batch`` (forward, loss, backward, update) is timed; the variants take turns round after round
(after ``--warmup`` untimed steps each) so that a busy spell of the machine hits them alike, and the
median is reported with the speed-up over ``fp32``.  Run it alone: a second process on 2 cores
stalls OpenMP, and the issue measured bf16 + channels_last *slower* than float32 under load.

    python benchmarks/bench_train_speed.py --models runs/demo/model,runs/demo/decomposed_model \\
        --sizes 64,224 --rounds 5,3 --json benchmarks/results/train_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
import runtime  # noqa: E402

# name: (autocast dtype or None, channels_last, torch.compile)
VARIANTS = {"fp32": (None, False, False), "bf16": (torch.bfloat16, False, False),
            "bf16+cl": (torch.bfloat16, True, False), "fp32+cl": (None, True, False),
            "fp32+compile": (None, False, True), "bf16+cl+compile": (torch.bfloat16, True, True)}
DEFAULT_VARIANTS = "fp32,bf16,bf16+cl,fp32+cl"  # the compile ones on request: minutes of compiling


def make_step(model: nn.Module, dtype: torch.dtype | None, channels_last: bool, compile_: bool, batch: int,
              size: int):
    """A closure running one SGD step of ``model`` (a private copy, in the variant's layout;
    compiled with inductor's default mode when ``compile_``: the first call compiles)."""
    import copy

    net = copy.deepcopy(model).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    if compile_:
        net = torch.compile(net)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=fmt)
    classes = net(inputs[:1]).shape[1]
    targets = torch.randint(0, classes, (batch,), generator=gen)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-5, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = criterion(net(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="runs/demo/model,runs/demo/decomposed_model")
    p.add_argument("--sizes", default="64,224")
    p.add_argument("--rounds", default="5,3", help="timed rounds per size (comma-separated, one per size)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"any of {', '.join(VARIANTS)}")
    p.add_argument("--json", help="write the medians here")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rounds = [int(r) for r in args.rounds.split(",")]
    rounds += [rounds[-1]] * (len(sizes) - len(rounds))
    results = []
    print(f"threads {torch.get_num_threads()}, avx512_bf16 {torch.cpu._is_avx512_bf16_supported()}, "
          f"amx {torch.cpu._is_amx_tile_supported()}", flush=True)
    for path in args.models.split(","):
        model, meta = models.load_model(path)
        for size, count in zip(sizes, rounds):
            steps = {v: make_step(model, *VARIANTS[v], args.batch, size) for v in args.variants.split(",")}
            first_step_s = {}
            for name, step in steps.items():
                for i in range(args.warmup):
                    start = time.perf_counter()
                    step()
                    if i == 0:
                        first_step_s[name] = time.perf_counter() - start  # compiling, for the compile ones
            times: dict[str, list[float]] = {v: [] for v in steps}
            for _ in range(count):
                for name, step in steps.items():
                    start = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - start)
            base = statistics.median(times["fp32"]) if "fp32" in times else None
            for name, values in times.items():
                median = statistics.median(values)
                row = {"model": path, "arch": meta["arch"], "size": size, "batch": args.batch, "variant": name,
                       "median_s": median, "images_per_s": args.batch / median,
                       "speedup": base / median if base else None, "rounds": count,
                       "first_step_s": first_step_s.get(name)}
                results.append(row)
                print(f"{path} {size}px {name:8s} {1000 * median:8.0f} ms/step  {args.batch / median:6.1f} img/s"
                      + (f"  {base / median:.2f}x" if base else "")
                      + (f"  (first step {first_step_s[name]:.1f} s)" if name in first_step_s else ""), flush=True)
            del steps
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "rows": results}, f, indent=1)


if __name__ == "__main__":
    runtime.seed_everything(0)
    main()
