"""Atomic writes: a killed writer's temporary file is cleaned up by the next write, and said so."""

from __future__ import annotations

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
