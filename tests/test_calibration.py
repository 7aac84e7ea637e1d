"""Data-aware decomposition: calibration moments, data-aware factors, BatchNorm correction, the CLI."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import calibration as C
import decompositions as D
import main
import ranks
from conftest import make_image_folder

torch.set_grad_enabled(True)


def _inputs(channels: int, *, batches: int = 6, size: int = 10, subspace: int | None = None, seed: int = 0,
            flat: bool = False) -> list[torch.Tensor]:
    """Seeded input batches; with ``subspace`` every input vector lies in a random ``subspace``-dimensional
    subspace of the channels."""
    basis = torch.randn(channels, subspace, generator=torch.Generator().manual_seed(123)) if subspace else None
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        shape = (8, subspace or channels) if flat else (4, subspace or channels, size, size)
        x = torch.randn(*shape, generator=gen)
        if basis is not None:
            x = torch.einsum("sk,bk...->bs...", basis, x)
        out.append(x + 0.5)  # a mean to refit
    return out


def _stats(layer: nn.Module, batches: list[torch.Tensor]) -> C.LayerStats:
    net = nn.Sequential(layer)
    return C.layer_stats(net, net, "0", batches)


def _output_error(layer: nn.Module, new: nn.Module, batches: list[torch.Tensor]) -> float:
    x = torch.cat(batches)
    with torch.no_grad():
        y = layer(x)
        return float((new(x) - y).norm() / y.norm())


CONV_CASES = [
    dict(in_channels=6, out_channels=9, kernel_size=3, padding=1),
    dict(in_channels=6, out_channels=9, kernel_size=3, padding=1, bias=False),
    dict(in_channels=5, out_channels=7, kernel_size=(3, 5), stride=2, padding=(1, 2)),
    dict(in_channels=6, out_channels=4, kernel_size=3, dilation=2, padding=2),
    dict(in_channels=6, out_channels=8, kernel_size=3, padding="same"),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="circular", bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=2, stride=2),
]


@pytest.mark.parametrize("cfg", CONV_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_patches_reproduce_the_conv(cfg):
    torch.manual_seed(0)
    conv = nn.Conv2d(**cfg)
    x = torch.randn(2, cfg["in_channels"], 9, 11)
    with torch.no_grad():
        y = conv(x)
        cols = C.patches(conv, x)                                   # (B*L, D)
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        flat = cols @ conv.weight.reshape(conv.out_channels, -1).T + bias
    assert torch.allclose(flat, y.permute(0, 2, 3, 1).reshape(-1, conv.out_channels), atol=1e-5)
    # a subset of rows, gathered without unfolding the rest, is those rows of the full unfold
    assert C.positions(conv, x) == len(cols)
    rows = torch.randperm(len(cols), generator=torch.Generator().manual_seed(1))[: len(cols) // 3]
    assert torch.equal(C.patches(conv, x, rows), cols[rows])


class _Doubled(nn.Sequential):
    """A Sequential whose forward is not the chain of its children: LayerInputs must not chain it."""

    def forward(self, x):
        return super().forward(x) * 2


def _nets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), _Doubled(nn.Conv2d(6, 6, 3), nn.ReLU()),
                          nn.Sequential(nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5)), nn.Conv2d(5, 4, 3))
    return {
        "nested": nn.Sequential(block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)),
        "resnet18": __import__("torchvision").models.resnet18(num_classes=3),
    }


@pytest.mark.parametrize("arch", ["nested", "resnet18"])
@pytest.mark.parametrize("max_bytes", [C.CACHE_BYTES, 0])
def test_layer_inputs_follow_a_forward_order_decomposition(arch, max_bytes):
    """LayerInputs gives every layer the input a full forward pass gives it, also after the layers
    before it were replaced (as decompose_model does, in forward order), and does not run the
    network from the images for every layer when it may keep inputs."""
    model = _nets()[arch].eval()
    batches = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    first = model.get_submodule(layers[0])
    calls = []
    first.register_forward_hook(lambda *_: calls.append(1))
    cache = C.LayerInputs(model, batches, max_bytes=max_bytes)
    with torch.no_grad():
        for name in layers:
            got = list(cache(name))
            calls_before = len(calls)
            want = [C._capture(model, name, x) for x in batches]
            calls[calls_before:] = []  # the reference passes do not count
            assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), name
            # replace the layer by a different one, as a decomposition would
            layer = model.get_submodule(name)
            new = copy.deepcopy(layer)
            new.weight.mul_(0.5)
            D.replace_layer(model, name, new)
    # The first layer's input is the images; without kept inputs it runs again for every later
    # layer, with them once per chain entered from the images (nested: the block, then the head).
    runs = len(calls) / len(batches)
    if not max_bytes:
        assert runs == len(layers) - 1
    else:
        assert runs == 2 if arch == "nested" else runs <= 6  # resnet18: once per stage and for fc



def test_layer_inputs_recompute_after_an_earlier_layer_changes():
    """Kept inputs are reused only while the modules that computed them are unchanged."""
    model = _nets()["nested"].eval()
    batches = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cache = C.LayerInputs(model, batches)
    with torch.no_grad():
        before = list(cache("0.4"))
        D.replace_layer(model, "0.0", nn.Conv2d(3, 6, 3, padding=1))  # out of forward order
        got = list(cache("0.4"))
        want = [C._capture(model, "0.4", x) for x in batches]
    assert not torch.equal(before[0], want[0])
    assert all(torch.equal(a, b) for a, b in zip(got, want))

class _Looped(nn.Module):
    """A model whose forward loops over an ``nn.Sequential``'s children instead of calling it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 14 * 14, 3))

    def forward(self, x):
        for module in self.features:
            x = module(x)
        return self.head(x)


def _unchained_nets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"looped": _Looped(),
            # A block that begins in place: it must not change inputs kept for the next layer.
            "in-place": nn.Sequential(nn.Conv2d(3, 6, 3, padding=1),
                                      nn.Sequential(nn.LeakyReLU(0.1, inplace=True), nn.Conv2d(6, 6, 3)),
                                      nn.LeakyReLU(0.1, inplace=True), nn.Conv2d(6, 4, 3))}


@pytest.mark.parametrize("arch", ["looped", "in-place"])
def test_layer_inputs_of_unchained_and_in_place_networks(arch):
    """A Sequential the forward does not call as a whole (its children looped over) and blocks
    that begin in place: every layer still gets a full forward pass's input, and the
    calibration batches are left as they were."""
    model = _unchained_nets()[arch].eval()
    batches = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    saved = [b.clone() for b in batches]
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    cache = C.LayerInputs(model, batches)
    with torch.no_grad():
        got = {name: [t.clone() for t in cache(name)] for name in layers}
        want = {name: [C._capture(model, name, x.clone()) for x in saved] for name in layers}
    for name in layers:
        assert all(torch.equal(a, b) for a, b in zip(got[name], want[name], strict=True)), name
    assert all(torch.equal(a, b) for a, b in zip(batches, saved))


def test_a_looped_sequential_is_decomposed_on_data():
    model = _unchained_nets()["looped"].eval()
    batches = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    plan = {"features.2": {"method": "tucker", "ranks": [4, 4]}}
    rows = D.decompose_model(model, plan, input_size=(3, 16, 16), calibration=batches)
    assert isinstance(model.features[2], D.TuckerConv2d), rows
    assert "data-free" not in (rows[0].reason or "")
    assert not any(m.training for m in model.modules())  # the replacement in the model's eval mode


def test_samples_are_counted_at_the_calibration_images_size():
    """The plan's input_size gives the MACs; whether a layer has enough samples for its moments
    is counted on the calibration images as they are (here 16 px against a 4 px plan)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).eval()
    batches = [torch.randn(2, 3, 16, 16)]   # 2 images x 14x14 positions; at 4 px only 2x2 each
    rows = D.decompose_model(model, {"2": {"method": "tucker", "ranks": [8, 8]}}, input_size=(3, 4, 4),
                             calibration=batches)
    assert isinstance(model[2], D.TuckerConv2d) and "data-free" not in (rows[0].reason or ""), rows[0].reason


def test_layer_stats_hands_the_original_outputs_on_to_the_next_layer(monkeypatch):
    """The conv response layer_stats computes becomes the kept input of the next layer (the conv
    does not run again in the original), and the data-aware decomposition is the same as when
    every layer's input is computed by the network itself."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1),
                             nn.ReLU(inplace=True), nn.Conv2d(8, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(6, 3)).eval()

    batches = [torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    plan = {"2": {"method": "tucker", "ranks": [3, 3]}, "4": {"method": "tucker", "ranks": [4, 3]}}
    calls: list[str] = []
    aware = net()
    D.decompose_model(aware, plan, input_size=(3, 10, 10), calibration=batches)
    monkeypatch.setattr(C.LayerInputs, "known_outputs", lambda *args: calls.append("skipped"))
    reference = net()
    D.decompose_model(reference, plan, input_size=(3, 10, 10), calibration=batches)
    assert calls == ["skipped"] * 2  # once per layer: its responses (the second look)
    for a, b in zip(aware.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    monkeypatch.undo()
    # On its own: after the responses of "2", the inputs of "4" come without running "2" again.
    model, runs = net(), []
    model[2].register_forward_hook(lambda *_: runs.append(1))
    cache = C.LayerInputs(model, batches)
    with torch.no_grad():
        outputs = [model[2](x) for x in cache("2")]
        cache.known_outputs("2", outputs[:2])  # one batch short: ignored
        cache.known_outputs("2", outputs)
        runs.clear()
        got = list(cache("4"))
    assert not runs and len(got) == len(batches)
    assert all(torch.equal(a, C._capture(model, "4", x)) for a, x in zip(got, batches))


def _data(layer: nn.Module, batches: list[torch.Tensor]) -> C.LayerData:
    net = nn.Sequential(layer)
    return C.LayerData(net, net, "0", batches)


@pytest.mark.parametrize("path", ["moments", "two looks"])
@pytest.mark.parametrize("cfg", CONV_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_data_aware_tucker_at_full_rank_reproduces_the_conv(cfg, path):
    """Both fits are exact at full rank for every geometry: the full patch moments (stats=), and
    the fit decompose_model makes (data=: channel moments, then the core's inputs; the 1x1 input
    factor commutes with each padding mode)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(**cfg)
    batches = _inputs(cfg["in_channels"])
    source = {"stats": _stats(conv, batches)} if path == "moments" else {"data": _data(conv, batches)}
    new = D.tucker_decompose_conv(conv, (conv.out_channels, conv.in_channels), **source)
    assert _output_error(conv, new, batches) < 1e-4
    # and on inputs it never saw
    assert _output_error(conv, new, _inputs(cfg["in_channels"], seed=1)) < 1e-4


@pytest.mark.parametrize("bias", [True, False])
def test_channel_stats_are_the_patch_moments_diagonal_blocks(monkeypatch, bias):
    """channel_stats equals the average of the S x S diagonal blocks of layer_stats' patch moment
    (the input-channel metric the full-moment fit uses), centered or not, when both see every
    position; with the default budget it takes at most MAX_SAMPLES_PER_DIM samples per channel."""
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=bias)
    batches = _inputs(5, seed=3)
    net = nn.Sequential(conv)
    # 5 channels, 9 offsets: one position's samples cover a channel's budget 9/5 times over.
    assert C.channel_stats(net, "0", batches).n == 6 * 9 * -(-C.MAX_SAMPLES_PER_DIM // 6) < 9 * 6 * 4 * 100
    monkeypatch.setattr(C, "MAX_SAMPLES_PER_DIM", 10 ** 6)
    full, chan = C.layer_stats(net, net, "0", batches), C.channel_stats(net, "0", batches)
    for centered in (True, False):
        blocks = torch.einsum("akbk->ab", full.moments(False)[0].reshape(5, 9, 5, 9)) / 9
        if centered:  # the mean pooled over the offsets, not each offset's own
            blocks = blocks - torch.outer(chan.mean_hat, chan.mean_hat)
        assert torch.allclose(chan.moments(centered)[0], blocks, atol=1e-4 * float(blocks.abs().max()))  # float32 sums
    assert chan.n == 9 * full.n == 9 * 6 * 4 * 100 and chan.cross_y.shape == (0, 5)


def test_two_look_tucker_without_alternation_is_the_full_moment_fit(monkeypatch):
    """With every position sampled, without shrinkage (each path estimates its own) and without
    alternation, the two-look fit and the full-moment fit are the same computation: the same input
    subspace, the same layer up to float rounding.  (Without a bias: centered, the channel moment
    subtracts the mean pooled over the kernel offsets, not each offset's.)"""
    monkeypatch.setattr(C, "MAX_SAMPLES_PER_DIM", 10 ** 6)
    monkeypatch.setattr(C.LayerStats, "shrinkage", lambda self, centered, target=None: 0.0)
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1, bias=False)
    batches = _inputs(6, batches=12, size=12)
    full = D.tucker_decompose_conv(conv, (5, 3), n_iter=0, stats=_stats(conv, batches))
    two = D.tucker_decompose_conv(conv, (5, 3), n_iter=0, data=_data(conv, batches))
    cosines = torch.linalg.svdvals(full[0].weight.flatten(1) @ two[0].weight.flatten(1).T)
    assert torch.allclose(cosines, torch.ones(3), atol=1e-5)
    x = torch.cat(_inputs(6, seed=5))
    with torch.no_grad():
        assert torch.allclose(full(x), two(x), atol=1e-4 * float(full(x).abs().max()))
    with pytest.raises(ValueError, match="not both"):
        D.tucker_decompose_conv(conv, (5, 3), stats=_stats(conv, batches), data=_data(conv, batches))


@pytest.mark.parametrize("cfg", [dict(stride=1), dict(stride=2, padding=1), dict(bias=False)])
def test_data_aware_svd_conv1x1_at_full_rank_reproduces_the_conv(cfg):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 1, **cfg)
    batches = _inputs(6)
    new = D.svd_decompose_conv1x1(conv, 6, stats=_stats(conv, batches))
    assert _output_error(conv, new, batches) < 1e-4


@pytest.mark.parametrize("wide", [False, True], ids=["input-space", "output-space"])
@pytest.mark.parametrize("bias", [True, False])
def test_data_aware_svd_linear_at_full_rank_reproduces_the_layer(monkeypatch, wide, bias):
    torch.manual_seed(0)
    lin = nn.Linear(40, 24, bias=bias)
    if wide:  # as VGG's fc6 (25088 inputs): the moments are taken of the outputs
        monkeypatch.setattr(C, "MAX_STAT_DIM", 32)
    batches = _inputs(40, flat=True, batches=20)
    stats = _stats(lin, batches)
    assert stats.space == ("output" if wide else "input")
    assert stats.xx_hat.shape == ((24, 24) if wide else (40, 40))
    new = D.svd_decompose_linear(lin, 24, stats=stats)
    assert _output_error(lin, new, batches) < 1e-4


@pytest.mark.parametrize("method", ["tucker", "tucker-two-look", "cp", "svd-conv", "svd-linear"])
def test_inputs_in_a_subspace_data_aware_error_far_below_data_free(method):
    """Inputs that live in a 4-dimensional subspace: at the same rank, the factors fitted to them
    reproduce the layer there far better than the weight's own best approximation."""
    torch.manual_seed(0)
    if method == "svd-linear":
        layer, batches = nn.Linear(48, 40), _inputs(48, subspace=4, flat=True, batches=20)
    elif method == "svd-conv":
        layer, batches = nn.Conv2d(48, 40, 1), _inputs(48, subspace=4)
    else:
        layer, batches = nn.Conv2d(24, 24, 3, padding=1), _inputs(24, subspace=4)
    stats = _stats(layer, batches)
    if method in ("tucker", "tucker-two-look"):
        aware = D.tucker_decompose_conv(layer, (24, 4), **({"stats": stats} if method == "tucker" else
                                                           {"data": _data(layer, batches)}))
        free = D.tucker_decompose_conv(layer, (24, 4))
    elif method == "cp":
        aware, free = D.cp_decompose_conv(layer, 40, stats=stats), D.cp_decompose_conv(layer, 40)
    elif method == "svd-conv":
        aware, free = D.svd_decompose_conv1x1(layer, 4, stats=stats), D.svd_decompose_conv1x1(layer, 4)
    else:
        aware, free = D.svd_decompose_linear(layer, 4, stats=stats), D.svd_decompose_linear(layer, 4)
    # the same subspace, other draws
    held_out = _inputs(layer.weight.shape[1], subspace=4, seed=7, flat=method == "svd-linear",
                       batches=20 if method == "svd-linear" else 6)
    e_aware, e_free = _output_error(layer, aware, batches), _output_error(layer, free, batches)
    # CP refits its output factor only (the input and spatial factors stay ALS's): a smaller gain
    factor = 0.3 if method == "cp" else 0.1
    assert e_free > 0.3
    assert e_aware < factor * e_free, (e_aware, e_free)
    assert _output_error(layer, aware, held_out) < factor * _output_error(layer, free, held_out)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_with_too_few_samples_keeps_data_free_factors_and_the_mean_response(bias):
    """A Linear layer given fewer calibration samples than MIN_SAMPLES_PER_DIM per input keeps its
    data-free factors (the report says why); with mean_correction and a bias, its bias is shifted so
    that the layer's mean output on the calibration inputs is the original's; without a bias, or by
    default, nothing is added."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 48, bias=bias), nn.ReLU(), nn.Linear(48, 10)).eval()
    batches = [torch.randn(4, 64) + 1.0 for _ in range(2)]  # 8 samples < 0.25 * 64
    plan = {"0": {"method": "svd", "rank": 3}, "2": {"method": "none", "reason": "classifier"}}
    free, aware = copy.deepcopy(base), copy.deepcopy(base)
    D.decompose_model(free, plan, input_size=(64,))
    default = copy.deepcopy(base)
    D.decompose_model(default, plan, input_size=(64,), calibration=batches)
    rows = D.decompose_model(aware, plan, input_size=(64,), calibration=batches, mean_correction=True)
    assert "data-free: 8 calibration samples" in rows[0].reason
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), free.parameters()))
    assert ("bias matched to the mean response" in rows[0].reason) == bias
    x = torch.cat(batches)
    with torch.no_grad():
        want, got, before = base[0](x).mean(0), aware[0](x).mean(0), free[0](x).mean(0)
        assert torch.equal(aware[0][0].weight, free[0][0].weight)  # the same factors
        if bias:
            assert (before - want).abs().max() > 0.1
            assert torch.allclose(got, want, atol=1e-5)
        else:
            assert torch.equal(got, before)


def test_tucker_two_looks_fit_layers_whose_patches_exceed_the_moment_limit(monkeypatch):
    """The limit on moment sizes applies to the moments a fit takes: Tucker-2's two looks take the
    channels' and the core's (R_in*kh*kw), not the whole patch's, so a conv whose patches are over
    the limit is still fitted to data by Tucker-2; CP, which takes the patch moments, is not."""
    monkeypatch.setattr(C, "MAX_STAT_DIM", 40)  # the patches here: 6*3*3 = 54 values
    torch.manual_seed(0)
    batches = _inputs(6, batches=4)
    for method, entry, data_aware in (("tucker", {"ranks": [4, 3]}, True), ("cp", {"rank": 4}, False)):
        model = nn.Sequential(nn.Conv2d(6, 9, 3, padding=1))
        rows = D.decompose_model(model, {"0": {"method": method, **entry}}, input_size=(6, 10, 10),
                                 calibration=batches)
        assert ("patches exceed" in rows[0].reason) is not data_aware, rows[0].reason
        assert rows[0].method == method


def test_shrinkage_goes_to_data_free_with_few_samples():
    """Two samples in 40 dimensions say little: the shrinkage is strong (at least half-way to the
    identity) and the fit stays nearer the data-free SVD than a fit to many samples; many samples
    of anisotropic inputs: almost no shrinkage."""
    torch.manual_seed(0)
    lin = nn.Linear(40, 30)
    scales = torch.logspace(0, -2, 40)  # anisotropic inputs: the identity is a poor guess for their moments
    few = _stats(lin, [torch.randn(2, 40) * scales])
    many = _stats(lin, [x * scales for x in _inputs(40, flat=True, batches=200)])
    mean_eig = lambda s: float(torch.trace(s.moments(True)[0])) / 40
    assert few.shrinkage(True) >= mean_eig(few)
    assert many.shrinkage(True) < 0.2 * mean_eig(many)
    free = D.dense_weight(D.svd_decompose_linear(lin, 5))
    gap = lambda s: float((D.dense_weight(D.svd_decompose_linear(lin, 5, stats=s)) - free).norm())
    assert gap(few) < gap(many)


class _TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.a(x)))
        x = torch.relu(self.b(x))
        return self.head(x.mean((2, 3)))


def _trained_like(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _TwoConvs().eval()
    with torch.no_grad():  # give the BatchNorm statistics of its own to correct
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def test_decompose_model_fits_layers_in_order_on_calibration_data():
    """Sequential, asymmetric: with calibration the decomposed network's logits are far closer to the
    original's than the data-free ones, on the calibration images and on others; every argument
    form of a calibration set works (tensors, (inputs, labels) pairs, a DataLoader)."""
    base = _trained_like()
    images = [torch.rand(8, 3, 12, 12) for _ in range(4)]
    plan = {"a": {"method": "tucker", "ranks": [4, 2]}, "b": {"method": "tucker", "ranks": [4, 4]}}
    test = torch.rand(16, 3, 12, 12)

    def logits_error(model, x):
        with torch.no_grad():
            return float((model(x) - base(x)).norm() / base(x).norm())

    free = copy.deepcopy(base)
    D.decompose_model(free, plan, input_size=(3, 12, 12))
    errors = []
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(images), torch.zeros(32)),
                                         batch_size=8)
    for calib in (images, [(x, torch.zeros(len(x))) for x in images], loader):
        aware = copy.deepcopy(base)
        rows = D.decompose_model(aware, plan, input_size=(3, 12, 12), calibration=calib)
        assert [r.method for r in rows] == ["tucker", "tucker"]
        errors.append((logits_error(aware, torch.cat(images)), logits_error(aware, test)))
    assert errors[0] == pytest.approx(errors[1], rel=1e-5) and errors[0] == pytest.approx(errors[2], rel=1e-5)
    assert errors[0][1] < 0.5 * logits_error(free, test), (errors, logits_error(free, test))
    # The original is untouched by the calibration passes (hooks removed, modes kept).
    assert not base.training and not any(m._forward_pre_hooks for m in base.modules())


def test_asymmetric_fit_corrects_what_earlier_layers_lost():
    """The second layer fitted to inputs from the decomposed first layer (targets from the original)
    reproduces the original's response better than the same layer fitted to the original's own inputs
    (which, at full rank, is the layer itself)."""
    base = _trained_like(1)
    images = [torch.rand(8, 3, 12, 12) for _ in range(6)]
    first = copy.deepcopy(base)
    D.decompose_model(first, {"a": {"method": "tucker", "ranks": [3, 2]}}, input_size=(3, 12, 12),
                      calibration=images)
    x = torch.cat(images)

    def response(model):
        out = []
        handle = model.b.register_forward_hook(lambda m, a, o: out.append(o))
        with torch.no_grad():
            model(x)
        handle.remove()
        return out[0]

    target = response(base)
    errors = {}
    for kind, stats in (("symmetric", C.layer_stats(base, base, "b", images)),
                        ("asymmetric", C.layer_stats(base, first, "b", images))):
        model = copy.deepcopy(first)
        D.replace_layer(model, "b", D.tucker_decompose_conv(base.b, (16, 16), stats=stats))
        errors[kind] = float((response(model) - target).norm() / target.norm())
    assert errors["asymmetric"] < 0.9 * errors["symmetric"], errors


def test_batchnorm_correction_changes_nothing_on_the_undecomposed_model():
    base = _trained_like()
    model = copy.deepcopy(base)
    images = [torch.rand(8, 3, 12, 12) for _ in range(3)]
    assert C.reestimate_batchnorm(model, images, reference=base) == 1
    x = torch.rand(5, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(model(x), base(x), atol=1e-6)
    for (name, a), b in zip(model.state_dict().items(), base.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    assert not model.training and model.bn.momentum == base.bn.momentum


def test_batchnorm_replacement_uses_the_calibration_statistics_and_restores_modes():
    model = _trained_like()
    model.train()
    model.head.eval()
    images = [torch.rand(8, 3, 12, 12) for _ in range(3)]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert C.reestimate_batchnorm(model, images) == 1
    feats = torch.cat([model.a(x) for x in images]).detach()
    assert torch.allclose(model.bn.running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    assert model.training and not model.head.training and model.bn.training
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert C.reestimate_batchnorm(nn.Sequential(nn.Linear(3, 2)), [torch.rand(2, 3)]) == 0


def test_batchnorm_statistics_weigh_batches_by_size_and_take_a_single_image_tail():
    """The calibration set's last batch is what is left over: a short one counts for its images
    only, and a batch of a single image (which a BatchNorm1d cannot take alone) joins a neighbour."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).eval()
    for sizes in ((8, 8, 3), (8, 8, 1), (1, 5), (1, 1, 1)):
        batches = [torch.randn(n, 4) + 2 for n in sizes]
        assert C.reestimate_batchnorm(model, batches) == 1
        feats = torch.cat([model[0](x) for x in batches]).detach()
        assert torch.allclose(model[1].running_mean, feats.mean(0), atol=1e-5), sizes
        assert not model.training and model[1].momentum == 0.1


def test_batchnorm_correction_after_data_free_factors_recovers_the_statistics():
    """Data-free factors shift the BatchNorm's input; the correction (the default for data-free factors
    with calibration data) brings the network's outputs back towards the original's."""
    base = _trained_like(2)
    images = [torch.rand(8, 3, 12, 12) for _ in range(4)]
    plan = {"a": {"method": "tucker", "ranks": [3, 2]}}
    plain, corrected = copy.deepcopy(base), copy.deepcopy(base)
    D.decompose_model(plain, plan, input_size=(3, 12, 12))
    D.decompose_model(corrected, plan, input_size=(3, 12, 12), calibration=images, data_aware=False)
    assert isinstance(corrected.a, D.TuckerConv2d)
    assert torch.allclose(D.dense_weight(corrected.a), D.dense_weight(plain.a))  # the same factors
    assert not torch.equal(corrected.bn.running_mean, plain.bn.running_mean)
    x = torch.cat(images)
    bn_in = C._capture(base, "bn", x)
    with torch.no_grad():
        mean_shift = lambda m: float((C._capture(m, "bn", x).mean((0, 2, 3)) - m.bn.running_mean
                                      - (bn_in.mean((0, 2, 3)) - base.bn.running_mean)).abs().max())
    assert mean_shift(corrected) < 1e-4 < mean_shift(plain)


def test_collect_checks_its_batches():
    with pytest.raises(ValueError, match="no image"):
        C.collect([])
    with pytest.raises(ValueError, match="differ in shape"):
        C.collect([torch.rand(2, 3, 8, 8), torch.rand(2, 3, 9, 9)])
    with pytest.raises(TypeError, match="tensor or an"):
        C.collect(["x"])
    got = C.collect([torch.rand(4, 3, 8, 8)] * 3, limit=6)
    assert [len(b) for b in got] == [4, 2]


def test_cp_with_calibration_refits_the_output_factor_and_can_fall_back():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    batches = _inputs(8)
    stats = _stats(conv, batches)
    aware, free = D.cp_decompose_conv(conv, 10, stats=stats), D.cp_decompose_conv(conv, 10)
    # the same input and spatial factors; only the output factor and the bias move
    for i in (0, 1, 2):
        assert torch.allclose(aware[i].weight, free[i].weight)
    assert _output_error(conv, aware, batches) < _output_error(conv, free, batches)


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    train, test = make_image_folder(root / "data", n_train=8, n_test=4, size=32)
    path = root / "model"
    code = main.run(["--train", "--arch", "mobilenet_v3_small", "--weights", "none", "--image_size", "32", "--epochs", "1",
                     "--batch_size", "8", "--workers", "0", "--quiet", "--train_path", str(train), "--test_path",
                     str(test), "--model", str(path)])
    assert code == 0
    return path, train, test


def _decompose(capsys, model, out, *extra):
    code = main.run(["--decompose", "--model", str(model), "--decomposed_model", str(out), "--rank_ratio", "0.5",
                     "--workers", "0", "--quiet", "--batch_size", "8", *map(str, extra)])
    return code, *capsys.readouterr()


def test_cli_calibration_from_train_path_is_recorded(capsys, small_model, tmp_path):
    import models

    model, train, test = small_model
    code, out, err = _decompose(capsys, model, tmp_path / "d", "--train_path", train, "--test_path", test,
                                "--calibration", "6")
    assert code == 0, err
    assert "calibration: 6 images" in out
    _, info = models.load_model(str(tmp_path / "d"))
    assert info["meta"]["calibration"]["images"] == 6 and info["meta"]["calibration"]["data_aware"]


def test_cli_without_train_path_says_it_falls_back_to_data_free(capsys, small_model, tmp_path, caplog):
    model, _, test = small_model
    with caplog.at_level("WARNING"):
        code, out, err = _decompose(capsys, model, tmp_path / "d", "--test_path", test)
    assert code == 0, err
    assert "data-free decomposition" in caplog.text + err


def test_cli_calibration_folder_with_unreadable_files_and_other_sizes(capsys, small_model, tmp_path):
    """Calibration images of another size are resized to the model's; unreadable files are skipped with
    a warning; a single image works; only the drawn images are read."""
    model, _, _ = small_model
    train, _ = make_image_folder(tmp_path / "other", n_train=3, n_test=1, size=48)
    (train / "cat" / "broken.png").write_bytes(b"not a png")
    code, out, err = _decompose(capsys, model, tmp_path / "d", "--train_path", train, "--calibration", "1")
    assert code == 0, err
    assert "calibration: 1 images" in out
    code, out, err = _decompose(capsys, model, tmp_path / "d2", "--train_path", train, "--calibration", "100")
    assert code == 0, err
    assert "calibration: 6 images" in out and "broken.png" in err  # all 7 files drawn, the broken one skipped
    # every file unreadable: one line
    for path in (train / "cat").iterdir():
        path.write_bytes(b"not an image")
    for path in (train / "dog").iterdir():
        path.write_bytes(b"not an image")
    code, out, err = _decompose(capsys, model, tmp_path / "d3", "--train_path", train, "--calibration", "4")
    assert code == 2 and "every image is unreadable" in err and "Traceback" not in err


def test_calibration_reads_only_the_drawn_images(tmp_path, monkeypatch):
    """A calibration set of a few images from a large folder opens about that many files."""
    import dataset

    train, _ = make_image_folder(tmp_path / "big", n_train=40, n_test=1, size=16)
    opened = []
    real_open = dataset.Image.open
    monkeypatch.setattr(dataset.Image, "open", lambda f, *a, **k: opened.append(1) or real_open(f, *a, **k))
    loader, classes = dataset.build_calibration_loader(train, image_size=16, images=5, batch_size=4, workers=0)
    assert len(loader.dataset) == 5 and classes == ["cat", "dog"]
    assert len(opened) == 5  # verified: the 5 drawn files of 80, not the folder
    again, _ = dataset.build_calibration_loader(train, image_size=16, images=5, batch_size=4, workers=0)
    assert again.dataset.samples == loader.dataset.samples  # seeded


@pytest.mark.parametrize("value", ["-1", "100001"])
def test_cli_bad_calibration_count_is_one_line(capsys, small_model, tmp_path, value):
    model, train, _ = small_model
    code, _, err = _decompose(capsys, model, tmp_path / "d", "--train_path", train, "--calibration", value)
    assert code == 2 and "--calibration must be" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


def test_cli_calibration_classes_must_match(capsys, small_model, tmp_path):
    model, _, _ = small_model
    train, _ = make_image_folder(tmp_path / "other", classes=("a", "b", "c"), n_train=2, n_test=1, size=32)
    code, _, err = _decompose(capsys, model, tmp_path / "d", "--train_path", train)
    assert code == 2 and "classes" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


def test_plan_replayed_with_calibration_gets_data_aware_factors():
    base = _trained_like(3)
    images = [torch.rand(8, 3, 12, 12) for _ in range(3)]
    plan = ranks.plan_decomposition(base, ranks.Policy(conv="tucker", rank_ratio=0.5), (3, 12, 12))
    free, aware = copy.deepcopy(base), copy.deepcopy(base)
    D.decompose_model(free, plan, input_size=(3, 12, 12))
    D.decompose_model(aware, plan, input_size=(3, 12, 12), calibration=images)
    assert D.model_plan(free) == D.model_plan(aware)
    assert not torch.allclose(D.dense_weight(free.b), D.dense_weight(aware.b))


# ------------------------------------------------------------------ ranks from data (plans)
class _Flat(nn.Module):
    def __init__(self, features: int = 48, hidden: int = 40) -> None:
        super().__init__()
        self.fc = nn.Linear(features, hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)))


def test_data_spectra_are_the_response_spectra():
    """The singular values of a site's data matrix are the square roots of the eigenvalues of the
    layer's response moment E[y y^T] (shrinkage aside: many samples)."""
    torch.manual_seed(0)
    model = _Flat()
    batches = [x * torch.logspace(0, -1, 48) for x in _inputs(48, flat=True, batches=100)]
    stats = C.layer_stats(model, model, "fc", batches)
    site = ranks._Site("fc", model.fc, "linear", "svd", None, 0, 0)
    (matrix,) = ranks._data_matrices(site, stats)
    x = torch.cat(batches).double()
    y = x @ model.fc.weight.detach().double().T
    y = y - y.mean(0)
    response = torch.linalg.eigvalsh(y.T @ y / len(y)).flip(0)
    sv2 = torch.linalg.svdvals(matrix).pow(2)
    assert torch.allclose(sv2[:10], response[:10], rtol=0.05)


def test_plan_with_calibration_reads_ranks_from_the_data():
    """Inputs in a 4-dimensional subspace: VBMF on the response keeps about 4 components of a random
    layer, whose weights alone are noise to VBMF (rank 0, kept); a budget from data reaches its ratio."""
    torch.manual_seed(0)
    model = _Flat()
    batches = _inputs(48, subspace=4, flat=True, batches=40)
    policy = ranks.Policy(conv="none", fc="svd")
    free = ranks.plan_decomposition(model, policy, (48,))
    aware = ranks.plan_decomposition(model, policy, (48,), calibration=batches)
    assert free["fc"]["method"] == "none"
    assert aware["fc"]["method"] == "svd" and 3 <= aware["fc"]["rank"] <= 6, aware
    # a budget needs finer steps than one rank of a 48 -> 40 layer (4% of the model)
    wide = _Flat(256, 200)
    budget = ranks.Policy(conv="none", fc="svd", target_params=2.0)
    plan = ranks.plan_decomposition(wide, budget, (256,), calibration=_inputs(256, subspace=4, flat=True, batches=40))
    reached = ranks.plan_cost(wide, plan, (256,))["params_ratio"]
    assert 2.0 * (1 - 1e-9) <= reached <= 2.0 * 1.03


@pytest.mark.parametrize("extra,needle", [([], "--method_per_layer chooses under a budget"),
                                          (["--target_macs", "2", "--cp"], "drop --cp")])
def test_cli_method_per_layer_needs_a_budget_and_no_cp(capsys, small_model, tmp_path, extra, needle):
    model, train, _ = small_model
    code = main.run(["--decompose", "--model", str(model), "--decomposed_model", str(tmp_path / "d"),
                     "--method_per_layer", *extra, "--quiet"])
    _, err = capsys.readouterr()
    assert code == 2 and needle in err and "Traceback" not in err


def test_cli_ranks_from_data(capsys, small_model, tmp_path):
    model, train, _ = small_model
    code = main.run(["--decompose", "--model", str(model), "--decomposed_model", str(tmp_path / "d"),
                     "--target_params", "1.5", "--train_path", str(train), "--calibration", "6", "--ranks_from",
                     "data", "--workers", "0", "--quiet", "--save_plan", str(tmp_path / "plan.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "budget: 1.5x fewer parameters requested" in out
    code, _, err = _decompose(capsys, model, tmp_path / "d2", "--ranks_from", "data")
    assert code == 2 and "--ranks_from data reads" in err and not (tmp_path / "d2").exists()


def test_output_space_shrinkage_does_not_depend_on_the_weight_scale(monkeypatch):
    """S + lam W W^T: scaling W by c scales S and W W^T by c^2 alike, so lam must not move."""
    monkeypatch.setattr(C, "MAX_STAT_DIM", 32)
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    batches = [x * torch.logspace(0, -1, 40) for x in _inputs(40, flat=True, batches=5)]
    lams = []
    for scale in (1.0, 30.0):
        scaled = copy.deepcopy(lin)
        with torch.no_grad():
            scaled.weight.mul_(scale)
        stats = _stats(scaled, batches)
        weight = scaled.weight.detach().double()
        lams.append(stats.shrinkage(True, weight @ weight.T))
    assert lams[0] > 0 and lams[1] == pytest.approx(lams[0], rel=1e-4)


def test_layer_stats_restores_every_module_mode():
    model = _trained_like()
    model.train()
    model.bn.eval()  # a mixed state, as a user may leave it
    C.layer_stats(model, model, "b", [torch.rand(4, 3, 12, 12)])
    assert model.training and model.a.training and not model.bn.training


def test_layer_stats_moments_match_float64_reference():
    """The streamed moments (blocked symmetric products, shifted float32 sums) are the float64
    moments of the patches, for a patch dimension above the block size and a large mean."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 8, 3, padding=1)  # D = 576 > GRAM_BLOCK
    assert conv.weight[0].numel() > C.GRAM_BLOCK
    batches = [torch.randn(2, 64, 6, 6) * 0.1 + 3.0 for _ in range(3)]
    stats = _stats(conv, batches)
    x = torch.cat([C.patches(conv, b) for b in batches]).double()
    y = x @ conv.weight.detach().reshape(8, -1).double().T
    assert torch.allclose(stats.xx_hat, x.T @ x / len(x), rtol=1e-5, atol=1e-5)
    assert torch.allclose(stats.cross_y, y.T @ x / len(x), rtol=1e-5, atol=1e-5)
    cov = stats.xx_hat - torch.outer(stats.mean_hat, stats.mean_hat)
    ref = torch.cov(x.T, correction=0)
    assert torch.allclose(cov, ref, atol=1e-6 * float(ref.diagonal().max()) + 1e-7)
    assert torch.equal(stats.xx_hat, stats.xx_hat.T)
