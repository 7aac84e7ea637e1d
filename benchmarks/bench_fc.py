"""Fully connected layers at equal parameter counts: truncated SVD vs the wrapped banded diagonal.

The FC layers of a trained network (every Linear but the last, the classifier) are
compressed three ways, each to the same number of weights per layer:

(a) ``svd``: truncated SVD (:func:`decompositions.svd_decompose_linear`) at the rank
    whose ``rank * (M + N)`` weights equal the diagonal layer's ``max(M, N) * b``;
(b) ``diagonal, projection``: :func:`decompositions.diagonal_decompose_linear` of the
    trained dense layers (keeps the entries on the structure, drops the rest);
(b') ``diagonal, projection + rescale``: :func:`diagonal.project_to_masks`, the same
    projection with each output row's on-structure entries scaled up to keep the
    row's norm, then the conversion;
(c) ``diagonal, annealed``: :func:`diagonal.anneal_to_masks` for ``--anneal-epochs``
    (off-structure weights fade out, with the same row-norm rescale, while the whole
    network trains), then the same conversion, which is exact by then.

Each is then fine-tuned for ``--finetune-epochs`` with the same recipe
(:func:`finetune.fit`, same learning rate and data order). Since (c) trains
``--anneal-epochs`` more than the others, SVD (and with ``--budget-control all``
the plain projection) is also run with ``anneal + finetune`` epochs of fine-tuning
("equal budget"), so that a gain of (c) is not just more training. The test
accuracy is reported right after compression and after fine-tuning, with the FC
and total parameter counts.

Workload (defaults, chosen to train to a useful accuracy within a few CPU minutes):
the two-class Fashion-MNIST folder (T-shirt/top vs Shirt, 1000 + 1000 images per
class, built by ``benchmarks/make_fashion_mnist.py`` when missing), AlexNet from
scratch (``models.build_model("alexnet", 2, weights="none")``) at 63 px, the
smallest input AlexNet takes: its FC layers are 9216->4096->4096->2, 54.5M of its
57M weights. Training uses the project's preprocessing
(:func:`dataset.build_transforms`) with random horizontal flips as the only
augmentation: the default random resized crops (area >= 35%) cut the telling parts
of 28 px garments away and cost about 2 points of accuracy at this budget. The
default bandwidth 26 makes the parameter counts exactly equal for AlexNet
(9216 * 26 = 18 * (9216 + 4096) and 4096 * 26 = 13 * (4096 + 4096)).

Usage::

    python benchmarks/bench_fc.py [--data DIR] [--quick] [--json OUT] [--markdown OUT]
        [--bandwidth B] [--epochs N] [--anneal-epochs N] [--finetune-epochs N]
        [--lr LR] [--finetune-lr LR] [--batch-size N] [--threads N] [--device DEV]
        [--budget-control {svd,all,none}] [--no-rescale]

``--quick`` runs one epoch of everything (a smoke test; the accuracies then mean
nothing).

References
----------
.. [1] R. Girshick, "Fast R-CNN", ICCV 2015 (truncated SVD of FC layers).
.. [2] M. Zhu and S. Gupta, "To prune, or not to prune: exploring the efficacy of
   pruning for model compression", arXiv:1710.01878, 2017 (gradual mask schedules).
.. [3] H. Xiao, K. Rasul and R. Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
   Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torchvision import transforms

# Run as ``python benchmarks/bench_fc.py``: the project modules live one level up.
REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import dataset  # noqa: E402
import decompositions  # noqa: E402
import diagonal  # noqa: E402
import finetune  # noqa: E402
import runtime  # noqa: E402
import ranks  # noqa: E402
import make_fashion_mnist  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402
from errors import UserError  # noqa: E402

logger = logging.getLogger("bench_fc")

DEFAULT_DATA = REPO_ROOT / "data" / "fashion-mnist-shirt"
# How the default folder is built when it is missing (see make_fashion_mnist.py).
DATA_PER_CLASS = 1000
DATA_SEED = 0
ARCH = "alexnet"
IMAGE_SIZE = 63
# 26 gives exactly equal SVD ranks for AlexNet's 9216->4096 and 4096->4096 layers.
BANDWIDTH = 26
BATCH_SIZE = 64
EPOCHS = 10              # dense training from scratch
LR = 0.05
ANNEAL_EPOCHS = 3
FINETUNE_EPOCHS = 3
FINETUNE_LR = 0.01
SEED = 0
QUICK_EPOCHS = 1


# ------------------------------------------------------------------------- data
def ensure_data(path: Path, *, source: Path) -> tuple[Path, Path]:
    """``(train_dir, test_dir)`` of ``path``, building the Fashion-MNIST folder if missing."""
    train_dir, test_dir = path / "train", path / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        return train_dir, test_dir
    if path.exists() and any(path.iterdir()):
        raise UserError(f"{path} exists but has no train/ and test/ class folders")
    if not source.is_dir():
        raise UserError(
            f"{path} is missing and so is the Fashion-MNIST source {source} to build it from: "
            f"{make_fashion_mnist.APT_HINT}, or pass --data DIR with train/ and test/ class folders"
        )
    logger.info("building %s from %s (%d images per class and split, seed %d)",
                path, source, DATA_PER_CLASS, DATA_SEED)
    make_fashion_mnist.make_fashion_mnist(path, source=source, train_per_class=DATA_PER_CLASS,
                                          test_per_class=DATA_PER_CLASS, seed=DATA_SEED)
    return train_dir, test_dir


def build_data(train_dir: Path, test_dir: Path, *, image_size: int) -> tuple:
    """Train and test datasets: the project's test preprocessing, plus flips for training."""
    train_ds, test_ds, classes = dataset.build_datasets(train_dir, test_dir, image_size=image_size)
    train_ds.transform = transforms.Compose(
        [transforms.RandomHorizontalFlip(), dataset.build_transforms(image_size, train=False)]
    )
    return train_ds, test_ds, classes


# ----------------------------------------------------------------------- models
def compressed_fc_names(model: nn.Module) -> list[str]:
    """Qualified names of the Linear layers to compress: all but the last (the classifier)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[:-1]


def matched_svd_rank(layer: nn.Linear, bandwidth: int) -> int:
    """SVD rank whose ``r (M + N)`` weights are closest to the diagonal layer's ``max(M, N) b``."""
    band = min(bandwidth, layer.in_features)
    return ranks.svd_rank_for_params(layer, max(layer.in_features, layer.out_features) * band)


def fc_params(model: nn.Module, names: Sequence[str]) -> int:
    """Parameters (weights and biases) of the modules now at ``names``."""
    return sum(report.count_params(model.get_submodule(name)) for name in names)


# ---------------------------------------------------------------------- running
class Runner:
    """Holds the data and settings; trains and evaluates with the same recipe every time."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        train_dir, test_dir = ensure_data(args.data, source=args.source)
        self.train_ds, self.test_ds, self.classes = build_data(train_dir, test_dir,
                                                               image_size=args.image_size)
        _, self.test_loader, _ = dataset.build_loaders(None, self.test_ds, batch_size=args.batch_size,
                                                       workers=args.workers)

    def train_loader(self):
        # A fresh loader with the same seed: every method sees the same batches.
        loader, _, _ = dataset.build_loaders(self.train_ds, None, batch_size=self.args.batch_size,
                                             workers=self.args.workers, seed=self.args.seed)
        return loader

    def fit(self, model: nn.Module, *, epochs: int, lr: float) -> list[dict]:
        runtime.seed_everything(self.args.seed)
        return finetune.fit(model, self.train_loader(), None, recipe=finetune.Recipe(epochs=epochs, lr=lr),
                            device=self.device, show_progress=self.args.progress, log=logger)

    def accuracy(self, model: nn.Module) -> float:
        return finetune.evaluate(model, self.test_loader, device=self.device,
                                 show_progress=self.args.progress)["acc"]

    def logits(self, model: nn.Module) -> torch.Tensor:
        """Test-set logits in eval mode, (N, classes), on the CPU."""
        was_training = model.training
        model.eval()
        outs = []
        with torch.inference_mode():
            for inputs, _ in self.test_loader:
                outs.append(model(inputs.to(self.device)).float().cpu())
        model.train(was_training)
        return torch.cat(outs)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = runtime.resolve_device(args.device)
    started = time.perf_counter()
    runner = Runner(args, device)
    input_size = (3, args.image_size, args.image_size)
    epochs = QUICK_EPOCHS if args.quick else args.epochs
    anneal_epochs = QUICK_EPOCHS if args.quick else args.anneal_epochs
    ft_epochs = QUICK_EPOCHS if args.quick else args.finetune_epochs

    # 1. The dense model, trained from scratch.
    runtime.seed_everything(args.seed)
    dense = models.build_model(args.arch, len(runner.classes), weights="none").to(device)
    names = compressed_fc_names(dense)
    logger.info("training dense %s for %d epochs; compressing %s", args.arch, epochs, ", ".join(names))
    t0 = time.perf_counter()
    runner.fit(dense, epochs=epochs, lr=args.lr)
    dense_acc = runner.accuracy(dense)
    dense_row = {"method": "dense (no compression)", "fc_params": fc_params(dense, names),
                 "acc_compressed": dense_acc, "acc_finetuned": None, "finetune_epochs": 0,
                 "extra_epochs": 0, "total_params": report.count_params(dense),
                 "seconds": time.perf_counter() - t0}
    logger.info("dense: test acc %.2f%%", 100 * dense_acc)

    rows = [dense_row]
    for bandwidth in args.bandwidth:
        # The two plans: SVD at the rank matched to the diagonal layer's weights, and the diagonal structure.
        svd_plan = {name: {"method": "svd", "rank": matched_svd_rank(dense.get_submodule(name), bandwidth)}
                      for name in names}
        diag_plan = ranks.plan_decomposition(
            dense, ranks.Policy(conv="none", fc="diagonal", fc_bandwidth=bandwidth), input_size)

        def compress(model: nn.Module, plan: dict) -> list[dict]:
            layer_rows = decompositions.decompose_model(model, plan, input_size=input_size)
            return [r.as_dict() for r in layer_rows if r.name in names]

        def finish(label: str, model: nn.Module, layer_rows: list[dict], *, extra: int, ft: int,
                   t_start: float, **more) -> dict:
            acc_before = runner.accuracy(model)
            runner.fit(model, epochs=ft, lr=args.finetune_lr)
            acc_after = runner.accuracy(model)
            row = {"method": label, "bandwidth": bandwidth, "fc_params": fc_params(model, names),
                   "acc_compressed": acc_before, "acc_finetuned": acc_after, "finetune_epochs": ft,
                   "extra_epochs": extra, "total_params": report.count_params(model),
                   "layers": layer_rows, "seconds": time.perf_counter() - t_start, **more}
            logger.info("%s (b=%d): FC params %d, test acc %.2f%% -> %.2f%% after %d epochs",
                        label, bandwidth, row["fc_params"], 100 * acc_before, 100 * acc_after, ft)
            return row

        budget = anneal_epochs + ft_epochs
        controlled = {"none": (), "svd": ("svd",), "all": ("svd", "diagonal, projection")}[args.budget_control]
        # (a) truncated SVD at the matched rank, (b) direct projection: same fine-tuning,
        # then again with the annealing epochs added to the fine-tuning (equal budget).
        for label, plan in (("svd", svd_plan), ("diagonal, projection", diag_plan)):
            for ft, suffix in ((ft_epochs, ""), (budget, ", equal budget")):
                if suffix and label not in controlled:
                    continue
                t_start = time.perf_counter()
                model = copy.deepcopy(dense)
                layer_rows = compress(model, plan)
                rows.append(finish(label + suffix, model, layer_rows, extra=0, ft=ft, t_start=t_start))
                del model

        # (b') projection that keeps each row's norm (the rescale of (c) at once, no
        # annealing): separates what the rescale does from what the schedule does.
        if args.rescale:
            t_start = time.perf_counter()
            model = copy.deepcopy(dense)
            diagonal.project_to_masks(model, layers=names, bandwidth=bandwidth, rescale=True)
            layer_rows = compress(model, diag_plan)
            rows.append(finish("diagonal, projection + rescale", model, layer_rows, extra=0, ft=ft_epochs,
                               t_start=t_start))
            del model

        # (c) anneal onto the structure, convert (exactly), then the same fine-tuning.
        t_start = time.perf_counter()
        model = copy.deepcopy(dense)
        runtime.seed_everything(args.seed)
        annealed = diagonal.anneal_to_masks(
            model, runner.train_loader(), layers=names, bandwidth=bandwidth, epochs=anneal_epochs,
            lr=args.finetune_lr, device=device, rescale=args.rescale, show_progress=args.progress,
            log=logger)
        annealed_acc = runner.accuracy(model)
        logits_dense = runner.logits(model)
        layer_rows = compress(model, diag_plan)
        logits_structured = runner.logits(model)
        conversion = {
            "acc_before_conversion": annealed_acc,
            "max_abs_logit_change": float((logits_structured - logits_dense).abs().max()),
            "predictions_changed": int((logits_structured.argmax(1) != logits_dense.argmax(1)).sum()),
        }
        anneal_info = {k: annealed[k] for k in ("initial_off_mass", "raw_off_mass", "off_mass", "gain",
                                                "steps", "history")}
        rows.append(finish("diagonal, annealed", model, layer_rows, extra=anneal_epochs, ft=ft_epochs,
                           t_start=t_start, conversion=conversion, anneal=anneal_info))
        del model

    figures = {
        "meta": {
            "arch": args.arch, "image_size": args.image_size, "data": str(args.data),
            "classes": runner.classes, "train_images": len(runner.train_ds),
            "test_images": len(runner.test_ds), "bandwidths": list(args.bandwidth),
            "epochs": epochs, "anneal_epochs": anneal_epochs, "finetune_epochs": ft_epochs,
            "lr": args.lr, "finetune_lr": args.finetune_lr, "batch_size": args.batch_size,
            "seed": args.seed, "quick": args.quick, "rescale": args.rescale,
            "budget_control": args.budget_control, "device": str(device),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "compressed_layers": names,
            "seconds": None,
        },
        "rows": rows,
    }
    figures["meta"]["seconds"] = time.perf_counter() - started
    figures["markdown"] = markdown_table(rows)
    return figures


# ---------------------------------------------------------------------- output
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def markdown_table(rows: Sequence[dict]) -> str:
    """The results as a Markdown table, one row per method."""
    header = ("method", "b", "FC params", "test acc after compression", "test acc after fine-tuning",
              "training after compression (epochs)", "total params")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "--:", "--:", "--:", "--:", "---",
                                                                 "--:"]) + "|"]
    for r in rows:
        if r["extra_epochs"]:
            training = f"anneal {r['extra_epochs']} + fine-tune {r['finetune_epochs']}"
        else:
            training = f"fine-tune {r['finetune_epochs']}" if r["finetune_epochs"] else "-"
        lines.append("| " + " | ".join([
            r["method"], str(r.get("bandwidth", "-")), f"{r['fc_params']:,}", _pct(r["acc_compressed"]),
            _pct(r["acc_finetuned"]), training, f"{r['total_params']:,}",
        ]) + " |")
    return "\n".join(lines)


def markdown_report(figures: dict, argv: Sequence[str]) -> str:
    """A small Markdown document: command, machine, settings, table, conversion check."""
    meta = figures["meta"]
    command = "python benchmarks/bench_fc.py " + " ".join(argv)
    lines = [
        "# FC layers at equal parameter counts: SVD vs wrapped banded diagonal",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {meta['cpus']}-core CPU ({meta['platform']}), device {meta['device']}, "
        f"{meta['threads']} torch threads, torch {meta['torch']}, Python {meta['python']}; "
        f"total runtime {meta['seconds'] / 60:.1f} min.",
        "",
        f"Setting: {meta['arch']} from scratch at {meta['image_size']} px on {meta['data']} "
        f"({meta['train_images']} train / {meta['test_images']} test images, classes "
        f"{', '.join(meta['classes'])}); dense training {meta['epochs']} epochs at lr {meta['lr']}; "
        f"compressed layers {', '.join(meta['compressed_layers'])}; annealing "
        f"{meta['anneal_epochs']} epochs and fine-tuning {meta['finetune_epochs']} epochs at lr "
        f"{meta['finetune_lr']}; batch {meta['batch_size']}, seed {meta['seed']}.",
        "",
        figures["markdown"],
        "",
    ]
    for r in figures["rows"]:
        if "conversion" in r:
            c = r["conversion"]
            lines.append(
                f"Conversion after annealing (b={r['bandwidth']}): test accuracy "
                f"{_pct(c['acc_before_conversion'])} before, {_pct(r['acc_compressed'])} after; "
                f"largest logit change {c['max_abs_logit_change']:.2e}, "
                f"{c['predictions_changed']} predictions changed. Off-structure share of the "
                f"squared weight norm before annealing: "
                + ", ".join(f"{k} {v:.1%}" for k, v in r["anneal"]["initial_off_mass"].items()) + "."
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder with train/ and test/ class folders; built from --source "
                             "with make_fashion_mnist.py when missing")
    parser.add_argument("--source", type=Path, default=make_fashion_mnist.DEFAULT_SOURCE,
                        help="Fashion-MNIST IDX files, used only to build a missing --data folder")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epoch of everything (smoke test)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write all figures to this file")
    parser.add_argument("--markdown", type=Path, default=None, metavar="OUT",
                        help="write the table with the command and machine to this file")
    parser.add_argument("--arch", default=ARCH, choices=models.ARCHS)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--bandwidth", type=int, nargs="+", default=[BANDWIDTH],
                        help="band width(s) b of the diagonal layers; SVD ranks are matched to each")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="dense training epochs")
    parser.add_argument("--lr", type=float, default=LR, help="dense training learning rate")
    parser.add_argument("--anneal-epochs", type=int, default=ANNEAL_EPOCHS)
    parser.add_argument("--finetune-epochs", type=int, default=FINETUNE_EPOCHS)
    parser.add_argument("--finetune-lr", type=float, default=FINETUNE_LR,
                        help="learning rate of annealing and of every fine-tuning")
    parser.add_argument("--budget-control", choices=("svd", "all", "none"), default="svd",
                        help="which methods are also run with anneal + finetune epochs of fine-tuning "
                             "(equal budget): svd, svd and the plain projection, or none")
    parser.add_argument("--no-rescale", dest="rescale", action="store_false",
                        help="anneal without keeping the rows' norms (diagonal.anneal_to_masks "
                             "rescale=False) and skip the rescaled projection")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--workers", type=int, default=0, help="data loader processes")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto, ...")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--progress", action="store_true", help="show tqdm bars")
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.bandwidth):
        parser.error(f"--bandwidth values must be >= 1, got {args.bandwidth}")
    for name in ("epochs", "anneal_epochs", "finetune_epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    models.check_image_size(args.arch, args.image_size)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parse_args(argv)
        figures = run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(figures["markdown"])
    print(f"\ntotal {figures['meta']['seconds']:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report.write_json(str(args.json), figures)
        print(f"wrote {args.json}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_report(figures, argv))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
