"""Inference backends reproduce the eager model; ONNX export is dynamic-batch, verified and atomic."""

from __future__ import annotations

import copy
import math
import os
import sys

import pytest
import torch
from torch import nn

import decompositions as D
import inference
import runtime

RTOL = 1e-4
BATCH, OTHER_BATCH = 2, 5
IMAGE = (3, 16, 16)


class TinyNet(nn.Module):
    """Two convs replaced by Tucker-2 and CP, an SVD fc and a DiagonalLinear fc."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 12, 3, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(12 * 2 * 2, 32), nn.ReLU(inplace=True),
            # in_features > out_features: several diagonal positions share an output,
            # the case a naive ONNX export of index_add_ gets wrong.
            nn.Linear(32, 20), nn.ReLU(inplace=True),
            nn.Linear(20, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    net = TinyNet().eval()
    f, c = net.features, net.classifier
    f[2] = D.tucker_decompose_conv(f[2], (6, 4))
    f[5] = D.tucker_decompose_conv(f[5], (5, 6))
    f[7] = D.cp_decompose_conv(f[7], 6)
    c[0] = D.svd_decompose_linear(c[0], 8)
    c[2] = D.diagonal_decompose_linear(c[2], bandwidth=2)
    return net


def _example(batch: int = BATCH, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *IMAGE, generator=torch.Generator().manual_seed(seed))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_fixture_has_every_decomposed_type(model):
    kinds = {type(m) for m in model.modules()}
    assert {D.TuckerConv2d, D.CPConv2d, D.SVDLinear, D.DiagonalLinear} <= kinds
    assert any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())  # CP depthwise convs


@pytest.mark.parametrize("backend", inference.BACKENDS)
def test_backend_matches_eager_at_any_batch_size(model, backend, monkeypatch):
    if backend == "amp":  # bfloat16 autocast on a CPU; emulated (slowly) where the CPU lacks it
        monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: True)
    example = _example()
    predictor = inference.prepare(model, example, backend=backend)
    assert predictor.backend == backend
    for x in (example, _example(OTHER_BATCH, seed=2)):
        out = predictor(x)
        assert out.shape == (x.shape[0], 5)
        assert out.dtype == torch.float32 and out.device == x.device
        assert _rel(out, _eager(model, x)) < (inference.AMP_OUTPUT_RTOL if backend == "amp" else RTOL)


def test_amp_needs_half_precision_hardware_and_is_no_cpu_default(model, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="'amp' backend .* needs a CUDA GPU or a CPU with native bfloat16"):
        inference.prepare(model, _example(), backend="amp")
    assert "amp" not in inference.AUTO_ORDER["cpu"] and inference.AUTO_ORDER["cuda"][0] == "amp"
    # Its output check is looser than the float32 backends' (half precision), not absent.
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: True)
    monkeypatch.setattr(inference, "AMP_OUTPUT_RTOL", 1e-9)
    with pytest.raises(inference.OutputMismatchError, match="'amp' differs from eager"):
        inference.prepare(model, _example(), backend="amp")


def test_prepare_leaves_the_model_alone(model):
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predictor = inference.prepare(model, _example(), backend="channels_last")
    assert model.training  # the predictor works on its own eval-mode copy
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) and value.is_contiguous(), key
    with torch.no_grad():
        model.classifier[4].weight.add_(1.0)  # later edits of the model do not leak in
    assert _rel(predictor(_example()), _eager(model, _example())) > RTOL


def test_auto_picks_first_cpu_candidate(model):
    predictor = inference.prepare(model, _example())
    assert predictor.backend == inference.AUTO_ORDER["cpu"][0]
    assert _rel(predictor(_example(OTHER_BATCH)), _eager(model, _example(OTHER_BATCH))) < RTOL


def test_without_onnxruntime_onnx_fails_clearly_and_auto_falls_back(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    assert "onnx" not in inference.available_backends()
    with pytest.raises(ImportError, match="onnxruntime"):
        inference.prepare(model, _example(), backend="onnx")
    predictor = inference.prepare(model, _example())
    expected = next(b for b in inference.AUTO_ORDER["cpu"] if b != "onnx")
    assert predictor.backend == expected
    assert _rel(predictor(_example()), _eager(model, _example())) < RTOL


def test_auto_skips_a_backend_that_fails_to_build(model, monkeypatch):
    def broken_trace(*args, **kwargs):
        raise RuntimeError("trace failed")

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setattr(torch.jit, "trace", broken_trace)
    predictor = inference.prepare(model, _example())
    assert predictor.backend == "channels_last"
    with pytest.raises(RuntimeError, match="trace failed"):
        inference.prepare(model, _example(), backend="torchscript")


def test_unknown_backend_is_named_with_the_allowed_ones(model):
    with pytest.raises(ValueError, match=r"'tensorrt'.*'eager'.*'channels_last'.*'torchscript'.*'onnx'.*'auto'"):
        inference.prepare(model, _example(), backend="tensorrt")


def test_export_onnx_round_trip_with_other_batch_size(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "model.onnx"
    info = inference.export_onnx(model, path, _example())
    assert info["checked"] and info["batch_sizes"] == [BATCH, BATCH + 1]
    assert info["max_rel_diff"] < RTOL and info["bytes"] == path.stat().st_size
    assert os.listdir(tmp_path) == ["model.onnx"]  # no temporary file left behind
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == inference.ONNX_BATCH_DIM
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _example(OTHER_BATCH, seed=3)
    (out,) = session.run(None, {inference.ONNX_INPUT_NAME: x.numpy()})
    assert _rel(torch.from_numpy(out), _eager(model, x)) < RTOL


@pytest.mark.filterwarnings("ignore:Warning. ONNX export does not support duplicated values:UserWarning")
def test_plain_index_add_export_is_caught_by_the_check(model, tmp_path, monkeypatch):
    # Without the scatter_add rewrite, DiagonalLinear's index_add_ exports as a
    # ScatterElements without reduction: wrong outputs, which the check must catch.
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(inference, "_exportable", lambda net: net)
    path = tmp_path / "model.onnx"
    with pytest.raises(inference.OutputMismatchError, match="not written"):
        inference.export_onnx(model, path, _example())
    assert os.listdir(tmp_path) == []


def test_failed_export_leaves_existing_file_untouched(model, tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous model")

    def failing_export(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(RuntimeError, match="exporter exploded"):
        inference.export_onnx(model, path, _example(), check=False)
    assert path.read_bytes() == b"previous model"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_failed_rename_removes_the_temporary_file(model, tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous model")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        inference.export_onnx(model, path, _example(), check=False)
    assert path.read_bytes() == b"previous model"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_export_rejects_old_opset(model, tmp_path):
    with pytest.raises(ValueError, match=rf"opset.*>= {inference.ONNX_MIN_OPSET}.*13"):
        inference.export_onnx(model, tmp_path / "m.onnx", _example(), opset=13)
    assert not (tmp_path / "m.onnx").exists()




# ------------------------------------------------------------------ rank padding, pools
def test_pad_ranks_is_exact_and_pads_every_chain(model):
    import copy
    padded = inference.pad_ranks(copy.deepcopy(model), 16)
    tucker, cp = padded.features[2], padded.features[7]
    assert [m.weight.shape[:2] for m in tucker] == [(16, 8), (16, 16), (16, 16)]
    assert cp[0].out_channels == 16 and cp[1].groups == cp[2].groups == 16 and cp[1].weight.shape == (16, 1, 3, 1)
    assert cp[3].weight.shape == (12, 16, 1, 1)
    x = _example(OTHER_BATCH)
    assert _rel(_eager(padded, x), _eager(model, x)) < 1e-6
    same = inference.pad_ranks(copy.deepcopy(model), 1)  # multiple 1: nothing to pad
    assert [p.shape for p in same.parameters()] == [p.shape for p in model.parameters()]
    assert _rel(_eager(same, x), _eager(model, x)) == 0
    with pytest.raises(ValueError, match="rank_multiple.*0"):
        inference.pad_ranks(copy.deepcopy(model), 0)


def test_onnx_pads_ranks_unless_told_not_to(model, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    widths = {}
    for multiple in (inference.ONNX_RANK_MULTIPLE, None):
        path = tmp_path / f"m{multiple}.onnx"
        inference.export_onnx(model, path, _example(), rank_multiple=multiple)
        graph = onnx.load(str(path)).graph
        widths[multiple] = sorted(int(t.dims[0]) for t in graph.initializer if len(t.dims) == 4)
        predictor = inference.prepare(model, _example(), backend="onnx", rank_multiple=multiple)
        assert _rel(predictor(_example(OTHER_BATCH)), _eager(model, _example(OTHER_BATCH))) < RTOL
    assert 6 in widths[None] and 6 not in widths[inference.ONNX_RANK_MULTIPLE]
    with pytest.raises(ValueError, match="rank_multiple"):
        inference.prepare(model, _example(), backend="onnx", rank_multiple=-2)


class PoolNet(nn.Module):
    """VGG's head: a 7x7 adaptive average pool after a 2x2 (or 3x3) feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(8))
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Linear(4 * 49, 3)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@pytest.mark.parametrize("size", [16, 56])
@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
def test_adaptive_pool_that_does_not_divide_is_exported(backend, size):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = PoolNet().eval()
    x = torch.randn(2, 3, size, size)
    predictor = inference.prepare(net, x, backend=backend)
    other = torch.randn(3, 3, size, size)
    assert _rel(predictor(other), _eager(net, other)) < RTOL
    assert isinstance(net.avgpool, nn.AdaptiveAvgPool2d)  # the caller's model is untouched


def test_time_interleaved_runs_in_rounds():
    order = []
    times = inference.time_interleaved({"a": lambda: order.append("a"), ("b", 1): lambda: order.append("b")},
                                       warmup=1, repeats=3)
    assert order == ["a", "b"] * 4
    assert set(times) == {"a", ("b", 1)} and all(len(v) == 3 and min(v) >= 0 for v in times.values())
    with pytest.raises(ValueError, match="repeats"):
        inference.time_interleaved({"a": lambda: None}, repeats=0)


def test_pad_ranks_pads_the_svd_pair_of_a_1x1_conv_exactly():
    import decompositions

    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 1, stride=2, padding=1)
    net = nn.Sequential(decompositions.svd_decompose_conv1x1(conv, 5), nn.ReLU())
    x = torch.randn(2, 24, 9, 9)
    with torch.no_grad():
        expected = net(x)
        inference.pad_ranks(net, 16)
        got = net(x)
    assert net[0][0].out_channels == 16 and net[0][1].in_channels == 16
    assert _rel(got, expected) < 1e-6


# ------------------------------------------------------------------------------ int8


def _op_types(path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_int8_export_of_every_decomposed_type(model, tmp_path):
    """The low-rank factors quantize like plain convs and matmuls: the int8 file has QDQ pairs,
    is smaller, runs in onnxruntime and gives float32's top-1 class on the calibration images."""
    pytest.importorskip("onnxruntime")
    calibration = [_example(16, seed=s) for s in (2, 3)]
    path = tmp_path / "int8.onnx"
    result = inference.export_onnx(model, path, _example(), int8_batches=calibration)
    q = result["int8"]
    assert q["calibration_images"] == 32 and q["top1_agreement"] >= inference.INT8_MIN_AGREEMENT
    assert result["bytes"] == path.stat().st_size == q["bytes"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= _op_types(path)
    # Every conv and matmul weight is stored in int8 (this model is too small for the file to
    # shrink: the scales and QDQ nodes weigh more than the 4x on its few thousand weights).
    import onnx

    graph = onnx.load(str(path)).graph
    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    dequantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    weighted = [n for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    assert len(weighted) >= 10
    # ... each one's weight (input 1) dequantized from an int8 initializer.
    assert all(dequantized.get(n.input[1]) in int8 for n in weighted), [n.name for n in weighted]
    run = inference.onnx_runner(path.read_bytes())
    x = _example(OTHER_BATCH, seed=4)
    assert _rel(run(x), _eager(model, x)) < 0.1


def test_int8_that_disagrees_with_float_is_not_written(model, tmp_path, monkeypatch):
    """A quantized model whose classes differ from float32's is refused and nothing is written."""
    pytest.importorskip("onnxruntime")
    other = TinyNet().eval()
    torch.manual_seed(5)
    other_bytes = inference._onnx_bytes(other, _example(), opset=None)
    monkeypatch.setattr(inference, "quantize_int8", lambda model_bytes, batches, **kw: other_bytes)
    path = tmp_path / "int8.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(inference.Int8AgreementError, match="int8 model's top-1 class agrees"):
        inference.export_onnx(model, path, _example(), int8_batches=[_example(64, seed=2)])
    assert path.read_bytes() == b"previous"


def test_non_finite_outputs_never_pass_a_check(model, tmp_path):
    """NaN compares false with any tolerance: a backend whose output has NaN fails its check, and a
    model whose own outputs are not finite is refused by name before anything is written."""
    x = _example()
    reference = _eager(model, x)
    assert inference._relative_diff(reference.clone().fill_(float("nan")), reference) == (math.inf, math.inf)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    path = tmp_path / "m.onnx"
    with pytest.raises(inference.OutputMismatchError, match="eager\\) outputs are not finite"):
        inference.export_onnx(broken, path, x)
    assert not path.exists()


def test_int8_keeps_named_nodes_in_float32(model):
    """``keep_float`` leaves the named node's weight in float32 and quantizes the others; a name
    the model does not have is refused rather than silently ignored."""
    pytest.importorskip("onnxruntime")
    import onnx

    example, calibration = _example(), [_example(16, seed=2)]
    float_bytes = inference._onnx_bytes(model, example, opset=None)
    convs = [n.name for n in onnx.load_from_string(float_bytes).graph.node if n.op_type == "Conv"]
    keep = convs[0]
    graph = onnx.load_from_string(inference.quantize_int8(float_bytes, calibration, keep_float=[keep])).graph
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    dequantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    by_name = {n.name: n for n in graph.node}
    assert len(convs) >= 2 and set(convs) <= set(by_name)
    assert by_name[keep].input[1] in floats
    assert all(dequantized.get(by_name[n].input[1]) in int8 for n in convs[1:])
    with pytest.raises(ValueError, match="keep_float names nodes the model does not have"):
        inference.quantize_int8(float_bytes, calibration, keep_float=["/no/such/Conv"])


def test_int8_needs_calibration_batches():
    pytest.importorskip("onnxruntime")
    with pytest.raises(ValueError, match="at least one calibration batch"):
        inference.quantize_int8(b"", [])


def test_float_and_int8_top1_counts_agreement_and_accuracy():
    # Fake runners: float32 always right; int8 wrong on the second of the four images of each batch.
    x = torch.zeros(4, 3)
    labels = torch.tensor([0, 1, 0, 1])
    flipped = labels ^ torch.tensor([0, 1, 0, 0])
    run_float = lambda inputs: nn.functional.one_hot(labels, 2).float()  # noqa: E731
    run_int8 = lambda inputs: nn.functional.one_hot(flipped, 2).float()  # noqa: E731
    result = inference.float_and_int8_top1(run_float, run_int8, [(x, labels), [x, labels]])
    assert result == {"agreement": 0.75, "accuracy_float32": 1.0, "accuracy_int8": 0.75}
    assert inference.float_and_int8_top1(run_float, run_int8, [x]) == {"agreement": 0.75}
