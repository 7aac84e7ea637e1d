"""Architectures, decomposition of whole models, and safe model files."""

import os
import pickle
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

import models
import report
from conftest import decompose
from errors import UserError

SMALL = {"vgg16": 32, "vgg16_bn": 32, "vgg19": 32, "alexnet": 63}


# CP through whole models (Tucker-2 and SVD across the architectures: test_archs.py), with and
# without BatchNorm; the VGG builds are the slow part.
@pytest.mark.parametrize("arch,method", [("vgg16_bn", "cp"), ("alexnet", "cp")])
def test_archs_decompose_train_and_shrink(arch, method):
    torch.manual_seed(0)
    model = models.build_model(arch, 3, weights="none")
    size = SMALL[arch]
    assert model.classifier[-1].out_features == 3
    before_params = report.count_params(model)
    before_macs = report.count_macs(model, (3, size, size))
    convs = sum(isinstance(m, nn.Conv2d) for m in model.features)
    rows = decompose(model, (3, size, size), conv=method, fc="svd", rank_ratio=0.25, fc_rank=64, cp_max_iter=5)
    assert [r.kind for r in rows].count("conv") == convs
    assert report.count_params(model) < before_params
    assert report.count_macs(model, (3, size, size)) < before_macs
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_image_size_too_small_is_a_user_error():
    for arch, size in models.MIN_IMAGE_SIZE.items():
        models.check_image_size(arch, size)
        with pytest.raises(UserError, match="too small"):
            models.check_image_size(arch, size - 1)
    # The limits are real: one pixel less breaks the forward pass.
    with pytest.raises(RuntimeError):
        models.build_model("alexnet", 2).features(torch.zeros(1, 3, 62, 62))
    models.build_model("alexnet", 2).features(torch.zeros(1, 3, 63, 63))


def test_weights_file_with_another_head_loads_without_it(tmp_path):
    """A state_dict fine-tuned on 10 classes (or saved from DataParallel, keys "module.*") is a
    start like an ImageNet one: the head is replaced anyway, so it is the one thing not loaded."""
    torch.manual_seed(2)
    source = torchvision.models.resnet18(weights=None)
    source.fc = nn.Linear(512, 10)
    path = tmp_path / "r18_10.pth"
    torch.save(source.state_dict(), path)
    model, pretrained = models.build_pretrained("resnet18", 3, weights=str(path))
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert torch.equal(model.bn1.running_var, source.bn1.running_var)
    assert model.fc.out_features == 3 and "fc.weight" not in pretrained and "conv1.weight" in pretrained
    parallel = tmp_path / "dp.pth"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, parallel)
    assert torch.equal(models.build_model("resnet18", 3, weights=str(parallel)).conv1.weight, source.conv1.weight)


def test_weights_file_head_is_never_loaded(tmp_path):
    """The head is replaced after loading: a file's head without a bias, or with NaN, does not matter."""
    torch.manual_seed(3)
    source = torchvision.models.resnet18(weights=None)
    source.fc = nn.Linear(512, 10, bias=False)
    state = source.state_dict()
    state["fc.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "head.pth")
    model = models.build_model("resnet18", 2, weights=str(tmp_path / "head.pth"))
    assert torch.equal(model.conv1.weight, source.conv1.weight) and bool(torch.isfinite(model.fc.weight).all())


def test_weights_file_of_another_arch_or_with_nan_is_one_short_line(tmp_path):
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), tmp_path / "alexnet.pth")
    with pytest.raises(UserError) as info:
        models.build_model("resnet18", 2, weights=str(tmp_path / "alexnet.pth"))
    message = str(info.value)
    assert "not a state_dict of resnet18: 100 of resnet18's tensors missing (conv1.weight" in message
    assert "16 tensors resnet18 does not have (features.0.weight" in message and len(message) < 400
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(UserError, match="nan.pth: layer1.0.conv1.weight holds NaN or infinite values"):
        models.build_model("resnet18", 2, weights=str(tmp_path / "nan.pth"))
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = state["conv1.weight"][:32]
    torch.save(state, tmp_path / "narrow.pth")
    with pytest.raises(UserError, match=r"1 of another shape \(conv1.weight: \[32, 3, 7, 7\] in the file, "
                                        r"\[64, 3, 7, 7\] in resnet18\)"):
        models.build_model("resnet18", 2, weights=str(tmp_path / "narrow.pth"))


def test_unknown_arch():
    with pytest.raises(UserError, match="unknown architecture 'resnet5000'.*vgg16.*list_models"):
        models.build_model("resnet5000", 2)
    assert "resnet50" in models.available_archs() and "densenet121" in models.available_archs()


def test_weights_file_and_offline_default(tmp_path, monkeypatch):
    torch.manual_seed(1)
    imagenet = models.torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(imagenet.state_dict(), path)
    model = models.build_model("alexnet", 2, weights=str(path))
    assert torch.equal(model.features[0].weight, imagenet.features[0].weight)
    assert model.classifier[-1].out_features == 2  # head replaced after loading
    torch.save(models.torchvision.models.vgg16(weights=None).features.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="not a state_dict of alexnet"):
        models.build_model("alexnet", 2, weights=str(tmp_path / "wrong.pth"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(models.torchvision.models.AlexNet_Weights.IMAGENET1K_V1.__class__, "get_state_dict",
                        offline)
    with pytest.raises(UserError, match="could not download.*--weights none"):
        models.build_model("alexnet", 2, weights="DEFAULT")
    with pytest.raises(UserError, match="neither"):
        models.build_model("alexnet", 2, weights="IMAGENET9K")


@pytest.fixture(scope="module")
def decomposed_alexnet():
    torch.manual_seed(2)
    model = models.build_model("alexnet", 2)
    decompose(model, (3, 63, 63), fc="svd", rank_ratio=0.25, fc_rank=32)
    decompose(model, (3, 63, 63), conv="none", fc="diagonal", keep_last_linear=False)
    return model


def test_save_load_round_trip(tmp_path, decomposed_alexnet):
    path = str(tmp_path / "m")
    models.save_model(path, decomposed_alexnet, arch="alexnet", classes=["a", "b"], image_size=63,
                      meta={"note": "x"})
    # A model file gets the usual permissions of a new file (not the temporary file's 0o600).
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    payload = torch.load(path, weights_only=True)
    assert set(models.REQUIRED_KEYS) <= set(payload) and payload["meta"] == {"note": "x"}
    assert payload["plan"]["features.3"]["method"] == "tucker"
    assert payload["plan"]["classifier.6"]["method"] == "diagonal"
    loaded, info = models.load_model(path)
    assert info["classes"] == ["a", "b"] and info["image_size"] == 63
    x = torch.randn(2, 3, 63, 63)
    decomposed_alexnet.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), decomposed_alexnet(x))
    assert not [f for f in os.listdir(tmp_path) if f != "m"]  # no temp file left


def test_save_refuses_non_finite_and_leaves_old_file(tmp_path):
    model = models.build_model("alexnet", 2)
    path = tmp_path / "m"
    path.write_bytes(b"old")
    with torch.no_grad():
        model.classifier[-1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        models.save_model(str(path), model, arch="alexnet", classes=["a", "b"], image_size=63)
    assert path.read_bytes() == b"old"


def test_interrupted_save_leaves_no_half_file(tmp_path, monkeypatch):
    model = models.build_model("alexnet", 2)
    path = tmp_path / "m"
    path.write_bytes(b"old")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        models.save_model(str(path), model, arch="alexnet", classes=["a", "b"], image_size=63)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["m"]


class Payload:
    """Unpickling this would create a marker file: pickled code must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_refuses_bad_files(tmp_path, decomposed_alexnet):
    with pytest.raises(UserError, match="does not exist"):
        models.load_model(str(tmp_path / "nope"))
    good = str(tmp_path / "good")
    models.save_model(good, decomposed_alexnet, arch="alexnet", classes=["a", "b"], image_size=63)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(open(good, "rb").read()[: 10_000])
    with pytest.raises(UserError, match="truncated or not a model file"):
        models.load_model(str(truncated))
    text = tmp_path / "text"
    text.write_text("hello")
    with pytest.raises(UserError, match="is neither a zip archive nor a pickle, not a PyTorch file"):
        models.load_model(str(text))
    foreign = tmp_path / "foreign"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(UserError, match="not a model file of this tool"):
        models.load_model(str(foreign))
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    torch.save({"format": models.FILE_FORMAT, "x": Payload(str(marker))}, evil)
    with pytest.raises(UserError, match="refused"):
        models.load_model(str(evil))
    assert not marker.exists()
    module_file = tmp_path / "module"
    torch.save(nn.Linear(2, 2), module_file)  # a pickled module, as old tools saved
    with pytest.raises(UserError, match="refused"):
        models.load_model(str(module_file))
    with open(tmp_path / "raw_pickle", "wb") as fh:
        pickle.dump(Payload(str(marker)), fh)
    with pytest.raises(UserError):
        models.load_model(str(tmp_path / "raw_pickle"))
    assert not marker.exists()


def test_load_refuses_mismatched_state(tmp_path, decomposed_alexnet):
    good = str(tmp_path / "good")
    models.save_model(good, decomposed_alexnet, arch="alexnet", classes=["a", "b"], image_size=63)
    payload = torch.load(good, weights_only=True)
    payload["plan"]["features.3"]["ranks"] = [5, 5]
    torch.save(payload, tmp_path / "bad_plan")
    with pytest.raises(UserError, match="does not match"):
        models.load_model(str(tmp_path / "bad_plan"))
    payload = torch.load(good, weights_only=True)
    payload["arch"] = "vgg99"
    torch.save(payload, tmp_path / "bad_arch")
    with pytest.raises(UserError, match="unknown architecture"):
        models.load_model(str(tmp_path / "bad_arch"))
    payload = torch.load(good, weights_only=True)
    del payload["state_dict"]
    torch.save(payload, tmp_path / "no_state")
    with pytest.raises(UserError, match="lacks state_dict"):
        models.load_model(str(tmp_path / "no_state"))


# ------------------------------------------------------------------ any torchvision CNN
def test_the_size_search_finds_the_tabled_minimums():
    # The table was worked out by hand from the pooling stages; the search must agree.
    for arch, size in models.MIN_IMAGE_SIZE.items():
        assert models.search_min_image_size(arch) == size, arch


@pytest.mark.parametrize("arch,head", [("resnet18", "fc"), ("densenet121", "classifier"),
                                       ("mobilenet_v2", "classifier.1"), ("efficientnet_b0", "classifier.1"),
                                       ("regnet_x_400mf", "fc"), ("vit_b_16", "heads.head"),
                                       ("vgg16", "classifier.6"), ("alexnet", "classifier.6")])
def test_the_head_is_the_last_linear_wherever_it_sits(arch, head):
    model = models.build_model(arch, 3)
    assert models.head_name(model) == head
    assert model.get_submodule(head).out_features == 3
    frozen = {id(p) for p in models.feature_parameters(model)}
    trainable = [n for n, p in model.named_parameters() if id(p) not in frozen]
    if arch in models.ARCHS:  # --freeze_features trains VGG's and AlexNet's three FC layers, as it always did
        hidden = (1, 4, 6) if arch == "alexnet" else (0, 3, 6)  # AlexNet's classifier starts with a Dropout
        assert trainable == [f"classifier.{i}.{k}" for i in hidden for k in ("weight", "bias")]
    else:  # ... and another arch's classifier block or head
        assert trainable == [f"{head}.weight", f"{head}.bias"]


def test_onnx_or_keras_weights_for_an_arch_importers_do_not_know_are_refused(tmp_path):
    path = tmp_path / "net.onnx"
    path.write_bytes(b"\x08\x07 not read")
    with pytest.raises(UserError, match="VGG and AlexNet conv stacks only.*not resnet18"):
        models.build_pretrained("resnet18", 2, weights=str(path))


def test_archs_without_a_linear_head_or_of_fixed_size_are_refused_with_one_line():
    with pytest.raises(UserError, match="no Linear classifier"):
        models.build_model("squeezenet1_0", 2)
    assert models.min_image_size("vit_b_16") == 224
    with pytest.raises(UserError, match="vit_b_16 does not take 256 px"):
        models.check_image_size("vit_b_16", 256)
    models.check_image_size("resnet18", 32)


def test_a_checkpoint_whose_options_are_not_plain_values_is_refused(tmp_path):
    """The run's options in a checkpoint are compared as plain values: a tensor there (a crafted
    or foreign file) is a difference named in one line, not an ambiguous-truth-value crash."""
    from finetune import CHECKPOINT_FORMAT

    path = str(tmp_path / "model.ckpt")
    models.save_checkpoint(path, {"format": CHECKPOINT_FORMAT}, config={"lr": torch.tensor([0.1, 0.2]), "seed": 0})
    with pytest.raises(UserError, match="is from a run with other options .*lr"):
        models.load_checkpoint(path, config={"lr": 0.1, "seed": 0})
    models.save_checkpoint(path, {"format": CHECKPOINT_FORMAT}, config={"lr": 0.1, "seed": 0})
    assert models.load_checkpoint(path, config={"lr": 0.1, "seed": 0})["config"] == {"lr": 0.1, "seed": 0}


def test_a_checkpoint_option_written_only_when_on_must_match_too(tmp_path):
    """cpu_bf16 / rate_probe are written only when on: a bfloat16 run's checkpoint resumed with
    --cpu_bf16 off (a config without the key) is another run, not silently the same one."""
    from finetune import CHECKPOINT_FORMAT

    path = str(tmp_path / "model.ckpt")
    models.save_checkpoint(path, {"format": CHECKPOINT_FORMAT}, config={"lr": 0.1, "cpu_bf16": True})
    with pytest.raises(UserError, match="other options \\(cpu_bf16 True there, None here\\)"):
        models.load_checkpoint(path, config={"lr": 0.1})
    assert models.load_checkpoint(path, config={"lr": 0.1, "cpu_bf16": True})["config"]["cpu_bf16"] is True


def test_a_state_dict_without_num_batches_tracked_loads(tmp_path):
    """Files from before BatchNorm counted its batches lack num_batches_tracked (with or without
    the version metadata that tells BatchNorm to fill it in)."""
    state = torchvision.models.resnet18(weights=None).state_dict()   # an OrderedDict with _metadata
    for key in [k for k in state if k.endswith("num_batches_tracked")]:
        del state[key]
    torch.save(state, tmp_path / "old.pth")
    model = models.build_model("resnet18", 2, weights=str(tmp_path / "old.pth"))
    assert torch.equal(model.layer1[0].bn1.running_mean, state["layer1.0.bn1.running_mean"])


@pytest.mark.parametrize("batch_first", [True, False])
def test_macs_of_attention_count_its_functional_projections(batch_first):
    """nn.MultiheadAttention computes with its weights in functional calls (no Linear forward for a
    hook): its q, k, v and output projections (E^2 MACs per token each) and its two L x L
    products are counted.  (torch's FlopCounterMode is no reference here: it misses the fused
    fast path that eval-mode attention takes.)"""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 32, 2, stride=2)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
            self.fc = nn.Linear(32, 2)

        def forward(self, x):
            tokens = self.conv(x).flatten(2).transpose(1, 2)          # (N, L, E)
            tokens = tokens if batch_first else tokens.transpose(0, 1)
            out = self.attn(tokens, tokens, tokens, need_weights=False)[0]
            return self.fc(out.mean(1 if batch_first else 0))

    tokens, embed = 64, 32                                              # 8 x 8 positions of 32 channels
    conv, fc = tokens * embed * 3 * 2 * 2, embed * 2
    attention = 4 * tokens * embed * embed + 2 * tokens * tokens * embed
    assert report.count_macs(Net().eval(), (3, 16, 16)) == conv + attention + fc


def test_macs_of_products_outside_any_layer_are_counted_once():
    """A product in a forward function (Swin's and MaxViT's attention: ``q @ k.T``) has no module
    to hook: it is counted from the operator, and a counted layer's own operators are not counted
    a second time."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.mix = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            y = self.conv(x).flatten(2).transpose(1, 2)                 # (N, 16, 8)
            attn = y @ y.transpose(1, 2)                                # (N, 16, 16): 16 * 16 * 8
            return (attn @ y) @ self.mix                                # 16 * 8 * 16, then 16 * 8 * 8

    conv = 16 * 8 * 3 * 3 * 3
    assert report.count_macs(Net().eval(), (3, 4, 4)) == conv + 16 * 16 * 8 + 16 * 8 * 16 + 16 * 8 * 8


@pytest.mark.parametrize("arch, weights", [("swin_t", "Swin_T_Weights"), ("maxvit_t", "MaxVit_T_Weights")])
def test_macs_of_window_attention_match_torchvision_published_figure(arch, weights):
    """torchvision's weights metadata gives each model's GFLOPS (multiply-adds) at 224 px:
    4.491 for Swin-T and 5.558 for MaxViT-T, of which 1.5 / 0.2 are attention products
    computed in forward functions (the hooks alone counted 2.963 / 5.381)."""
    published = getattr(torchvision.models, weights).IMAGENET1K_V1.meta["_ops"]
    model = getattr(torchvision.models, arch)(weights=None).eval()
    assert report.count_macs(model, (3, 224, 224)) / 1e9 == pytest.approx(published, abs=0.001)
