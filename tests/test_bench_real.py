"""benchmarks/bench_real.py and bench_inference.py run end to end on tiny settings."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from conftest import REPO_ROOT, make_image_folder

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_inference  # noqa: E402
import decompositions  # noqa: E402
import ranks as ranks_module  # noqa: E402
import bench_real  # noqa: E402

ROW_FIELDS = {"method", "acc_decomposed", "acc_finetuned", "params", "params_ratio", "macs", "macs_ratio",
              "macs_224", "decompose_s", "finetune_s", "layers"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    make_image_folder(root / "data", n_train=6, n_test=4, size=32)
    out = root / "out"
    payload = bench_real.main([
        str(root / "data"), "--archs", "alexnet", "--image_size", "63", "--epochs", "1", "--ft_epochs", "1",
        "--batch_size", "6", "--train_per_class", "5", "--ranks", "ratio", "--rank_ratio", "0.25",
        "--fc_rank_ratio", "0.01",
        "--cp_max_iter", "5", "--latency_backends", "eager,onnx", "--latency_sizes", "63", "--latency_repeats", "1",
        "--out_dir", str(out), "--quiet"])
    return payload, out


def test_outputs_exist_and_json_has_every_field(tiny_run):
    payload, out = tiny_run
    for suffix in ("json", "md", "png"):
        assert (out / f"bench_real.{suffix}").stat().st_size > 0
    assert (out / "bench_real.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "bench_real.json").read_text())
    res = data["archs"]["alexnet"]
    assert res["image_size"] == 63 and res["n_train"] == 10 and res["n_test"] == 8  # 5 of 6 per class
    assert 0.0 <= res["acc_original"] <= 1.0
    assert [r["method"] for r in res["rows"]] == ["original", "tucker", "cp", "tucker+svd"]
    for row in res["rows"]:
        assert ROW_FIELDS <= set(row)
        assert row["params"] > 0 and row["macs"] > 0
        if row["method"] != "original":
            assert 0.0 <= row["acc_decomposed"] <= 1.0 and 0.0 <= row["acc_finetuned"] <= 1.0
            assert row["macs_ratio"] > 1 and row["params_ratio"] > 1
            assert row["decompose_s"] > 0 and row["finetune_s"] > 0
            assert row["finetune_lr"] == pytest.approx(res["training"]["lr"] * bench_real.FT_LR_FACTOR[row["method"]])
    svd = res["rows"][3]
    assert any(layer["method"] == "svd" for layer in svd["layers"])
    assert svd["params_ratio"] > res["rows"][1]["params_ratio"]  # the FC SVD shrinks it further
    # The first conv is never decomposed.
    assert all(layer["skipped"] for layer in svd["layers"] if layer["name"] == "features.0")
    for name in ("original", "tucker", "cp", "tucker+svd"):
        for backend in ("eager", "onnx"):
            assert set(res["latency"][name][backend]["63"]) == {"1", "8"}
            assert all(v > 0 for v in res["latency"][name][backend]["63"].values())
    assert res["ranks"]["conv_source"] == "ratio" and data["settings"]["archs"] == ["alexnet"]
    assert res["training"]["lr"] == bench_real.TRAIN_LR["alexnet"]
    table = (out / "bench_real.md").read_text()
    assert "| alexnet | tucker+svd | 63 |" in table and "eager backend" in table


class SmallNet(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(width * 64, 64), nn.ReLU(), nn.Linear(64, 2))

    def forward(self, x):
        return self.classifier(self.features(x))


def test_choose_ranks_falls_back_when_vbmf_sees_only_noise():
    torch.manual_seed(0)
    net = SmallNet()  # random weights: EVBMF finds only noise
    ranks = bench_real.choose_ranks(net, input_size=(3, 8, 8), rank_ratio=0.5, fc_rank_ratio=0.25,
                                    skip=["features.0"])
    assert ranks["conv_source"] == "ratio" and "noise" in ranks["conv_reason"]
    assert ranks["tucker"] == {"features.2": (8, 8), "features.4": (8, 8)}
    assert ranks["cp"] == {"features.2": 8, "features.4": 8}
    assert ranks["fc_source"] == "ratio" and ranks["svd"] == {"classifier.1": 16}


def test_choose_ranks_uses_vbmf_on_low_rank_weights():
    torch.manual_seed(0)
    net = SmallNet(width=48)
    with torch.no_grad():
        for name in ("features.2", "features.4"):
            conv = net.get_submodule(name)
            # A Tucker rank-(3, 3) weight plus faint noise: EVBMF recovers rank 3 on both modes.
            core = torch.randn(3, 3, 3, 3)
            u_out, u_in = torch.linalg.qr(torch.randn(48, 3))[0], torch.linalg.qr(torch.randn(48, 3))[0]
            conv.weight.copy_(torch.einsum("oihw,to,si->tshw", core, u_out, u_in) + 1e-4 * torch.randn(48, 48, 3, 3))
    ranks = bench_real.choose_ranks(net, input_size=(3, 8, 8), skip=["features.0"])
    assert ranks["conv_source"] == "vbmf", ranks["conv_reason"]
    for name in ("features.2", "features.4"):  # exactly VBMF's estimates, well below full rank
        estimate = tuple(ranks_module.estimate_tucker_ranks(net.get_submodule(name)))
        assert ranks["tucker"][name] == estimate and max(estimate) < 24
        assert ranks["cp"][name] == max(estimate)
    forced = bench_real.choose_ranks(net, input_size=(3, 8, 8), policy="ratio", rank_ratio=0.5, skip=["features.0"])
    assert forced["tucker"]["features.2"] == (24, 24) and forced["vbmf_conv"] is None


def test_default_archs_and_learning_rates(tmp_path):
    # From scratch the BatchNorm VGGs stand in for plain VGG; with ImageNet weights the archs.
    assert bench_real.parse_args([]).archs == list(bench_real.SCRATCH_ARCHS)
    assert bench_real.parse_args(["--weights_dir", str(tmp_path)]).archs == list(bench_real.PRETRAINED_ARCHS)
    assert bench_real.parse_args(["--quick"]).archs == ["vgg16_bn"]
    # --quick never overwrites a full run's results
    assert bench_real.parse_args([]).out_dir == str(bench_real.DEFAULT_OUT)
    assert bench_real.parse_args(["--quick"]).out_dir == str(bench_real.DEFAULT_OUT / "quick")
    assert bench_real.parse_args(["--quick", "--weights_dir", str(tmp_path)]).archs == ["vgg16"]
    assert bench_real.parse_args(["--archs", "alexnet,vgg19"]).archs == ["alexnet", "vgg19"]
    assert bench_real.train_lr("alexnet") == bench_real.TRAIN_LR["alexnet"]
    assert bench_real.train_lr("vgg19_bn") == bench_real.train_lr("vgg16") == bench_real.TRAIN_LR["vgg"]
    assert bench_real.FT_LR_FACTOR["cp"] < bench_real.FT_LR_FACTOR["tucker"] <= 1.0


def test_bench_inference_quick(tmp_path, capsys):
    out = tmp_path / "inference.json"
    # eager only: exporting VGG16 to ONNX costs the suite ~10 s; the ONNX path is test_inference's.
    bench_inference.main(["--quick", "--image_size", "32", "--batch_size", "1", "--backends", "eager",
                         "--repeats", "1", "--warmup", "0", "--quiet", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| eager |" in printed and "speedup" in printed
    data = json.loads(out.read_text())
    assert [r["backend"] for r in data["rows"]] == ["eager"]
    assert data["macs"]["original"] > data["macs"]["decomposed_padded"] >= data["macs"]["decomposed"]
    for row in data["rows"]:
        assert row["original_ms"] > 0 and row["decomposed_ms"] > 0
        assert row["speedup"] == pytest.approx(row["original_ms"] / row["decomposed_ms"])
        assert row["mac_ratio"] == pytest.approx(data["mac_ratio"]) and row["max_rel_diff"] < 1e-4
    # ranks (out // 3, in // 3) on convs 2-13, the first conv kept
    layers = {r["name"]: r for r in data["layers"]}
    assert layers["features.0"]["skipped"] and tuple(layers["features.2"]["ranks"]) == (21, 21)
    assert tuple(layers["features.28"]["ranks"]) == (170, 170)


def test_latency_from_rebuilds_the_models_and_keeps_the_accuracies(tiny_run, tmp_path):
    payload, out = tiny_run
    again = bench_real.main(["--latency_from", str(out / "bench_real.json"), "--latency_backends", "eager",
                             "--latency_repeats", "1", "--out_dir", str(tmp_path), "--quiet"])
    res, before = again["archs"]["alexnet"], payload["archs"]["alexnet"]
    assert [r["acc_finetuned"] for r in res["rows"]] == [r["acc_finetuned"] for r in before["rows"]]
    for name in ("original", "tucker", "cp", "tucker+svd"):
        assert all(v > 0 for v in res["latency"][name]["eager"]["63"].values())
    assert again["latency_machine"]["cpu_count"] >= 1 and again["settings"]["latency_from"].endswith(".json")
    assert json.loads((tmp_path / "bench_real.json").read_text())["settings"]["latency_backends"] == ["eager"]
    # The rebuilt models have exactly the decomposed structure of the run's.
    svd = next(r for r in before["rows"] if r["method"] == "tucker+svd")
    plan = bench_real.plan_from_layers(svd["layers"])
    assert {e["method"] for e in plan.values()} == {"tucker", "svd"} and "features.0" not in plan


def test_trained_weights_run_over_seeds(tmp_path):
    """--weights FILE (an ONNX conv stack) with two seeds: the tool's learning rates, the seed summary."""
    torch.manual_seed(0)
    onnx_file = tmp_path / "alexnet_convs.onnx"
    torch.onnx.export(nn.Sequential(bench_real.models.torchvision.models.alexnet(weights=None).features).eval(),
                      torch.randn(1, 3, 63, 63), str(onnx_file), dynamo=False)
    make_image_folder(tmp_path / "data", n_train=4, n_test=2, size=32)
    payload = bench_real.main([
        str(tmp_path / "data"), "--weights", str(onnx_file), "--archs", "alexnet", "--image_size", "63",
        "--seeds", "0,1", "--epochs", "1", "--ft_epochs", "1", "--batch_size", "8", "--ranks", "ratio",
        "--rank_ratio", "0.25", "--fc_rank_ratio", "0.01", "--cp_max_iter", "3", "--latency_backends", "",
        "--out_dir", str(tmp_path / "out"), "--quiet"])
    res = payload["archs"]["alexnet"]
    assert res["training"]["source"] == "trained weights" and res["training"]["pretrained_tensors"] == 10
    assert res["training"]["lr"] == bench_real.main_cli.DEFAULT_LR["train"]
    lrs = {r["method"]: r["finetune_lr"] for r in res["rows"][1:]}
    assert lrs == {"tucker": 0.001, "cp": 0.0001, "tucker+svd": 0.001}
    assert [r["seed"] for r in res["seed_runs"]] == [0, 1]
    summary = res["summary"]
    for method, entry in summary["methods"].items():
        accs = [next(x for x in r["rows"] if x["method"] == method)["acc_finetuned"] for r in res["seed_runs"]]
        assert entry["acc_finetuned"]["mean"] == pytest.approx(sum(accs) / 2)
        assert entry["acc_finetuned"]["n"] == 2
    table = (tmp_path / "out" / "bench_real.md").read_text()
    assert "Over seeds" in table and "| alexnet | tucker+svd | 0,1 |" in table


def test_trained_weights_defaults(tmp_path):
    weights = tmp_path / "w.onnx"
    weights.write_bytes(b"x")
    args = bench_real.parse_args(["--weights", str(weights)])
    assert args.archs == list(bench_real.TRAINED_ARCHS) and args.seeds == list(bench_real.TRAINED_SEEDS)
    assert args.fc_ranks == "ratio" and args.out_dir == str(bench_real.TRAINED_OUT)
    assert bench_real.parse_args(["--weights", str(weights), "--quick"]).seeds == [0]
    with pytest.raises(SystemExit):
        bench_real.parse_args(["--weights", str(tmp_path / "missing.onnx")])


def test_bench_rescale_variants_touch_the_layers_they_name():
    import bench_rescale

    torch.manual_seed(0)
    net = SmallNet(width=16)
    ranks = bench_real.choose_ranks(net, input_size=(3, 8, 8), policy="ratio", rank_ratio=0.25, fc_rank_ratio=0.05,
                                    skip=["features.0"])
    plain, _, _ = bench_real.decompose(net, "tucker+svd", ranks, input_size=(3, 8, 8), skip=["features.0"],
                                       cp_max_iter=3, seed=0, rescale=False)

    def norms(model, name):
        return decompositions.dense_weight(model.get_submodule(name)).flatten(1).norm(dim=1)

    out = {v: bench_rescale.corrected(plain, net, v) for v in bench_rescale.VARIANTS}
    for name in ("features.2", "classifier.1"):
        original = net.get_submodule(name).weight.flatten(1).norm(dim=1)
        torch.testing.assert_close(norms(out["none"], name), norms(plain, name))
        torch.testing.assert_close(norms(out["uncapped"], name), original.detach())
        capped = torch.minimum(original, decompositions.MAX_FILTER_SCALE * norms(plain, name))
        torch.testing.assert_close(norms(out["capped"], name), capped.detach())
    torch.testing.assert_close(norms(out["conv"], "classifier.1"), norms(plain, "classifier.1"))
    torch.testing.assert_close(norms(out["conv"], "features.2"), norms(out["capped"], "features.2"))
