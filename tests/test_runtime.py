"""Tests for runtime.py: devices, torchrun set-up, collectives with an explicit group, seeding, unwrap."""

import os
import random

import numpy as np
import pytest
import torch

import runtime
from conftest import spawn_and_wait
from errors import UserError
from runtime import DistInfo, cleanup_distributed, init_distributed, resolve_device

CPU = torch.device("cpu")


# ------------------------------------------------------------------------- devices


def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == CPU
    assert resolve_device(" CPU ") == CPU
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)


def test_resolve_device_unknown_name_lists_allowed():
    with pytest.raises(UserError, match=r"'tpu'.*auto, cpu, cuda, cuda:N, mps"):
        resolve_device("tpu")


def test_resolve_device_unavailable_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "mps"):
        with pytest.raises(UserError, match=f"'{name}'.*not available"):
            resolve_device(name)
    assert resolve_device("auto") == CPU


def test_resolve_device_cuda_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UserError, match=r"'cuda:3'.*only 1 CUDA"):
        resolve_device("cuda:3")


def test_init_distributed_without_torchrun_is_disabled(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info, device = init_distributed(CPU)
    assert info == DistInfo(enabled=False, rank=0, world_size=1, local_rank=0)
    assert info.is_main and device == CPU
    # A single-process torchrun is not distributed either.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert init_distributed(CPU)[0].enabled is False
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE='two'"):
        init_distributed(CPU)
    cleanup_distributed()  # no process group: must be a no-op


# ------------------------------------------------------------------ collectives, on_main


def test_reductions_without_a_group_are_local():
    assert runtime.all_reduce_sum([1.0, 2.0], CPU, None) == [1.0, 2.0]
    assert runtime.all_true(False, CPU, None) is False
    assert runtime.on_main(runtime.LOCAL, lambda: 7) == 7
    assert runtime.LOCAL.group is None


def _on_main_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    info, _ = init_distributed(CPU)
    outcome = {}
    try:
        # Work rank 0 does alone returns there; the others get None once it is done.
        outcome["value"] = runtime.on_main(info, lambda: 41 + 1)
        # A reduction over the group after on_main: every rank is there to take part.
        outcome["sum"] = runtime.all_reduce_sum([float(rank + 1)], CPU, info.group)[0]
        outcome["all_true"] = runtime.all_true(rank == 0, CPU, info.group)

        def fail():
            raise UserError("bad plan")

        try:
            runtime.on_main(info, fail)
        except UserError as exc:
            outcome["error"] = (type(exc).__name__, str(exc))
        torch.save(outcome, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup_distributed()


def test_on_main_runs_on_rank_0_and_stops_every_rank_when_it_fails(tmp_path):
    spawn_and_wait(_on_main_worker, str(tmp_path), nprocs=2, timeout_s=120)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert first["value"] == 42 and second["value"] is None
    assert first["sum"] == second["sum"] == 3.0
    assert first["all_true"] is False and second["all_true"] is False
    assert first["error"] == ("UserError", "bad plan")
    assert second["error"][0] == "PeerFailed" and "rank 0 stopped" in second["error"][1]


# -------------------------------------------------------------------------------- RNG


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    runtime.seed_everything(3)
    state = runtime.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    runtime.seed_everything(99)  # move every generator elsewhere
    runtime.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])
