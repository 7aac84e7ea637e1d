"""Any torchvision CNN: residual, dense, inverted-residual, squeeze-excitation and grouped blocks.

Parametrized over torchvision architectures with ``weights=None`` and small inputs:

* at full rank every conversion, in place inside the real architecture, reproduces the
  original's outputs (k x k convs by Tucker-2, 1x1 convs and hidden Linear layers by SVD);
* a plan at reduced ranks keeps grouped/depthwise convs and the head with their reasons,
  leaves a smaller model whose every parameter gets a gradient and whose outputs are finite;
* the decomposed model survives a model-file round trip and an ONNX export checked with
  onnxruntime.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import decompositions as D
import inference
import models
import ranks
import report

# arch -> input size: the smallest multiple of 8 at or above the arch's minimum that leaves
# every stage a few pixels (the 1x1 maps of a 32 px ResNet still exercise every layer).
ARCHS = {"resnet18": 32, "resnet50": 32, "densenet121": 32, "mobilenet_v2": 32, "efficientnet_b0": 32,
         "regnet_x_400mf": 32, "vgg16": 32}
RTOL = 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


#: Linear layers above this many weights (VGG16's fc6 and fc7) are left out of the full-rank
#: test: their full SVD costs the suite most of a minute, and svd_decompose_linear's exactness
#: at full rank is test_decompositions' (small layers, every geometry).
FULL_RANK_MAX_LINEAR = 1024 * 1024


def _full_rank(layer: nn.Module) -> nn.Module | None:
    """The full-rank conversion of one layer (None for layers the tool keeps)."""
    if isinstance(layer, nn.Linear) and layer.weight.numel() > FULL_RANK_MAX_LINEAR:
        return None
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return None
        if tuple(layer.kernel_size) == (1, 1):
            return D.svd_decompose_conv1x1(layer, min(layer.out_channels, layer.in_channels))
        return D.tucker_decompose_conv(layer, (layer.out_channels, layer.in_channels))
    return D.svd_decompose_linear(layer, min(layer.in_features, layer.out_features))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_full_rank_conversions_reproduce_the_original(arch):
    torch.manual_seed(0)
    model = models.build_model(arch, 3).eval()
    size = ARCHS[arch]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        converted = 0
        for name, layer in D.candidate_layers(model):
            new = _full_rank(layer)
            if new is not None:
                D.replace_layer(model, name, new)
                converted += 1
        got = model(x)
    kinds = {type(m) for m in model.modules()}
    assert converted >= 10 and D.SVDConv2d in kinds or arch == "vgg16", kinds
    assert _rel(got, expected) < RTOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_reduced_ranks_shrink_train_round_trip_and_export(arch, tmp_path):
    torch.manual_seed(0)
    size = ARCHS[arch]
    input_size = (3, size, size)
    model = models.build_model(arch, 3)
    head = models.head_name(model)
    params, macs = report.count_params(model), report.count_macs(model, input_size)
    has_pointwise = any(tuple(m.kernel_size) == (1, 1) for m in model.modules() if isinstance(m, nn.Conv2d))
    # fc_rank 16: only VGG16 has hidden FC layers; small ones keep its ONNX file (and the suite) small.
    plan = ranks.plan_decomposition(model, ranks.Policy(conv="tucker", fc="svd", rank_ratio=0.25, fc_rank=16),
                                    input_size)
    rows = {r.name: r for r in D.decompose_model(model, plan, input_size=input_size)}
    # Grouped and depthwise convs and the head are kept, each with its reason; nothing else is lost.
    for name, row in rows.items():
        layer = model.get_submodule(name)
        if row.skipped:
            assert row.reason, name
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            assert row.skipped and "grouped" in row.reason
    assert rows[head].skipped and "classifier" in rows[head].reason
    decomposed = [r for r in rows.values() if not r.skipped]
    assert len(decomposed) >= 10
    if has_pointwise:  # 1x1 convs become SVD pairs of 1x1 convs
        assert any(r.method == "svd" and r.kind == "conv" for r in decomposed)
    assert report.count_params(model) < params and report.count_macs(model, input_size) < macs

    model.train()
    out = model(torch.randn(4, 3, size, size))
    assert out.shape == (4, 3) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())

    model.eval()
    path = tmp_path / "model"
    models.save_model(str(path), model, arch=arch, classes=["a", "b", "c"], image_size=size)
    loaded, info = models.load_model(str(path))
    assert info["plan"] == D.model_plan(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    pytest.importorskip("onnxruntime")
    result = inference.export_onnx(loaded, tmp_path / "model.onnx", x)
    assert result["checked"] and result["max_rel_diff"] < 1e-3


def test_a_budget_on_resnet50_reaches_its_ratio_with_1x1_svd_pairs():
    # The budget's cost model and error bounds for the 1x1 SVD pairs: the plan's ratio is what
    # the structure it describes counts (built on the meta device, no weights).
    torch.manual_seed(0)
    model = models.build_model("resnet50", 2)
    input_size = (3, 32, 32)
    plan = ranks.plan_decomposition(model, ranks.Policy(target_macs=3.0, skip={"conv1": "stem"}), input_size)
    pointwise = [n for n, e in plan.items() if e["method"] == "svd"]
    assert len(pointwise) >= 10 and all(tuple(model.get_submodule(n).kernel_size) == (1, 1) for n in pointwise)
    with torch.device("meta"):
        twin = models.build_model("resnet50", 2)
    D.apply_plan(twin, plan)
    reached = report.count_macs(model, input_size) / report.count_macs(twin, input_size)
    assert 3.0 <= reached <= 3.0 * (1 + ranks.BUDGET_TOLERANCE), reached
    assert ranks.plan_cost(model, plan, input_size)["macs_ratio"] == pytest.approx(reached)
