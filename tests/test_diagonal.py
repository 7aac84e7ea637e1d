"""Tests for diagonal.py's anneal_to_masks: the mask schedule (a finetune.fit hook) that moves
dense Linear layers onto the wrapped banded-diagonal structure of diagonal.DiagonalLinear.

A tiny MLP on 4x4 RGB images (48 inputs) from conftest's synthetic folder (class =
which half of the image holds the bright band), CPU only; includes a two-process
DistributedDataParallel run over gloo.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchvision import transforms
from torchvision.datasets import ImageFolder

import decompositions
import finetune
from conftest import decompose, make_image_folder, spawn_and_wait
import diagonal
import runtime
from diagonal import anneal_lr_factor, anneal_to_masks, mask_factor, project_to_masks
from finetune import Recipe, evaluate, fit

CPU = torch.device("cpu")
IMAGE_SIZE = 4            # 3 x 4 x 4 = 48 inputs
IN_FEATURES = 3 * IMAGE_SIZE * IMAGE_SIZE
HIDDEN = 32
N_PER_CLASS = 48
BATCH = 16
LR = 0.05
BANDWIDTH = 1
DENSE_EPOCHS = 5
ANNEAL_EPOCHS = 4
FIRST = "1"               # qualified name of the Linear(48, 32) in the Sequential
DIST_WORLD_SIZE = 2
DIST_TIMEOUT_S = 120


def tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2))


def folder_tensors(root) -> TensorDataset:
    """The synthetic training images as one (N, 3, 4, 4) tensor, no augmentation."""
    train_dir, _ = make_image_folder(root, n_train=N_PER_CLASS, n_test=0, size=IMAGE_SIZE, seed=0)
    images = ImageFolder(str(train_dir), transform=transforms.ToTensor())
    inputs = torch.stack([images[i][0] for i in range(len(images))])
    return TensorDataset(inputs, torch.tensor(images.targets))


def loader(data: TensorDataset, seed: int = 0) -> DataLoader:
    return DataLoader(data, batch_size=BATCH, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def structure_mask(layer: nn.Linear, bandwidth: int = BANDWIDTH) -> torch.Tensor:
    """(out, in) bool pattern of DiagonalLinear for this layer's shape."""
    return decompositions.DiagonalLinear(layer.in_features, layer.out_features,
                                         bandwidth=bandwidth).dense_mask().bool()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TensorDataset:
    return folder_tensors(tmp_path_factory.mktemp("anneal") / "data")


@pytest.fixture(scope="module")
def trained(data) -> nn.Sequential:
    """The dense model, trained to solve the task (the starting point of every test)."""
    model = tiny_model()
    fit(model, loader(data), recipe=Recipe(epochs=DENSE_EPOCHS, lr=LR), device=CPU, show_progress=False)
    assert evaluate(model, loader(data), device=CPU, show_progress=False)["acc"] == 1.0
    return model


@pytest.fixture(scope="module")
def annealed(trained, data):
    """(model, result, first-layer weight Parameter before annealing, its values)."""
    model = copy.deepcopy(trained)
    weight = model[1].weight
    before = weight.detach().clone()
    torch.manual_seed(0)
    result = anneal_to_masks(model, loader(data), layers=[FIRST], bandwidth=BANDWIDTH,
                             epochs=ANNEAL_EPOCHS, lr=LR, device=CPU, show_progress=False)
    return model, result, weight, before


# ------------------------------------------------------------------------ schedules


def test_mask_factor_falls_from_one_to_zero_and_stays():
    for schedule in diagonal.ANNEAL_SCHEDULES:
        values = [mask_factor(t, decay_steps=10, schedule=schedule) for t in range(15)]
        assert values[0] == 1.0
        assert all(a > b for a, b in zip(values[:10], values[1:11])), schedule
        assert values[10:] == [0.0] * 5, schedule
    assert mask_factor(5, decay_steps=10, schedule="cosine") == pytest.approx(0.5)
    assert mask_factor(3, decay_steps=10, schedule="linear") == pytest.approx(0.7)
    with pytest.raises(ValueError, match="'step'"):
        mask_factor(1, decay_steps=10, schedule="step")


def test_anneal_lr_factor_warms_up_holds_then_decays():
    factors = [anneal_lr_factor(t, warmup_steps=2, decay_steps=6, total_steps=10) for t in range(10)]
    assert factors[0] < factors[1] < factors[2] == 1.0
    assert factors[2:7] == [1.0] * 5  # full learning rate while the mask still moves
    assert all(a > b for a, b in zip(factors[6:], factors[7:]))
    assert factors[-1] < 0.2  # reaches 0 at step 10, after the last step


# ------------------------------------------------------------------ the procedure


def test_off_structure_entries_are_exactly_zero_and_layers_are_plain(annealed):
    model, result, weight, _ = annealed
    layer = model[1]
    assert type(layer) is nn.Linear and "forward" not in vars(layer)
    assert not parametrize.is_parametrized(layer)
    # The same Parameter object: optimizers and DDP wrappers built before stay valid.
    assert layer.weight is weight
    mask = structure_mask(layer)
    assert torch.count_nonzero(layer.weight.detach()[~mask]) == 0
    assert torch.count_nonzero(layer.weight.detach()[mask]) > 0
    assert set(model.state_dict()) == set(tiny_model().state_dict())
    # The classifier was not named, so it stays dense.
    assert torch.count_nonzero(model[3].weight.detach()) == model[3].weight.numel()
    assert result["off_mass"] == {FIRST: 0.0}
    assert result["bandwidth"] == {FIRST: BANDWIDTH}


def test_conversion_after_annealing_is_exact(annealed, data):
    model, _, _, _ = annealed
    model = copy.deepcopy(model).eval()
    inputs = data.tensors[0]
    with torch.no_grad():
        dense_out = model(inputs)
    rows = decompose(model, (3, IMAGE_SIZE, IMAGE_SIZE), conv="none", fc="diagonal", fc_bandwidth=BANDWIDTH)
    assert isinstance(model[1], decompositions.DiagonalLinear)
    assert isinstance(model[3], nn.Linear)  # the classifier is kept dense
    row = next(r for r in rows if r.name == FIRST)
    assert not row.skipped and row.error == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        structured_out = model(inputs)
    torch.testing.assert_close(structured_out, dense_out, rtol=1e-5, atol=1e-6)
    assert torch.equal(structured_out.argmax(1), dense_out.argmax(1))


def test_off_structure_mass_decays_over_the_schedule(annealed):
    _, result, _, _ = annealed
    history = result["history"]
    assert len(history) == ANNEAL_EPOCHS
    factors = [r["factor"] for r in history]
    assert all(a >= b for a, b in zip(factors, factors[1:])) and factors[-1] == 0.0
    masses = [result["initial_off_mass"][FIRST]] + [r["off_mass"][FIRST] for r in history]
    # A dense layer has almost all its mass off a 1-wide diagonal (48 of 1536 entries).
    assert masses[0] > 0.9
    assert all(a >= b - 1e-6 for a, b in zip(masses, masses[1:])), masses
    assert masses[-1] == 0.0
    # The factor only hides the off-structure weights; they are cut at the very end.
    assert 0 < result["raw_off_mass"][FIRST] <= 1
    for record in history:
        assert math.isfinite(record["train_loss"]) and 0 <= record["train_acc"] <= 1
        assert record["test_loss"] is None and record["seconds"] > 0
    assert result["steps"] == ANNEAL_EPOCHS * math.ceil(2 * N_PER_CLASS / BATCH)


def test_gradients_flow_during_and_after_annealing(annealed, data):
    model, _, _, before = annealed
    layer = model[1]
    mask = structure_mask(layer)
    # On-structure entries were trained through the masked forward.
    assert not torch.allclose(layer.weight.detach()[mask], before[mask])
    inputs, targets = data.tensors
    model.zero_grad()
    nn.functional.cross_entropy(model(inputs), targets).backward()
    grad = layer.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad()

    converted = copy.deepcopy(model)
    decompose(converted, (3, IMAGE_SIZE, IMAGE_SIZE), conv="none", fc="diagonal", fc_bandwidth=BANDWIDTH)
    nn.functional.cross_entropy(converted(inputs), targets).backward()
    grad = converted[1].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_annealing_beats_direct_projection(trained, annealed, data):
    """Annealed-then-converted vs diagonal_decompose_linear of the trained dense layer.

    Both end as the same structured model; the projection drops ~97% of the first
    layer's weight mass at once, the schedule lets the network adapt while it goes.
    """
    eval_loader = DataLoader(data, batch_size=len(data))
    projected = copy.deepcopy(trained)
    projected[1] = decompositions.diagonal_decompose_linear(trained[1], bandwidth=BANDWIDTH)
    converted = copy.deepcopy(annealed[0])
    converted[1] = decompositions.diagonal_decompose_linear(converted[1], bandwidth=BANDWIDTH)
    proj = evaluate(projected, eval_loader, device=CPU, show_progress=False)
    ann = evaluate(converted, eval_loader, device=CPU, show_progress=False)
    assert ann["loss"] < proj["loss"]
    assert ann["acc"] >= proj["acc"]


def test_rescale_moves_the_rows_mass_onto_the_structure(trained, annealed, data):
    """Default rescale: the on-structure entries grow (gain > 1); rescale=False: gain 1."""
    model, result, _, before = annealed
    assert result["gain"][FIRST] > 2  # ~97% of each row's mass is off a 1-wide band
    mask = structure_mask(model[1])
    assert model[1].weight.detach()[mask].norm() > 2 * before[mask].norm()
    plain = anneal_to_masks(copy.deepcopy(trained), loader(data), layers=[FIRST], bandwidth=BANDWIDTH,
                            epochs=1, lr=LR, device=CPU, show_progress=False, rescale=False)
    assert plain["gain"] == {FIRST: 1.0}


def test_project_to_masks_without_rescale_is_the_plain_projection(trained):
    model = copy.deepcopy(trained)
    result = project_to_masks(model, layers=[FIRST], bandwidth=3, rescale=False)
    expected = decompositions.diagonal_decompose_linear(trained[1], bandwidth=3).to_dense()
    assert torch.equal(model[1].weight.detach(), expected)
    assert result["gain"] == {FIRST: 1.0} and result["bandwidth"] == {FIRST: 3}
    assert result["initial_off_mass"][FIRST] > 0.8


def test_project_to_masks_with_rescale_keeps_row_norms(trained, data):
    model = copy.deepcopy(trained)
    weight = model[1].weight
    result = project_to_masks(model, layers=[FIRST], bandwidth=3)
    assert model[1].weight is weight and type(model[1]) is nn.Linear
    mask = structure_mask(model[1], 3)
    assert torch.count_nonzero(weight.detach()[~mask]) == 0
    torch.testing.assert_close(weight.detach().norm(dim=1), trained[1].weight.detach().norm(dim=1))
    assert result["gain"][FIRST] > 1
    # The conversion afterwards is exact here too.
    inputs = data.tensors[0]
    with torch.no_grad():
        dense_out = model(inputs)
        model[1] = decompositions.diagonal_decompose_linear(model[1], bandwidth=3)
        torch.testing.assert_close(model(inputs), dense_out, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="bandwidth.*got 0"):
        project_to_masks(copy.deepcopy(trained), layers=[FIRST], bandwidth=0)
    with pytest.raises(ValueError, match="'0' is a Flatten"):
        project_to_masks(copy.deepcopy(trained), layers=["0"], bandwidth=1)


def test_two_layers_and_a_wide_band(trained, data):
    """Both Linear layers at once; a band wider than the inputs means the full matrix."""
    model = copy.deepcopy(trained)
    result = anneal_to_masks(model, loader(data), layers=["1", "3"], bandwidth=40, epochs=1,
                             lr=LR, device=CPU, show_progress=False, schedule="linear",
                             hold_fraction=0.0)
    assert result["bandwidth"] == {"1": 40, "3": HIDDEN}  # min(b, in_features)
    assert result["initial_off_mass"]["3"] == 0.0  # Linear(32, 2) at b=32 is all structure
    for name in ("1", "3"):
        layer = model.get_submodule(name)
        mask = structure_mask(layer, result["bandwidth"][name])
        assert torch.count_nonzero(layer.weight.detach()[~mask]) == 0


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_path(trained, data, monkeypatch, amp_dtype):
    """The autocast (+ GradScaler for float16) path that CUDA takes, run on the CPU."""
    monkeypatch.setattr(runtime, "autocast_dtype_for", lambda device, **options: amp_dtype)
    model = copy.deepcopy(trained)
    result = anneal_to_masks(model, loader(data), layers=[FIRST], bandwidth=2, epochs=1, lr=LR,
                             device=CPU, show_progress=False)
    layer = model[1]
    assert layer.weight.dtype == torch.float32  # master weights stay in full precision
    assert torch.count_nonzero(layer.weight.detach()[~structure_mask(layer, 2)]) == 0
    assert math.isfinite(result["history"][-1]["train_loss"])


def test_test_loader_is_evaluated_each_epoch(trained, data):
    model = copy.deepcopy(trained)
    result = anneal_to_masks(model, loader(data), layers=[FIRST], bandwidth=BANDWIDTH, epochs=2,
                             lr=LR, device=CPU, show_progress=False,
                             test_loader=DataLoader(data, batch_size=32))
    final = evaluate(model, DataLoader(data, batch_size=32), device=CPU, show_progress=False)
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    assert all(0 <= r["test_acc"] <= 1 for r in result["history"])
    # The last evaluation already saw the factor at 0, so cutting changed nothing.
    assert result["history"][-1]["test_loss"] == pytest.approx(final["loss"], rel=1e-5)


def test_failure_restores_plain_linear_layers(trained, data):
    """A diverging run raises, and leaves plain Linear layers (no half-installed state)."""
    model = copy.deepcopy(trained)
    inputs, targets = data.tensors
    bad = inputs.clone()
    bad[BATCH:] = float("nan")  # the second batch onwards
    bad_loader = DataLoader(TensorDataset(bad, targets), batch_size=BATCH)
    with pytest.raises(finetune.NonFiniteLossError):
        anneal_to_masks(model, bad_loader, layers=[FIRST], bandwidth=BANDWIDTH, epochs=2, lr=LR,
                        device=CPU, show_progress=False)
    assert "forward" not in vars(model[1])
    assert set(model.state_dict()) == set(tiny_model().state_dict())
    assert torch.isfinite(model[1].weight).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": ["2"]}, r"'2' is a ReLU"),
        ({"layers": ["9"]}, r"'9' not found.*'1', '3'"),
        ({"layers": "1"}, r"sequence of layer names, got '1'"),
        ({"layers": []}, r"layers is empty"),
        ({"layers": ["1", "1"]}, r"'1' is named twice"),
        ({"bandwidth": 0}, r"bandwidth must be an integer >= 1, got 0"),
        ({"bandwidth": -3}, r"bandwidth.*got -3"),
        ({"bandwidth": 1.5}, r"bandwidth.*got 1.5"),
        ({"epochs": 0}, r"epochs must be an integer >= 1, got 0"),
        ({"lr": 0.0}, r"learning rate.*got 0.0"),
        ({"schedule": "step"}, r"schedule.*'cosine', 'linear'.*got 'step'"),
        ({"hold_fraction": 1.0}, r"hold_fraction.*got 1.0"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(trained, data, kwargs, match):
    model = copy.deepcopy(trained)
    options = {"layers": [FIRST], "bandwidth": BANDWIDTH, "epochs": 1, "lr": LR, **kwargs}
    with pytest.raises(ValueError, match=match):
        anneal_to_masks(model, loader(data), device=CPU, show_progress=False, **options)
    assert "forward" not in vars(model[1])  # nothing was installed
    assert torch.equal(model[1].weight, trained[1].weight)


def test_layer_with_a_replaced_forward_is_refused(trained, data):
    model = copy.deepcopy(trained)
    model[1].forward = lambda x: x
    with pytest.raises(ValueError, match="'1' already has a replaced forward"):
        anneal_to_masks(model, loader(data), layers=[FIRST], bandwidth=BANDWIDTH, epochs=1, lr=LR,
                        device=CPU, show_progress=False)


def test_linear_subclass_with_its_own_forward_is_refused(data):
    class Doubling(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = tiny_model()
    model[1] = Doubling(IN_FEATURES, HIDDEN)
    with pytest.raises(ValueError, match="'1' \\(Doubling\\) has its own forward"):
        anneal_to_masks(model, loader(data), layers=[FIRST], bandwidth=BANDWIDTH, epochs=1, lr=LR,
                        device=CPU, show_progress=False)


# --------------------------------------------------------------------- distributed


def _dist_worker(rank: int, world_size: int, port: int, out_dir: str, data: TensorDataset) -> None:
    """One torchrun-like worker: anneal a DDP-wrapped model on its shard, save the result."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)  # two processes on a small machine
    info, device = runtime.init_distributed(CPU)
    try:
        # Different seeds per rank: DDP broadcasts rank 0's weights at wrapping.
        model = nn.parallel.DistributedDataParallel(tiny_model(seed=10 + rank))
        sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
        train_loader = DataLoader(data, batch_size=8, sampler=sampler)
        result = anneal_to_masks(model, train_loader, layers=[FIRST], bandwidth=BANDWIDTH, epochs=3,
                                 lr=LR, device=device, show_progress=False, group=info.group)
        torch.save({"state": model.module.state_dict(), "result": result,
                    "plain": type(model.module[1]) is nn.Linear},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        runtime.cleanup_distributed()


def test_distributed_two_processes_agree(tmp_path, data):
    spawn_and_wait(_dist_worker, str(tmp_path), data, nprocs=DIST_WORLD_SIZE, timeout_s=DIST_TIMEOUT_S)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(DIST_WORLD_SIZE)]
    first, second = results[0]["state"], results[1]["state"]
    assert set(first) == set(tiny_model().state_dict())
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert results[0]["plain"] and results[1]["plain"]
    weight = first[f"{FIRST}.weight"]
    mask = decompositions.DiagonalLinear(IN_FEATURES, HIDDEN, bandwidth=BANDWIDTH).dense_mask().bool()
    assert torch.count_nonzero(weight[~mask]) == 0 and torch.count_nonzero(weight[mask]) > 0
    # Metrics are all-reduced, so both ranks log the same global numbers.
    histories = [[{k: v for k, v in record.items() if k != "seconds"}
                  for record in r["result"]["history"]] for r in results]
    assert histories[0] == histories[1]
    assert results[0]["result"]["off_mass"] == {FIRST: 0.0}
