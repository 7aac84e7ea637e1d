"""Atomic writes: a killed writer's temporary file is cleaned up by the next write, and said so."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest

from atomic import atomic_open
from conftest import REPO_ROOT

WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from atomic import atomic_open
with atomic_open({target!r}, "wb") as fh:
    fh.write(b"x" * 1_000_000)
    fh.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_killed_writer_leaves_the_old_file_and_the_next_write_removes_its_temporary(tmp_path):
    target = tmp_path / "model"
    target.write_bytes(b"old model")
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(REPO_ROOT), target=str(target))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    leftovers = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".model.{proc.pid}.")
    assert target.read_bytes() == b"old model"

    with pytest.warns(UserWarning, match=r"removed 1 temporary file\(s\) that an interrupted write of .*model left"):
        with atomic_open(target, "wb") as fh:
            fh.write(b"new model")
    assert sorted(os.listdir(tmp_path)) == ["model"] and target.read_bytes() == b"new model"


def test_a_live_writers_temporary_and_other_files_are_left_alone(tmp_path, recwarn):
    target = tmp_path / "model"
    live = tmp_path / f".model.{os.getpid()}.abcdefgh.tmp"      # this process: alive
    foreign = tmp_path / ".model.backup.tmp"                    # not named by atomic_open
    other_target = tmp_path / ".other.1.abcdefgh.tmp"            # another target's
    for path in (live, foreign, other_target):
        path.write_bytes(b"keep")
    with atomic_open(target, "wb") as fh:
        fh.write(b"m")
    assert sorted(os.listdir(tmp_path)) == sorted(["model", live.name, foreign.name, other_target.name])
    assert not [w for w in recwarn if "temporary file" in str(w.message)]


# ------------------------------------------------------------------- a full disk
class _FullDisk:
    """The file object ``atomic_open`` writes to, failing with ENOSPC once ``room`` bytes are written."""

    def __init__(self, fh, room: int) -> None:
        self._fh, self._room = fh, room

    def write(self, data) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)


def _fill_disk(monkeypatch, room: int) -> None:
    import atomic

    real = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode), room))


def _writers(tmp_path):
    import torch

    import inference
    import models
    import ranks
    import report

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 2))
    return {
        "model file": lambda p: models.save_model(p, models.build_pretrained("alexnet", 2, weights="none")[0],
                                                  arch="alexnet", classes=["a", "b"], image_size=63, meta={}),
        "checkpoint": lambda p: models.save_checkpoint(p, {"model": net.state_dict()}, config={"lr": 0.1}),
        "onnx export": lambda p: inference.export_onnx(net.eval(), p, torch.rand(2, 3, 8, 8)),
        "report json": lambda p: report.write_json(p, {"rows": list(range(10000))}),
        "plan": lambda p: ranks.write_plan(p, {f"layer{i}": {"method": "tucker", "ranks": [4, 2]} for i in range(50)}),
    }


@pytest.mark.parametrize("room", [0, 200])
@pytest.mark.parametrize("what", ["model file", "checkpoint", "onnx export", "report json", "plan"])
def test_a_full_disk_is_one_line_and_leaves_the_target_as_it_was(tmp_path, monkeypatch, what, room):
    """ENOSPC from a write, or torch's writer failing after it ("unexpected pos"): DiskFullError
    (exit 1 on the command line) naming the file; the old file intact; no temporary file left."""
    from errors import DiskFullError

    target = tmp_path / "target"
    target.write_bytes(b"the previous file")
    _fill_disk(monkeypatch, room)
    with pytest.raises(DiskFullError) as info:
        _writers(tmp_path)[what](str(target))
    message = str(info.value)
    assert message == f"cannot write {target}: No space left on device (the previous file is unchanged)"
    assert info.value.exit_code == 1
    assert target.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_a_full_disk_on_the_command_line_exits_1_with_one_line(tmp_path, monkeypatch, capsys):
    import main
    import models

    trained = tmp_path / "model"
    models.save_model(str(trained), models.build_pretrained("alexnet", 2, weights="none")[0], arch="alexnet",
                      classes=["a", "b"], image_size=63, meta={})
    _fill_disk(monkeypatch, 1000)
    code = main.run(["--decompose", "--model", str(trained), "--decomposed_model", str(tmp_path / "small"),
                     "--rank_ratio", "0.5", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: cannot write {tmp_path / 'small'}: No space left on device (nothing written)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_target_name_near_the_limit_is_written(tmp_path):
    """The temporary adds a pid, a random part and '.tmp' to the target's name: for a name near
    the file system's 255 bytes it is cut so that it still fits, and stale ones are still found."""
    path = tmp_path / ("m" * 250)
    with atomic_open(path, "w") as fh:
        fh.write("ok")
    assert path.read_text() == "ok" and os.listdir(tmp_path) == [path.name]
    import atomic

    stale = tmp_path / f".{atomic._tmp_stem(path.name)}.999999999.abcd1234.tmp"  # a write that died
    stale.write_text("half")
    with pytest.warns(UserWarning, match="interrupted write"):
        assert atomic.remove_stale_temporaries(path) == [str(stale)]
