"""Conv stacks (and FC layers) from ONNX and Keras files: exact weights, layouts, every mismatch."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import importers
import models
from errors import UserError

h5py = pytest.importorskip("h5py")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _conv_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _export_onnx(module, example, path):
    module.eval()
    torch.onnx.export(module, example, str(path), input_names=["x"], output_names=["y"], dynamo=False)


# ------------------------------------------------------------------------- ONNX
def test_onnx_export_of_alexnet_convs_comes_back_exactly(tmp_path):
    torch.manual_seed(0)
    source = models.torchvision.models.alexnet(weights=None)
    # A file with the conv stack and a foreign head (as a detector's export would have).
    exported = nn.Sequential(source.features, nn.Flatten(), nn.Linear(256, 7))
    path = tmp_path / "alex.onnx"
    _export_onnx(exported, torch.randn(1, 3, 63, 63), path)
    model, pretrained = models.build_pretrained("alexnet", 2, weights=str(path))
    for (name, got), (_, want) in zip(_conv_modules(model), _conv_modules(source)):
        assert torch.equal(got.weight, want.weight), name
        assert torch.equal(got.bias, want.bias), name
    conv_params = {f"{n}.{p}" for n, _ in _conv_modules(model) for p in ("weight", "bias")}
    assert set(pretrained) == conv_params  # the classifier is fresh, and says so
    assert model.classifier[-1].out_features == 2


def _tf2onnx_like_graph(path, conv_w, conv_b, dense_w, dense_b, *, size, bias_as_add=False):
    """An ONNX graph shaped like tf2onnx's Keras exports: NHWC input, Transpose, Conv, Relu,
    Transpose to NHWC, Reshape, MatMul + Add, Relu."""
    out_c = conv_w.shape[0]
    inits = [numpy_helper.from_array(conv_w, "conv/kernel"),
             numpy_helper.from_array(dense_w, "dense/kernel"),
             numpy_helper.from_array(dense_b, "dense/bias"),
             numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "flat_shape")]
    conv_inputs = ["x_nchw", "conv/kernel"]
    nodes = [helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2])]
    if bias_as_add:
        inits.append(numpy_helper.from_array(conv_b.reshape(1, out_c, 1, 1), "conv/bias"))
        nodes += [helper.make_node("Conv", conv_inputs, ["conv_raw"], pads=[1, 1, 1, 1]),
                  helper.make_node("Add", ["conv_raw", "conv/bias"], ["conv_out"])]
    else:
        inits.append(numpy_helper.from_array(conv_b, "conv/bias"))
        nodes.append(helper.make_node("Conv", conv_inputs + ["conv/bias"], ["conv_out"], pads=[1, 1, 1, 1]))
    nodes += [
        helper.make_node("Relu", ["conv_out"], ["relu"]),
        helper.make_node("Transpose", ["relu"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["nhwc", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "dense/kernel"], ["mm"]),
        helper.make_node("Add", ["mm", "dense/bias"], ["dense_out"]),
        helper.make_node("Relu", ["dense_out"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "keras_like",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size, size, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, dense_w.shape[1]])],
                              initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


class Tiny(nn.Module):
    """A VGG-shaped toy: convs, flatten of a (C, H, W) map, hidden Linear, head."""

    def __init__(self, channels=4, size=3, hidden=5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, hidden), nn.ReLU(),
                                        nn.Linear(hidden, 2))

    def hidden(self, x):
        return self.classifier[:-1](self.features(x))


@pytest.mark.parametrize("bias_as_add", [False, True])
def test_onnx_keras_export_computes_the_same_after_import(tmp_path, bias_as_add):
    """A channels-last export (Keras via tf2onnx) gives the same hidden activations in torch."""
    rng = np.random.default_rng(0)
    size, channels, hidden = 3, 4, 5
    conv_w = rng.standard_normal((channels, 3, 3, 3)).astype(np.float32)
    conv_b = rng.standard_normal(channels).astype(np.float32)
    dense_w = rng.standard_normal((size * size * channels, hidden)).astype(np.float32)  # (h*w*c, out)
    dense_b = rng.standard_normal(hidden).astype(np.float32)
    path = tmp_path / "keras_like.onnx"
    _tf2onnx_like_graph(path, conv_w, conv_b, dense_w, dense_b, size=size, bias_as_add=bias_as_add)

    weights = importers.read_layers(path)
    assert weights.kind == "onnx" and weights.denses[0].channels_last_input
    model = Tiny(channels, size, hidden)
    result = importers.load_into(model, weights, arch="tiny")
    assert result["loaded"] == ["features.0", "classifier.1"] and result["fresh"] == ["classifier.3"]

    import onnxruntime as ort

    x = rng.standard_normal((1, size, size, 3)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        got = model.hidden(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_onnx_that_is_not_onnx(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00\x01 this is not a protobuf" * 10)
    with pytest.raises(UserError, match="not a readable ONNX model"):
        models.build_model("vgg16", 2, weights=str(path))


def test_onnx_without_the_stack_names_what_it_found(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "short.onnx"
    _export_onnx(nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)),
                 torch.randn(1, 3, 8, 8), path)
    with pytest.raises(UserError, match=r"lacks the conv stack of vgg16: 2 conv kernel\(s\) found "
                                        r"\(64x3x3x3, 64x64x3x3\); vgg16 needs 13 in order, and features.5 "
                                        r"\(128x64x3x3\)"):
        models.build_model("vgg16", 2, weights=str(path))


# ------------------------------------------------------------------------ Keras
def _vgg16_hwio(seed=0):
    """torchvision vgg16's conv shapes as Keras HWIO kernels, with their OIHW originals."""
    gen = torch.Generator().manual_seed(seed)
    convs = [m for m in models.torchvision.models.vgg16(weights=None).features if isinstance(m, nn.Conv2d)]
    out = []
    for conv in convs:
        w = torch.randn(conv.weight.shape, generator=gen) * 0.05
        b = torch.randn(conv.out_channels, generator=gen)
        out.append((w, b, w.permute(2, 3, 1, 0).contiguous().numpy()))
    return out


def test_keras2_h5_vgg16_comes_back_exactly_with_extra_layers_ignored(tmp_path):
    kernels = _vgg16_hwio()
    path = tmp_path / "vgg16_keras2.h5"
    with h5py.File(path, "w") as fh:
        root = fh.create_group("model_weights")
        names = []
        for i, (w, b, hwio) in enumerate(kernels):
            name = f"conv_{len(kernels) - i:02d}"  # sorting by name would reverse the stack
            group = root.create_group(name).create_group(name)
            group["kernel:0"], group["bias:0"] = hwio, b.numpy()
            names.append(name)
            if i == 4:  # a side output in the middle of the stack: 1x1 conv, skipped
                side = root.create_group("side_1x1").create_group("side_1x1")
                side["kernel:0"] = np.ones((1, 1, 256, 8), np.float32)
                side["bias:0"] = np.zeros(8, np.float32)
                names.append("side_1x1")
        bn = root.create_group("bn").create_group("bn")
        for key in ("gamma:0", "beta:0", "moving_mean:0", "moving_variance:0"):
            bn[key] = np.ones(512, np.float32)
        head = root.create_group("dense_head").create_group("dense_head")
        head["kernel:0"], head["bias:0"] = np.ones((25088, 3), np.float32), np.zeros(3, np.float32)
        names += ["bn", "dense_head"]
        # Keras 2 orders layers by this attribute, not by name.
        root.attrs["layer_names"] = [n.encode() for n in names]
    model, pretrained = models.build_pretrained("vgg16", 2, weights=str(path))
    for (name, conv), (w, b, _) in zip(_conv_modules(model), kernels):
        assert torch.equal(conv.weight, w), name
        assert torch.equal(conv.bias, b), name
    assert len(pretrained) == 26 and all(n.startswith("features.") for n in pretrained)
    result = importers.load_into(models.torchvision.models.vgg16(weights=None), importers.read_layers(path),
                                 arch="vgg16")
    assert result["ignored"] == ["model_weights/side_1x1/side_1x1 (8x256x1x1)",
                                 "model_weights/dense_head/dense_head (3x25088)"]
    assert result["fresh"] == ["classifier.0", "classifier.3", "classifier.6"]


def test_keras3_weights_h5_orders_layers_by_number(tmp_path):
    """Keras 3 ``.weights.h5``: ``layers/<name>/vars/0`` kernels; conv2d_10 comes after conv2d_9."""
    torch.manual_seed(2)
    source = models.torchvision.models.alexnet(weights=None)
    convs = [m for m in source.features if isinstance(m, nn.Conv2d)]
    # Name them so that alphabetical order would be wrong: conv2d_8, conv2d_9, conv2d_10, ...
    path = tmp_path / "alex.weights.h5"
    with h5py.File(path, "w") as fh:
        for i, conv in enumerate(convs):
            vars_ = fh.create_group(f"block1/layers/conv2d_{8 + i}/vars")
            vars_["0"] = conv.weight.detach().permute(2, 3, 1, 0).numpy()
            vars_["1"] = conv.bias.detach().numpy()
        fc7 = source.classifier[4]
        dense = fh.create_group("layers/dense/vars")
        dense["0"], dense["1"] = fc7.weight.detach().T.numpy(), fc7.bias.detach().numpy()
    model, pretrained = models.build_pretrained("alexnet", 2, weights=str(path))
    for (name, got), want in zip(_conv_modules(model), convs):
        assert torch.equal(got.weight, want.weight), name
    # fc7 (4096x4096) matches torchvision's classifier.4 by shape; fc6 does not exist in the file.
    assert torch.equal(model.classifier[4].weight, fc7.weight)
    assert torch.equal(model.classifier[4].bias, fc7.bias)
    assert "classifier.4.weight" in pretrained and "classifier.1.weight" not in pretrained


@pytest.mark.parametrize("layout", ["keras2", "keras3 dense stored first"])
def test_keras_flatten_order_is_converted_for_the_first_dense_layer(tmp_path, layout):
    """Keras flattens NHWC: its first dense layer, read from h5, computes the same in torch.  A
    Keras 3 Sequential around a conv base stores "layers/dense" before "layers/functional/...":
    the first dense layer is still the one converted, and an odd group name ("²", a digit to
    str.isdigit but not to int) sorts without a crash."""
    rng = np.random.default_rng(3)
    size, channels, hidden = 3, 4, 5
    conv_hwio = rng.standard_normal((3, 3, 3, channels)).astype(np.float32)
    dense = rng.standard_normal((size * size * channels, hidden)).astype(np.float32)
    path = tmp_path / "tiny.h5"
    with h5py.File(path, "w") as fh:
        if layout == "keras2":
            fh["conv/conv/kernel:0"], fh["conv/conv/bias:0"] = conv_hwio, np.zeros(channels, np.float32)
            fh["fc/fc/kernel:0"], fh["fc/fc/bias:0"] = dense, np.zeros(hidden, np.float32)
            fh.attrs["layer_names"] = [b"conv", b"fc"]
        else:
            fh["layers/dense/vars/0"], fh["layers/dense/vars/1"] = dense, np.zeros(hidden, np.float32)
            conv = fh.create_group("layers/functional/layers/conv2d/vars")
            conv["0"], conv["1"] = conv_hwio, np.zeros(channels, np.float32)
            fh.create_group("\u00b2")
    model = Tiny(channels, size, hidden)
    importers.load_into(model, importers.read_layers(path), arch="tiny")
    x = torch.from_numpy(rng.standard_normal((2, 3, size, size)).astype(np.float32))
    with torch.no_grad():
        fmap = model.features(x)  # (N, C, H, W)
        got = model.hidden(x).numpy()
    keras_flat = fmap.permute(0, 2, 3, 1).reshape(2, -1).numpy()  # Keras: flatten of NHWC
    np.testing.assert_allclose(got, np.maximum(keras_flat @ dense, 0), rtol=1e-5, atol=1e-5)


def test_keras_file_without_the_stack(tmp_path):
    path = tmp_path / "small.h5"
    with h5py.File(path, "w") as fh:
        fh["a/a/kernel:0"] = np.zeros((3, 3, 3, 64), np.float32)
        fh["d/d/kernel:0"] = np.zeros((10, 2), np.float32)
    with pytest.raises(UserError, match=r"lacks the conv stack of alexnet: 1 conv kernel\(s\) found \(64x3x3x3\); "
                                        r"alexnet needs 5 in order, and features.0 \(64x3x11x11\)"):
        models.build_model("alexnet", 2, weights=str(path))


def test_keras_file_that_is_not_hdf5(tmp_path):
    path = tmp_path / "broken.h5"
    path.write_bytes(importers.HDF5_SIGNATURE + b"\x00" * 64)
    with pytest.raises(UserError, match="not a readable HDF5 file"):
        models.build_model("alexnet", 2, weights=str(path))


def test_keras_without_h5py_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as fh:
        fh["a/a/kernel:0"] = np.zeros((3, 3, 3, 64), np.float32)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(UserError, match="needs h5py.*pip install h5py"):
        models.build_model("vgg16", 2, weights=str(path))


def test_missing_bias_is_zero_and_dense_mismatch_stays_fresh(tmp_path):
    path = tmp_path / "nobias.h5"
    with h5py.File(path, "w") as fh:
        fh["conv/conv/kernel:0"] = np.ones((3, 3, 3, 4), np.float32)
        fh["fc/fc/kernel:0"] = np.ones((7, 5), np.float32)  # 7 inputs: fits no layer of Tiny
        fh.attrs["layer_names"] = [b"conv", b"fc"]
    model = Tiny()
    with torch.no_grad():
        model.features[0].bias.fill_(3.0)
    before = model.classifier[1].weight.clone()
    result = importers.load_into(model, importers.read_layers(path), arch="tiny")
    assert torch.equal(model.features[0].bias, torch.zeros(4))
    assert torch.equal(model.classifier[1].weight, before)
    assert result["fresh"] == ["classifier.1", "classifier.3"]
    assert result["ignored"] == ["fc/fc (5x7)"]


def test_file_kind_by_content_not_name(tmp_path):
    h5 = tmp_path / "weights.pth"  # an HDF5 file with a misleading name
    with h5py.File(h5, "w") as fh:
        fh["x"] = np.zeros(1)
    assert importers.file_kind(h5) == "keras"
    pth = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(1)}, pth)
    assert importers.file_kind(pth) == "torch"
    (tmp_path / "x.ONNX").write_bytes(b"\x08\x07")
    assert importers.file_kind(tmp_path / "x.ONNX") == "onnx"


def test_a_deeper_network_of_the_same_family_is_refused(tmp_path):
    """A VGG19 file read as vgg16: its extra 3x3 convs would be skipped and its blocks mixed."""
    convs = [m for m in models.torchvision.models.vgg19(weights=None).features if isinstance(m, nn.Conv2d)]
    path = tmp_path / "vgg19.h5"
    with h5py.File(path, "w") as fh:
        for i, conv in enumerate(convs):
            o, c, kh, kw = conv.weight.shape
            fh[f"c{i:02d}/c{i:02d}/kernel:0"] = np.zeros((kh, kw, c, o), np.float32)
        fh.attrs["layer_names"] = [f"c{i:02d}".encode() for i in range(len(convs))]
    with pytest.raises(UserError, match=r"more convs of vgg16's shapes inside its stack.*c07/c07 \(256x256x3x3\)"
                                        r".*pick the --arch"):
        models.build_model("vgg16", 2, weights=str(path))
    assert models.build_pretrained("vgg19", 2, weights=str(path))[1]  # as the arch it is, it loads


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (2.0, 0.5)])
def test_onnx_gemm_with_a_broadcast_bias(tmp_path, alpha, beta):
    """Gemm (transB=1) whose bias C has shape (1, N), as the ONNX spec allows; its alpha and beta
    scale the weight and the bias (alpha * A @ B.T + beta * C)."""
    rng = np.random.default_rng(4)
    conv_w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    gemm_w = rng.standard_normal((5, 36)).astype(np.float32)  # (out, in)
    gemm_b = rng.standard_normal((1, 5)).astype(np.float32)
    inits = [numpy_helper.from_array(conv_w, "w"), numpy_helper.from_array(gemm_w, "fc_w"),
             numpy_helper.from_array(gemm_b, "fc_b")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1, alpha=alpha, beta=beta)]
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], initializer=inits)
    path = tmp_path / "gemm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    model = Tiny()
    result = importers.load_into(model, importers.read_layers(path), arch="tiny")
    assert result["loaded"] == ["features.0", "classifier.1"]
    assert torch.equal(model.features[0].bias, torch.zeros(4))  # no conv bias in the file
    assert torch.equal(model.classifier[1].weight, torch.from_numpy(gemm_w * np.float32(alpha)))
    assert torch.equal(model.classifier[1].bias, torch.from_numpy(gemm_b.reshape(5) * np.float32(beta)))


def test_onnx_batchnorm_layers_are_named_as_not_read(tmp_path):
    """Only conv and dense weights are read: a file whose convs feed BatchNormalization says so."""
    ones = np.ones(4, np.float32)
    inits = [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")] + [
        numpy_helper.from_array(ones, n) for n in ("s", "b", "m", "v")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 3])], initializer=inits)
    path = tmp_path / "bn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.warns(UserWarning, match="1 BatchNormalization layer.*only conv and dense weights are read"):
        assert len(importers.read_layers(path).convs) == 1


# ------------------------------------------------------------- hostile HDF5 files
SECRET = np.full((3, 3, 3, 4), 7.25, np.float32)  # bytes of "another file" that must never become weights


def _secret_file(tmp_path) -> Path:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as fh:
        fh["k"] = SECRET
    return other


def _hostile_h5(tmp_path, case: str) -> Path:
    """A small Keras-2 style file, made hostile in one way."""
    path = tmp_path / f"{case}.h5"
    conv = np.zeros((3, 3, 3, 4), np.float32)
    with h5py.File(path, "w") as fh:
        fh.attrs["layer_names"] = [b"conv"]
        group = fh.create_group("conv/conv")
        if case == "external_link_relative":
            _secret_file(tmp_path)
            group["kernel:0"] = h5py.ExternalLink("other.h5", "/k")
        elif case == "external_link_absolute":
            group["kernel:0"] = h5py.ExternalLink(str(_secret_file(tmp_path)), "/k")
        elif case == "external_group_link":
            _secret_file(tmp_path)
            fh["conv"]["linked"] = h5py.ExternalLink("other.h5", "/")
        elif case == "soft_link":
            group["kernel:0"] = conv
            group["again"] = h5py.SoftLink("/conv/conv/kernel:0")
        elif case == "external_storage":
            raw = tmp_path / "raw.bin"
            raw.write_bytes(SECRET.tobytes())
            group.create_dataset("kernel:0", shape=SECRET.shape, dtype=np.float32,
                                 external=[(str(raw), 0, SECRET.nbytes)])
        elif case == "virtual":
            other = _secret_file(tmp_path)
            layout = h5py.VirtualLayout(shape=SECRET.shape, dtype=np.float32)
            layout[...] = h5py.VirtualSource(str(other), "k", shape=SECRET.shape)
            group.create_virtual_dataset("kernel:0", layout)
        elif case == "huge_declared":  # 2^40 values, chunked and compressed, nothing written
            group.create_dataset("kernel:0", shape=(1 << 10, 1 << 10, 1 << 10, 1 << 10), dtype=np.float32,
                                 chunks=(1, 1, 64, 64), compression="gzip")
        elif case == "compressed_gigabyte":  # 1 GiB of zeros in a few MB
            group.create_dataset("kernel:0", shape=(16384, 16384), dtype=np.float32, chunks=(1024, 1024),
                                 compression="gzip", fillvalue=0.0)
        elif case in ("complex", "string", "compound", "bool"):
            dtype = {"complex": np.complex64, "string": h5py.string_dtype(), "bool": np.bool_,
                     "compound": np.dtype([("a", np.float32), ("b", np.int8)])}[case]
            group.create_dataset("kernel:0", shape=(3, 3, 3, 4), dtype=dtype)
        elif case in ("nan", "inf"):
            bad = conv.copy()
            bad[0, 0, 0, 0] = np.nan if case == "nan" else np.inf
            group["kernel:0"] = bad
        elif case == "layer_names_int":
            group["kernel:0"] = conv
            fh.attrs["layer_names"] = 5
        elif case == "layer_names_not_utf8":
            group["kernel:0"] = conv
            fh.attrs["layer_names"] = np.array([b"\xff\xfe"], dtype="S2")
        elif case == "layer_names_slash":
            group["kernel:0"] = conv
            fh.attrs["layer_names"] = [b"/"] * 100
        elif case == "dataset_for_group":
            del fh["conv"]
            fh["conv"] = conv
        elif case == "group_name_not_utf8":
            group.create_group(b"\xfe")["kernel:0"] = conv
        else:
            raise AssertionError(case)
    return path


HOSTILE_H5 = {
    "external_link_relative": "is a link to another file (other.h5)",
    "external_link_absolute": "is a link to another file",
    "external_group_link": "is a link to another file",
    "soft_link": "is a SoftLink; only plain groups and datasets are read",
    "external_storage": "is stored in an external file",
    "virtual": "is virtual",
    "huge_declared": "declares 1099511627776 values",
    "compressed_gigabyte": "declares 268435456 values",
    "complex": "holds complex values",
    "string": "not real numbers",
    "compound": "not real numbers",
    "bool": "not real numbers",
    "nan": "holds NaN or infinite values",
    "inf": "holds NaN or infinite values",
    "layer_names_int": "'layer_names' must be a list of names",
    "layer_names_not_utf8": "not UTF-8",
    "layer_names_slash": "holds '/', not a layer name",
    "dataset_for_group": "is a dataset, not a group of weights",
    "group_name_not_utf8": "a group or dataset name is not UTF-8",
}


def _refused_with_one_line(path: Path, needle: str) -> None:
    with pytest.raises(UserError) as info:
        importers.read_layers(path)
    message = str(info.value)
    assert needle in message and "\n" not in message and str(path) in message


@pytest.mark.parametrize("case", list(HOSTILE_H5))
def test_hostile_keras_files_are_refused_with_one_line(tmp_path, case):
    """Each was followed silently (weights from another file), a traceback, or accepted with bad values."""
    _refused_with_one_line(_hostile_h5(tmp_path, case), HOSTILE_H5[case])


def test_hostile_keras_file_through_the_cli_reads_nothing_else(tmp_path, capsys):
    """End to end: exit 2, one line, no model written, and the other file's values never loaded."""
    import main

    path = _hostile_h5(tmp_path, "external_link_relative")
    train = tmp_path / "data"
    from conftest import make_image_folder

    train_dir, _ = make_image_folder(train, n_train=2, n_test=1, size=models.MIN_IMAGE_SIZE["alexnet"])
    code = main.run(["--train", "--arch", "alexnet", "--weights", str(path), "--train_path", str(train_dir),
                     "--model", str(tmp_path / "model"), "--quiet", "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {path}: /conv/conv/kernel:0 is a link to another file (other.h5); weights are read from the given "
        f"file only"]
    assert not (tmp_path / "model").exists()


# -------------------------------------------------------------- hostile ONNX files
def _weight_tensor(name="W", dims=(4, 3, 3, 3), data_type=TensorProto.FLOAT, raw: bytes | None = None):
    tensor = TensorProto(name=name, data_type=data_type)
    tensor.dims.extend(dims)
    if raw is None:
        raw = np.zeros(dims, np.float32).tobytes()
    tensor.raw_data = raw
    return tensor


def _hostile_onnx(tmp_path, case: str) -> Path:
    """A graph x -> Conv(W) -> y, made hostile in one way."""
    nodes, inits, weight = [], [], "W"
    conv_outputs = ["y"]
    if case == "huge_dims":
        inits.append(_weight_tensor(dims=(1 << 10,) * 4, raw=bytes(16)))
    elif case == "raw_short":
        inits.append(_weight_tensor(raw=bytes(10)))
    elif case == "raw_long":
        inits.append(_weight_tensor(raw=bytes(4 * 108 + 4)))
    elif case == "zero_dim_with_data":
        inits.append(_weight_tensor(dims=(4, 0, 3, 3), raw=bytes(64)))
    elif case in ("string", "undefined", "unknown", "complex", "bool"):
        code = {"string": TensorProto.STRING, "undefined": 0, "unknown": 999, "complex": TensorProto.COMPLEX64,
                "bool": TensorProto.BOOL}[case]
        inits.append(_weight_tensor(data_type=code, raw=bytes(8 * 108)))
    elif case == "nan":
        values = np.zeros((4, 3, 3, 3), np.float32)
        values[0, 0, 0, 0] = np.nan
        inits.append(numpy_helper.from_array(values, "W"))
    elif case in ("perm_repeats", "perm_too_short"):
        inits.append(numpy_helper.from_array(np.zeros((3, 3, 3, 4), np.float32), "W_hwio"))
        perm = [3, 3, 0, 1] if case == "perm_repeats" else [1, 0]
        nodes.append(helper.make_node("Transpose", ["W_hwio"], ["W"], perm=perm, name="to_oihw"))
    elif case == "no_output":
        inits.append(_weight_tensor())
        conv_outputs = []
    else:
        raise AssertionError(case)
    nodes.append(helper.make_node("Conv", ["x", weight], conv_outputs, name="conv"))
    graph = helper.make_graph(nodes, "hostile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    path = tmp_path / f"{case}.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


HOSTILE_ONNX = {
    "huge_dims": "declares 1099511627776 values; refused before reading",
    "raw_short": "declares 108 values but holds 10 bytes",
    "raw_long": "declares 108 values but holds 436 bytes",
    "zero_dim_with_data": "declares 0 values but holds 64 bytes",
    "string": "holds STRING values, not real numbers",
    "undefined": "holds UNDEFINED values",
    "unknown": "holds type 999 values",
    "complex": "holds COMPLEX64 values",
    "bool": "holds BOOL values",
    "nan": "holds NaN or infinite values",
    "perm_repeats": "perm [3, 3, 0, 1] is not a permutation of 4 axes",
    "perm_too_short": "perm [1, 0] is not a permutation of 4 axes",
    "no_output": "Conv node 'conv' has no output",
}


@pytest.mark.parametrize("case", list(HOSTILE_ONNX))
def test_hostile_onnx_files_are_refused_with_one_line(tmp_path, case):
    """Each was a Python traceback (numpy allocation, size or dtype errors, IndexError) or accepted."""
    _refused_with_one_line(_hostile_onnx(tmp_path, case), HOSTILE_ONNX[case])


@pytest.mark.parametrize("case", ["cycle", "identity_chain"])
def test_onnx_graph_walks_are_iterative(tmp_path, case):
    """A cycle between nodes and a chain of 100,000 Identity nodes were RecursionErrors."""
    inits = [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "W0")]
    if case == "cycle":
        nodes = [helper.make_node("Identity", ["B"], ["W"]), helper.make_node("Identity", ["W"], ["B"])]
    else:
        nodes = [helper.make_node("Identity", [f"W{i}"], [f"W{i + 1}"]) for i in range(100_000)]
        nodes[-1].output[0] = "W"
    nodes.append(helper.make_node("Conv", ["x", "W"], ["y"], name="conv"))
    graph = helper.make_graph(nodes, "walk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    path = tmp_path / f"{case}.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    convs = importers.read_layers(path).convs
    if case == "cycle":
        assert convs == []  # not a weight: no constant behind it
    else:
        assert len(convs) == 1 and torch.equal(convs[0].weight, torch.ones(4, 3, 3, 3))
