"""Tests for finetune.py: tiny models, synthetic tensors, CPU only.

Includes a real two-process DistributedDataParallel run over gloo.
"""

import copy
import logging
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import finetune
from conftest import spawn_and_wait
from dataset import ShardSampler
from errors import UserError
from finetune import NonFiniteLossError, Recipe, evaluate, fit, train_one_epoch, warmup_cosine_factor
import runtime
from runtime import cleanup_distributed, init_distributed, seed_everything

CPU = torch.device("cpu")
NUM_CLASSES = 3
FEATURES = 8
DIST_WORLD_SIZE = 2
DIST_TRAIN_SIZE = 96
DIST_TEST_SIZE = 25  # odd on purpose: the ranks' shares differ (DistributedSampler would pad to 26)
DIST_TIMEOUT_S = 120


def blobs(n: int, *, seed: int = 0) -> TensorDataset:
    """Three well-separated Gaussian blobs in FEATURES dimensions (linearly separable)."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % NUM_CLASSES
    centres = 4.0 * torch.eye(NUM_CLASSES, FEATURES)
    inputs = centres[targets] + 0.5 * torch.randn(n, FEATURES, generator=gen)
    return TensorDataset(inputs, targets)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))


def tiny_convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, NUM_CLASSES),
    )


# -------------------------------------------------------------------- fit / train


def test_fit_learns_separable_problem(caplog):
    seed_everything(0)
    model = mlp()
    train = DataLoader(blobs(120), batch_size=16, shuffle=True)
    test = DataLoader(blobs(60, seed=1), batch_size=32)
    with caplog.at_level(logging.INFO, logger="finetune"):
        history = fit(model, train, test, recipe=Recipe(epochs=4, lr=0.1), device=CPU, show_progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert set(history[0]) == {"epoch", "lr", "train_loss", "train_acc", "test_loss",
                               "test_acc", "seconds", "restarts", "kept"}
    assert all(h["restarts"] == 0 for h in history)
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["train_acc"] >= 0.95
    assert history[-1]["test_acc"] >= 0.95
    # Cosine decay: the learning rate falls after the warm-up.
    assert history[-1]["lr"] < history[1]["lr"] <= 0.1
    epoch_lines = [r.getMessage() for r in caplog.records if "epoch" in r.getMessage()]
    assert len(epoch_lines) == 4 and "test loss" in epoch_lines[0]


def test_fit_on_conv_net_without_test_loader():
    seed_everything(0)
    gen = torch.Generator().manual_seed(0)
    targets = torch.arange(48) % NUM_CLASSES
    # Class c has a bright channel c: trivially learnable by conv + global pooling.
    images = 0.1 * torch.randn(48, 3, 8, 8, generator=gen)
    images[torch.arange(48), targets] += 1.0
    history = fit(tiny_convnet(), DataLoader(TensorDataset(images, targets), batch_size=8,
                                             shuffle=True),
                  recipe=Recipe(epochs=3, lr=0.2), device=CPU, show_progress=False)
    assert history[-1]["test_loss"] is None and history[-1]["test_acc"] is None
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_fit_leaves_frozen_parameters_untouched():
    seed_everything(0)
    model = mlp()
    model[0].requires_grad_(False)
    frozen = {k: v.clone() for k, v in model[0].state_dict().items()}
    trainable = model[2].weight.detach().clone()
    # Weight decay > 0 would shrink frozen weights too if they reached the optimizer.
    fit(model, DataLoader(blobs(48), batch_size=16), recipe=Recipe(epochs=2, lr=0.1, weight_decay=0.1), device=CPU,
        show_progress=False)
    for key, value in model[0].state_dict().items():
        assert torch.equal(value, frozen[key]), key
    assert not torch.equal(model[2].weight, trainable)


def test_fit_validates_arguments():
    model, loader = mlp(), DataLoader(blobs(12), batch_size=4)
    with pytest.raises(ValueError, match="epochs.*0"):
        fit(model, loader, recipe=Recipe(epochs=0, lr=0.1), device=CPU)
    with pytest.raises(ValueError, match="learning rate.*-0.5"):
        fit(model, loader, recipe=Recipe(epochs=1, lr=-0.5), device=CPU)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(model, loader, recipe=Recipe(epochs=1, lr=0.1), device=CPU)


def _train_with_seed(seed: int) -> dict:
    seed_everything(seed)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(16, NUM_CLASSES))
    loader = DataLoader(blobs(64), batch_size=8, shuffle=True)
    fit(model, loader, recipe=Recipe(epochs=2, lr=0.05), device=CPU, show_progress=False)
    return model.state_dict()


def test_same_seed_gives_identical_weights():
    first, second, other = _train_with_seed(7), _train_with_seed(7), _train_with_seed(8)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_train_one_epoch_metrics_are_sample_weighted():
    # With lr=0 the weights never change, so the epoch's training metrics must equal
    # evaluate()'s on the same data, even with a short last batch (10 = 4 + 4 + 2).
    seed_everything(0)
    model, loader = mlp(), DataLoader(blobs(10), batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train = train_one_epoch(model, loader, optimizer, device=CPU, epoch=1,
                            show_progress=False)
    test = evaluate(model, loader, device=CPU, show_progress=False)
    assert train["n"] == test["n"] == 10
    assert train["loss"] == pytest.approx(test["loss"], rel=1e-6)
    assert train["acc"] == test["acc"]


def test_non_finite_loss_raises_and_skips_the_update():
    model = mlp()
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    before = model[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite \(nan.*epoch 3, batch 0"):
        train_one_epoch(model, DataLoader(blobs(8), batch_size=4), optimizer, device=CPU,
                        epoch=3, show_progress=False)
    assert torch.equal(model[0].weight, before)
    assert issubclass(NonFiniteLossError, FloatingPointError)


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: native)
    assert runtime.autocast_dtype_for(CPU, cpu_bf16=True) == (torch.bfloat16 if native else None)
    assert runtime.autocast_dtype_for(CPU) is None


def test_fit_in_cpu_bf16_and_channels_last(monkeypatch):
    """Recipe(cpu_bf16, channels_last): the convs compute in bfloat16 on channels_last batches, the
    weights stay float32, the run learns, and the model comes back in the default layout."""
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: True)
    seed_everything(0)
    images = TensorDataset(torch.randn(32, 3, 8, 8) + torch.arange(2).repeat(16)[:, None, None, None] * 2,
                           torch.arange(2).repeat(16))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2))
    seen = []
    model[0].register_forward_hook(lambda m, a, out: seen.append((out.dtype, a[0].is_contiguous(
        memory_format=torch.channels_last), m.weight.is_contiguous(memory_format=torch.channels_last))))
    loader = DataLoader(images, batch_size=8, shuffle=True)
    history = fit(model, loader, loader, recipe=Recipe(epochs=3, lr=0.1, cpu_bf16=True, channels_last=True),
                  device=CPU, show_progress=False)
    assert seen and all(s == (torch.bfloat16, True, True) for s in seen)
    assert history[-1]["test_acc"] == 1.0
    assert model[0].weight.dtype == torch.float32 and model[0].weight.is_contiguous()
    # A run that fails gives the model back in the default layout too.
    x, y = next(iter(loader))
    with pytest.raises(AttributeError):  # the second batch is not a tensor
        fit(model, [(x, y), ("not a batch", y)], None, device=CPU, show_progress=False,
            recipe=Recipe(epochs=1, lr=0.1, cpu_bf16=True, channels_last=True))
    assert model[0].weight.is_contiguous()
    # Batches that are not images (an MLP's) keep their layout.
    assert len(fit(mlp(), DataLoader(blobs(16), batch_size=8), None, device=CPU, show_progress=False,
                   recipe=Recipe(epochs=1, lr=0.1, cpu_bf16=True, channels_last=True))) == 1


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_train_one_epoch_mixed_precision_path(amp_dtype):
    # The CUDA code path (autocast, GradScaler for float16) exercised on CPU.
    assert runtime.autocast_dtype_for(CPU) is None
    seed_everything(0)
    model, loader = mlp(), DataLoader(blobs(32), batch_size=8)
    before = model[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu") if amp_dtype == torch.float16 else None
    result = train_one_epoch(model, loader, optimizer, device=CPU, epoch=1, scaler=scaler,
                             amp_dtype=amp_dtype, show_progress=False)
    assert math.isfinite(result["loss"]) and result["n"] == 32
    assert model[0].weight.dtype == torch.float32  # autocast never casts the weights
    assert not torch.equal(model[0].weight, before)
    with pytest.raises(ValueError, match="amp_dtype.*float64"):
        train_one_epoch(model, loader, optimizer, device=CPU, epoch=1,
                        amp_dtype=torch.float64, show_progress=False)


def test_fit_raises_when_training_diverges():
    seed_everything(0)
    with pytest.raises(NonFiniteLossError, match="lower learning rate"):
        fit(mlp(), DataLoader(blobs(64), batch_size=8), recipe=Recipe(epochs=3, lr=1e30), device=CPU,
            show_progress=False)


def test_warmup_cosine_schedule_shape():
    kwargs = {"warmup_steps": 10, "total_steps": 100}
    factors = [warmup_cosine_factor(t, **kwargs) for t in range(100)]
    assert factors[0] == pytest.approx(finetune.WARMUP_START_FACTOR)
    assert all(a < b for a, b in zip(factors[:10], factors[1:11]))  # warm-up rises
    assert factors[10] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(factors[10:], factors[11:]))  # cosine falls
    assert 0 < factors[-1] < 0.01
    assert warmup_cosine_factor(100, **kwargs) == pytest.approx(finetune.FINAL_LR_FACTOR)
    assert warmup_cosine_factor(0, warmup_steps=0, total_steps=5) == pytest.approx(1.0)


# ------------------------------------------------------------------------ evaluate


class FixedLogits(nn.Module):
    """Returns its input as the logits, so predictions are known in advance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_evaluate_exact_accuracy_and_loss():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0],
                           [1.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 2.0, 0.0],
                           [4.0, 0.0, 0.0]])
    predictions = logits.argmax(dim=1)  # 0, 1, 2, 0, 2, 1, 0
    targets = torch.tensor([0, 1, 0, 0, 1, 1, 2])  # 4 of 7 right
    model = FixedLogits().train()
    result = evaluate(model, DataLoader(TensorDataset(logits, targets), batch_size=3),
                      device=CPU, show_progress=False)
    assert (predictions == targets).sum() == 4
    assert result["n"] == 7
    assert result["acc"] == pytest.approx(4 / 7)
    assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, targets).item())
    assert model.training  # previous mode restored


def test_evaluate_uses_eval_mode_and_no_grad():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["training"], seen["grad"] = self.training, torch.is_grad_enabled()
            return x

    evaluate(Probe(), DataLoader(TensorDataset(torch.eye(3), torch.arange(3))), device=CPU,
             show_progress=False)
    assert seen == {"training": False, "grad": False}


# --------------------------------------------------------------------- distributed


def _dist_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One torchrun-like worker: join the group, train a DDP model on its shard, save."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)  # two processes on a small machine
    info, device = init_distributed(CPU)
    try:
        # Different seeds per rank: DDP must broadcast rank 0's initial weights.
        seed_everything(100 + rank)
        model = nn.parallel.DistributedDataParallel(mlp().to(device))
        train_set, test_set = blobs(DIST_TRAIN_SIZE), blobs(DIST_TEST_SIZE, seed=1)
        train_sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank,
                                           shuffle=True, seed=0)
        test_sampler = ShardSampler(len(test_set), num_replicas=world_size, rank=rank)
        train_loader = DataLoader(train_set, batch_size=8, sampler=train_sampler)
        test_loader = DataLoader(test_set, batch_size=8, sampler=test_sampler)
        history = fit(model, train_loader, test_loader, recipe=Recipe(epochs=3, lr=0.1), device=device,
                      train_sampler=train_sampler, show_progress=False, group=info.group)
        result = evaluate(model, test_loader, device=device, show_progress=False, group=info.group)
        # Rank 0 alone, on the whole test set, with a process group present: group=None
        # must not reduce (the other rank is not there to take part; it would hang).
        whole = (evaluate(model, DataLoader(test_set, batch_size=8), device=device, show_progress=False)
                 if rank == 0 else None)
        dist.barrier()
        # Only rank 1 sees a NaN loss; both ranks must stop together instead of rank 0
        # waiting forever in DDP's gradient all-reduce.
        inputs = torch.full((4, FEATURES), float("nan") if rank == 1 else 0.0)
        bad_loader = DataLoader(TensorDataset(inputs, torch.zeros(4, dtype=torch.long)),
                                batch_size=4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            train_one_epoch(model, bad_loader, optimizer, device=device, epoch=9,
                            show_progress=False, group=info.group)
            raised = False
        except NonFiniteLossError:
            raised = True
        torch.save({"raised": raised,
                    "info": (info.enabled, info.rank, info.world_size, info.is_main),
                    "state": model.module.state_dict(), "history": history,
                    "eval": result, "whole": whole, "shard": len(test_sampler)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup_distributed()


def test_distributed_two_processes_agree(tmp_path):
    spawn_and_wait(_dist_worker, str(tmp_path), nprocs=DIST_WORLD_SIZE, timeout_s=DIST_TIMEOUT_S)

    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
               for r in range(DIST_WORLD_SIZE)]
    assert [r["info"] for r in results] == [(True, 0, 2, True), (True, 1, 2, False)]
    first, second = results[0]["state"], results[1]["state"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    # Metrics are all-reduced, so both ranks report the same global numbers.
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert results[0]["history"][-1][key] == results[1]["history"][-1][key], key
    assert results[0]["history"][-1]["train_acc"] >= 0.9
    # The test set is split without padding (13 + 12 of 25): the reduced figures are
    # exactly those of one process evaluating all of it.
    assert [r["shard"] for r in results] == [13, 12]
    assert results[0]["eval"] == results[1]["eval"]
    assert results[0]["eval"]["n"] == DIST_TEST_SIZE == results[0]["whole"]["n"]
    assert results[0]["eval"]["acc"] == results[0]["whole"]["acc"]
    assert results[0]["eval"]["loss"] == pytest.approx(results[0]["whole"]["loss"], rel=1e-6)
    assert results[0]["raised"] and results[1]["raised"]


# ------------------------------------------------------- learning-rate scales, restarts


class _NanOnCall(nn.Module):
    """``inner``, except that its forward calls numbered in ``at`` return NaN (one-off blow-ups)."""

    def __init__(self, inner: nn.Module, at: int | tuple[int, ...]) -> None:
        super().__init__()
        self.inner, self.at, self.calls = inner, (at,) if isinstance(at, int) else at, 0

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        return out * float("nan") if self.calls in self.at else out


def test_fit_restarts_a_diverging_epoch_at_a_lower_rate(caplog):
    """A non-finite loss restarts the epoch from its saved state at 0.1x the rate: the result
    is exactly a clean run at that rate, and the restart is logged and recorded."""
    seed_everything(0)
    start = mlp()
    loader = DataLoader(blobs(48), batch_size=8)  # no shuffling: both runs see the same batches
    flaky = _NanOnCall(copy_of(start), at=3)  # epoch 1, batch 2 (after two updates)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        history = fit(flaky, loader, recipe=Recipe(epochs=2, lr=0.2), device=CPU, show_progress=False)
    assert [r["restarts"] for r in history] == [1, 0]
    assert any("restarting epoch 1" in r.getMessage() and "(now 0.02)" in r.getMessage() for r in caplog.records)
    clean = copy_of(start)
    fit(clean, loader, recipe=Recipe(epochs=2, lr=0.2 * finetune.NONFINITE_LR_FACTOR, max_restarts=0), device=CPU,
        show_progress=False)
    for (name, got), want in zip(flaky.inner.state_dict().items(), clean.state_dict().values()):
        assert torch.equal(got, want), name


def test_two_restarts_in_one_epoch_lower_the_rate_twice():
    """Second blow-up in the same epoch: back to the epoch's start at 0.01x, not 0.1x again."""
    seed_everything(0)
    start = mlp()
    loader = DataLoader(blobs(48), batch_size=8)
    flaky = _NanOnCall(copy_of(start), at=(3, 9))  # batch 2 of the first try, batch 2 of the second (6 per try)
    history = fit(flaky, loader, recipe=Recipe(epochs=2, lr=0.2), device=CPU, show_progress=False)
    assert [r["restarts"] for r in history] == [2, 0]
    clean = copy_of(start)
    fit(clean, loader, recipe=Recipe(epochs=2, lr=0.2 * finetune.NONFINITE_LR_FACTOR ** 2, max_restarts=0), device=CPU,
        show_progress=False)
    for (name, got), want in zip(flaky.inner.state_dict().items(), clean.state_dict().values()):
        assert torch.equal(got, want), name
    with pytest.raises(NonFiniteLossError, match=r"restarted 2 time\(s\), down to 0.01x"):
        fit(_NanOnCall(mlp(), at=(1, 2, 3)), loader, recipe=Recipe(epochs=1, lr=0.2), device=CPU, show_progress=False)


def test_a_blow_up_in_the_last_update_of_an_epoch_restarts_that_epoch():
    """The last update of an epoch leaves no loss behind it to check: an infinite gradient there
    restarts that epoch (whose start is clean), instead of carrying NaN weights into the next
    epoch's start, its checkpoint and every restart from it."""
    seed_everything(0)
    model = mlp()
    loader = DataLoader(blobs(32), batch_size=8)  # 4 batches per epoch
    backwards = {"n": 0}

    def poison(grad):
        backwards["n"] += 1
        return grad * float("inf") if backwards["n"] == 4 else grad  # epoch 1's last update

    next(model.parameters()).register_hook(poison)
    history = fit(model, loader, recipe=Recipe(epochs=2, lr=0.1), device=CPU, show_progress=False)
    assert [r["restarts"] for r in history] == [1, 0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_probe_judges_a_short_distributed_loader_on_other_batches():
    """A DistributedSampler repeats its order within an epoch: a loader shorter than the probe's
    two halves is read again in another order, and the sampler's epoch is left as it was."""
    data = TensorDataset(torch.arange(128.0)[:, None], torch.zeros(128, dtype=torch.long))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=0, seed=0)
    loader = DataLoader(data, batch_size=8, sampler=sampler)  # 8 batches per rank
    batches = finetune._probe_batches(loader, 2 * finetune.PROBE_STEPS)
    trained, judged = batches[:finetune.PROBE_STEPS], batches[finetune.PROBE_STEPS:]
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(trained, judged))
    assert sampler.epoch == 0


class _NanWhileTraining(nn.Module):
    """``inner``, except that training-mode forward calls after the first ``good`` return NaN."""

    def __init__(self, inner: nn.Module, good: int) -> None:
        super().__init__()
        self.inner, self.good, self.calls = inner, good, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls > self.good:
                return out * float("nan")
        return out


def test_a_late_epoch_out_of_restarts_ends_with_the_best_epoch(caplog):
    """Good epochs, then one that blows up on every try: the run stops there with the best
    evaluated epoch's weights and says so; without a test set there is none to keep, and it raises."""
    seed_everything(0)
    loader = DataLoader(blobs(32), batch_size=8)  # 4 batches per epoch
    flaky = _NanWhileTraining(mlp(), good=4)     # epoch 1 trains, every later step blows up
    after_epoch_1 = {}

    def snapshot(record):
        if record["epoch"] == 1:
            after_epoch_1.update({k: v.clone() for k, v in flaky.state_dict().items()})

    with caplog.at_level(logging.WARNING, logger="finetune"):
        history = fit(flaky, loader, loader, recipe=Recipe(epochs=3, lr=0.1, max_restarts=1), device=CPU,
                      show_progress=False, epoch_hook=snapshot)
    assert [r["epoch"] for r in history] == [1] and history[0]["kept"]
    assert any("stopping after 1 of 3 epochs with the best one so far" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(v, after_epoch_1[k]) for k, v in flaky.state_dict().items())
    with pytest.raises(NonFiniteLossError, match="restarted 1 time"):
        fit(_NanWhileTraining(mlp(), good=4), loader, recipe=Recipe(epochs=3, lr=0.1, max_restarts=1), device=CPU,
            show_progress=False)


def test_fit_without_restarts_stops_at_once():
    flaky = _NanOnCall(mlp(), at=2)
    with pytest.raises(NonFiniteLossError, match="lower learning rate"):
        fit(flaky, DataLoader(blobs(32), batch_size=8), recipe=Recipe(epochs=1, lr=0.1, max_restarts=0), device=CPU,
            show_progress=False)
    with pytest.raises(UserError, match="max_restarts"):
        fit(mlp(), DataLoader(blobs(32), batch_size=8), recipe=Recipe(epochs=1, lr=0.1, max_restarts=-1), device=CPU)


def test_fit_lr_scale_scales_the_named_parameters_step():
    """One SGD step without momentum or decay: a parameter at scale 0.5 moves exactly half as far."""
    seed_everything(0)
    start = mlp()
    loader = DataLoader(blobs(8), batch_size=8)  # one batch, one step
    deltas = []
    for scale in (None, {"0.weight": 0.5, "0.bias": 0.5}):
        model = copy_of(start)
        fit(model, loader, recipe=Recipe(epochs=1, lr=0.1, momentum=0.0, weight_decay=0.0, lr_scale=scale), device=CPU,
            show_progress=False)
        deltas.append({n: p.detach() - start.state_dict()[n] for n, p in model.named_parameters()})
    full, scaled = deltas
    assert full["0.weight"].abs().sum() > 0
    torch.testing.assert_close(scaled["0.weight"], 0.5 * full["0.weight"])
    torch.testing.assert_close(scaled["0.bias"], 0.5 * full["0.bias"])
    torch.testing.assert_close(scaled["2.weight"], full["2.weight"])  # not named: full rate
    with pytest.raises(ValueError, match="does not have: nope"):
        fit(copy_of(start), loader, recipe=Recipe(epochs=1, lr=0.1, lr_scale={"nope": 0.1}), device=CPU)
    with pytest.raises(ValueError, match="finite and > 0"):
        fit(copy_of(start), loader, recipe=Recipe(epochs=1, lr=0.1, lr_scale={"0.weight": 0.0}), device=CPU)


def copy_of(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


# ------------------------------------------------- divergence guard and best epoch


def test_fit_rolls_back_a_loss_far_above_its_start(caplog):
    """A rate far too high makes the loss explode while it is still finite: the guard restarts
    the epoch at a lower rate before the weights are ruined; without it the run ends ruined."""
    loader = DataLoader(blobs(96), batch_size=8)
    test = DataLoader(blobs(60, seed=1), batch_size=30)
    seed_everything(0)
    start = mlp()
    guarded, unguarded = copy_of(start), copy_of(start)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        history = fit(guarded, loader, recipe=Recipe(epochs=3, lr=10.0), device=CPU, show_progress=False)
    assert [r["restarts"] for r in history] == [1, 0, 0]
    assert any("diverged" in r.getMessage() and "restarting epoch 1" in r.getMessage() for r in caplog.records)
    assert evaluate(guarded, test, device=CPU, show_progress=False)["acc"] == 1.0
    history = fit(unguarded, loader, recipe=Recipe(epochs=3, lr=10.0, divergence=None), device=CPU,
                  show_progress=False)
    assert all(math.isfinite(r["train_loss"]) for r in history) and history[-1]["train_loss"] > 1e3


def test_loss_guard_ignores_noise_and_catches_a_sustained_rise():
    guard = finetune.LossGuard(4.0)
    assert all(guard.update(0.05) is None for _ in range(finetune.GUARD_REFERENCE_BATCHES))
    assert guard.reference == finetune.GUARD_MIN_REFERENCE  # near-zero start: the floor
    assert guard.update(0.9) is None and guard.update(0.05) is None  # one bad batch is noise
    reasons = [guard.update(2.0) for _ in range(30)]
    assert reasons[0] is None and any(reasons)
    assert f"over 4x where the run started ({finetune.GUARD_MIN_REFERENCE:g})" in next(r for r in reasons if r)
    assert finetune.LossGuard(None).update(1e30) is None  # off
    # The default: a two-class run that starts at chance (0.7) and climbs to 2.3 (as a rate too
    # high did on the recipe benchmark, ending its epoch at chance) is caught; noise of 30% is not.
    guard = finetune.LossGuard(finetune.DIVERGENCE_FACTOR)
    assert all(guard.update(0.7) is None for _ in range(finetune.GUARD_REFERENCE_BATCHES))
    assert all(guard.update(0.7 * (1.3 if i % 2 else 0.7)) is None for i in range(50))
    assert any(guard.update(2.3) for _ in range(20))
    with pytest.raises(UserError, match="divergence must be"):
        Recipe(epochs=1, lr=0.1, divergence=1.0).check()


class _ScoreEpochs:
    """An epoch hook that replaces the test accuracy by a script and keeps each epoch's weights."""

    def __init__(self, model: nn.Module, scores: list[float]) -> None:
        self.model, self.scores, self.weights = model, scores, []

    def __call__(self, record: dict) -> None:
        record["test_acc"] = self.scores[record["epoch"] - 1]
        self.weights.append({k: v.clone() for k, v in self.model.state_dict().items()})


@pytest.mark.parametrize("keep_best", [True, False])
def test_fit_ends_with_the_best_epoch_on_the_test_set(caplog, keep_best):
    seed_everything(0)
    model = mlp()
    scores = _ScoreEpochs(model, [0.6, 0.9, 0.5, 0.7])
    with caplog.at_level(logging.INFO, logger="finetune"):
        history = fit(model, DataLoader(blobs(48), batch_size=8), DataLoader(blobs(30, seed=1), batch_size=30),
                      recipe=Recipe(epochs=4, lr=0.05, keep_best=keep_best), device=CPU, show_progress=False,
                      epoch_hook=scores)
    kept = 2 if keep_best else 4
    assert [r["kept"] for r in history] == [e == kept for e in (1, 2, 3, 4)]
    for name, value in model.state_dict().items():
        assert torch.equal(value, scores.weights[kept - 1][name]), name
    assert not torch.equal(scores.weights[1]["0.weight"], scores.weights[3]["0.weight"])
    said = any("keeping epoch 2's weights" in r.getMessage() and "90.00%" in r.getMessage() for r in caplog.records)
    assert said == keep_best


def test_resumed_run_keeps_the_best_epoch_from_before_the_interruption():
    """The best epoch's weights travel in the checkpoint: a run resumed after it ends with them."""
    loader = DataLoader(blobs(48), batch_size=8)
    test = DataLoader(blobs(30, seed=1), batch_size=30)
    recipe = Recipe(epochs=4, lr=0.05)
    seed_everything(0)
    start = mlp()
    whole = copy_of(start)
    states = []
    fit(whole, loader, test, recipe=recipe, device=CPU, show_progress=False,
        epoch_hook=_ScoreEpochs(whole, [0.6, 0.9, 0.5, 0.7]),
        checkpoint=lambda make: states.append(copy.deepcopy(make())))
    after_third = states[2]
    assert after_third["best"]["epoch"] == 2 and after_third["best"]["model"] is not None
    resumed = copy_of(start)
    fit(resumed, loader, test, recipe=recipe, device=CPU, show_progress=False,
        epoch_hook=_ScoreEpochs(resumed, [0.6, 0.9, 0.5, 0.7]), resume=after_third)
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    damaged = dict(after_third, best=dict(after_third["best"], model={"0.weight": torch.zeros(2)}))
    with pytest.raises(UserError, match="does not fit this run.*best epoch's weights"):
        fit(copy_of(start), loader, test, recipe=recipe, device=CPU, show_progress=False, resume=damaged)


def _set(*path_and_value):
    """A function that sets ``state[k0][k1]...`` to the last argument in a checkpoint."""
    *path, value = path_and_value

    def apply(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return state
    return apply


TAMPERED = {
    "lr as text": (_set("optimizer", "param_groups", 0, "lr", "0.1"), "optimizer.param_groups[0].lr must be float"),
    "momentum buffer of another shape": (_set("optimizer", "state", 0, "momentum_buffer", torch.zeros(3)),
                                         "optimizer.state[0].momentum_buffer is not a float32 tensor of shape [16, 8]"),
    "buffer of a parameter that does not exist": (_set("optimizer", "state", 99, {"momentum_buffer": None}),
                                                  "parameter indices"),
    "scheduler field of another type": (_set("scheduler", "base_lrs", "fast"), "scheduler.base_lrs must be a list of 1"),
    "scheduler step as float": (_set("scheduler", "last_epoch", 3.5), "scheduler.last_epoch must be int"),
    "huge restart budget": (_set("restarts_left", 10 ** 9), "restarts_left 1000000000 is outside 0..2"),
    "negative restart budget": (_set("restarts_left", -1), "restarts_left -1 is outside 0..2"),
    "rate factor NaN": (_set("rate_factor", float("nan")), "rate_factor nan is outside (0, 1]"),
    "NaN weights": (_set("model", "0.weight", torch.full((16, 8), float("nan"))), "model.0.weight holds NaN"),
    "weights of another shape": (_set("model", "2.bias", torch.zeros(5)), "model.2.bias is not a float32 tensor"),
    "history too short": (_set("history", []), "history must hold one record per epoch done (2)"),
    "a scaler on CPU": (_set("scaler", {"scale": 1.0}), "scaler must be NoneType"),
    "missing guard": (lambda s: {k: v for k, v in s.items() if k != "guard"}, "no 'guard'"),
    "an integer beyond 64 bits": (_set("optimizer", "param_groups", 0, "dampening", 10 ** 400),
                                  "optimizer.param_groups[0].dampening is out of range"),
}


def _checkpoints(loader, recipe: Recipe) -> list[dict]:
    """The checkpoints (copies) a seeded MLP run by ``recipe`` writes after each epoch but the last."""
    seed_everything(0)
    states = []
    fit(mlp(), loader, recipe=recipe, device=CPU, show_progress=False,
        checkpoint=lambda make: states.append(copy.deepcopy(make())))
    return states


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_checkpoints_are_refused_before_anything_is_restored(case):
    """Each once ended in a traceback mid-training or a run that never ended."""
    loader = DataLoader(blobs(24), batch_size=8)
    recipe = Recipe(epochs=3, lr=0.05)
    states = _checkpoints(loader, recipe)
    tamper, needle = TAMPERED[case]
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="the checkpoint is damaged") as info:
        fit(model, loader, recipe=recipe, device=CPU, show_progress=False, resume=tamper(states[1]))
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing restored


def test_a_run_with_an_integer_rate_resumes_after_a_restart_made_it_a_float():
    """Recipe(lr=1): the run's own checkpoint, with the rates a restart lowered, is not 'damaged'."""
    loader = DataLoader(blobs(24), batch_size=8)
    recipe = Recipe(epochs=3, lr=1)
    state = _checkpoints(loader, recipe)[0]
    state["optimizer"]["param_groups"][0]["lr"] = state["optimizer"]["param_groups"][0]["initial_lr"] = 0.1
    state["scheduler"]["base_lrs"] = [0.1]
    fit(mlp(), loader, recipe=recipe, device=CPU, show_progress=False, resume=state)


# ------------------------------------------------------- rates from the start's scale


def test_input_scaled_rates_is_the_normalised_lms_factor():
    """A head on inputs 5x larger than unit scale gets 1/25 of the rate (the mean square of
    its inputs' entries); inputs at or below unit scale keep their rate."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, FEATURES, generator=gen)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))
    big = finetune.input_scaled_rates(model, [5 * x[:32], (5 * x[32:],)], ["0"])
    assert big["0"] == pytest.approx(1 / float((5 * x).square().mean()), rel=1e-6)
    assert 1 / 30 < big["0"] < 1 / 20
    assert finetune.input_scaled_rates(model, [0.2 * x], ["0"]) == {"0": 1.0}
    assert model.training  # the mode is given back
    with pytest.raises(ValueError, match="Linear or Conv2d"):
        finetune.input_scaled_rates(model, [x], ["1"])


def test_rate_probe_finds_a_stable_rate_and_starts_from_the_same_weights(caplog):
    """At a rate far too high (10: the loss explodes) the probe goes down the candidates and the
    run trains at a lower one without any restart; the probe's own steps leave no trace."""
    loader = DataLoader(blobs(96), batch_size=8)
    test = DataLoader(blobs(60, seed=1), batch_size=30)
    seed_everything(0)
    model = mlp()
    recipe = Recipe(epochs=3, lr=10.0, rate_probe=finetune.DEFAULT_RATE_PROBE)
    with caplog.at_level(logging.INFO, logger="finetune"):
        history = fit(model, loader, test, recipe=recipe, device=CPU, show_progress=False)
    probe = [r.getMessage() for r in caplog.records if "rate probe" in r.getMessage()]
    assert len(probe) == 1 and "training at x1 " not in probe[0]
    # 12 batches: the 8 it judges on repeat images of the 8 it trained on, and the log says so.
    assert "after training on 8: an epoch has 12, so partly the same images again, augmented anew" in probe[0]
    assert [r["restarts"] for r in history] == [0, 0, 0]
    assert history[-1]["test_acc"] == 1.0

    # The probe's steps are undone: the run starts from the caller's weights, BatchNorm
    # statistics and optimiser state.
    seed_everything(0)
    start = nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))
    run, _ = finetune._start_run(copy_of(start), loader, recipe, CPU, None)
    factor = finetune._probe_rates(run, loader, device=CPU, group=None, log=None)
    assert factor < 1 and run.rate_factor == factor
    for name, value in start.state_dict().items():
        assert torch.equal(run.model.state_dict()[name], value)
    assert run.optimizer.state == {} or all(not s for s in run.optimizer.state.values())
    assert run.scheduler.base_lrs == [pytest.approx(10.0 * factor)]


def test_rate_probe_keeps_a_rate_that_trains():
    """At a rate that trains well, the probe keeps x1 and the run equals one without the probe
    but for the probe's batches drawn from the same generator (so compare the rates only)."""
    loader = DataLoader(blobs(96), batch_size=8)
    seed_everything(0)
    model = mlp()
    run, _ = finetune._start_run(model, loader, Recipe(epochs=1, lr=0.05, rate_probe=(1.0, 0.3, 0.1)), CPU, None)
    assert finetune._probe_rates(run, loader, device=CPU, group=None, log=None) == 1.0
    assert run.scheduler.base_lrs == [pytest.approx(0.05)]


def test_rate_probe_judges_on_batches_it_did_not_train_on(monkeypatch):
    """Each candidate trains on the loader's first PROBE_STEPS batches and is judged on the next
    PROBE_STEPS (a memorised batch would favour the highest rate)."""
    loader = DataLoader(blobs(8 * 3 * finetune.PROBE_STEPS), batch_size=8)
    seed_everything(0)
    run, _ = finetune._start_run(mlp(), loader, Recipe(epochs=1, lr=0.05, rate_probe=(1.0, 0.3)), CPU, None)
    trained, judged = [], []
    real_train, real_loss = finetune.train_one_epoch, finetune._probe_loss
    monkeypatch.setattr(finetune, "train_one_epoch", lambda model, batches, **kw: (
        trained.append([b[0] for b in batches]), real_train(model, batches, **kw))[1])
    monkeypatch.setattr(finetune, "_probe_loss", lambda run_, batches, **kw: (
        judged.append([b[0] for b in batches]), real_loss(run_, batches, **kw))[1])
    finetune._probe_rates(run, loader, device=CPU, group=None, log=None)
    first = [x for x, _ in loader]
    assert trained and len(judged) == len(trained) + 1  # the start's loss, then one per candidate
    for batches in trained:
        assert [torch.equal(a, b) for a, b in zip(batches, first)] == [True] * finetune.PROBE_STEPS
    for batches in judged:
        assert len(batches) == finetune.PROBE_STEPS
        assert all(torch.equal(a, b) for a, b in zip(batches, first[finetune.PROBE_STEPS:]))


@pytest.mark.parametrize("probe", [(0.3, 1.0), (1.0, 1.0), (1.5,), (0.0,)])
def test_recipe_refuses_a_bad_rate_probe(probe):
    with pytest.raises(UserError, match="rate_probe"):
        Recipe(epochs=1, lr=0.1, rate_probe=probe).check()


def test_rate_probe_says_when_no_rate_lowered_the_loss(caplog):
    """Every candidate diverges: the run goes on at the lowest one and a warning says so."""
    loader = DataLoader(blobs(96), batch_size=8)
    seed_everything(0)
    run, _ = finetune._start_run(mlp(), loader, Recipe(epochs=1, lr=1e4, rate_probe=(1.0, 0.5)), CPU, None)
    with caplog.at_level(logging.INFO, logger="finetune"):
        factor = finetune._probe_rates(run, loader, device=CPU, group=None, log=finetune.logger)
    assert factor == 0.5
    assert any(r.levelno == logging.WARNING and "no rate tried lowered the loss" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("losses, chosen", [
    ((0.717, 0.706, 0.692, 0.699), 1.0),  # a tie from a random start (ResNet-18): the higher rate
    ((0.703, 0.542, 0.354, 0.575), 0.3),  # a clear win (VGG16's trained convs): the lower rate
    ((0.700, 0.720, 0.690, 0.695), 0.3),  # within the margin but above the start: never kept
    ((0.815, 18.0, 1.52, 0.445, 0.617), 0.1),
    # Nothing learnt (every loss near ln 3 = 1.099, a uniform guess over NUM_CLASSES): x1 rose,
    # but not as far as the loss guard's 2x of the start, so the recipe's rate is kept ...
    ((1.10, 1.70, 1.08, 1.09), 1.0),
    # ... and a rate the guard would stop is not (the lowest loss alone would keep x0.1).
    ((1.10, 2.50, 1.50, 1.08, 1.09), 0.3),
    # A start that had learnt (below the guess) which every rate ruined: a real rise, judged as
    # before (the lowest loss, and a warning), not as noise.
    ((0.60, 1.19, 1.10, 1.12, 1.15, 1.16), 0.3),
    # A non-finite start: no noise rule, and a diverged candidate is never kept.
    ((math.inf, math.inf, 1.10, 1.12, 1.15, 1.16), 0.3),
])
def test_rate_probe_keeps_the_highest_rate_as_good_as_the_best(monkeypatch, caplog, losses, chosen):
    """The probe's choice from the losses it measures (the start's, then each candidate's)."""
    loader = DataLoader(blobs(96), batch_size=8)
    seed_everything(0)
    run, _ = finetune._start_run(mlp(), loader, Recipe(epochs=1, lr=0.05, rate_probe=finetune.DEFAULT_RATE_PROBE),
                                 CPU, None)
    measured = iter(losses)
    monkeypatch.setattr(finetune, "_probe_loss", lambda *a, **kw: next(measured))
    with caplog.at_level(logging.INFO, logger="finetune"):
        assert finetune._probe_rates(run, loader, device=CPU, group=None, log=finetune.logger) == chosen
    # The log says when the margin, not the lowest loss, chose, and when the figures were noise.
    said = "the highest within 5% of the start's loss of the lowest (x0.3)" in caplog.text
    assert said == (losses[0] == 0.717)
    noise = ("the highest whose loss stayed within 2x of the start's (the loss guard's limit): neither the start "
             "nor any rate had the loss below 95% of a uniform guess's over 3 classes (1.099)")
    assert (noise in caplog.text) == (losses[:2] in ((1.10, 1.70), (1.10, 2.50)))
    warned = "no rate tried lowered the loss" in caplog.text
    assert warned == (losses[0] == 0.60)
