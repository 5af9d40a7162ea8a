"""One run per folder: a second run (a real second process) is refused naming the holder; a lock
left by a killed run is taken over with a warning; unreadable or foreign-host locks are refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fasterkd.runlock import LOCK_NAME, RunLock, RunLockedError, read_lock

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

HOLD = ("import sys\nfrom fasterkd.runlock import RunLock\n"
        "with RunLock(sys.argv[1], command='fasterkd train baseline --out ' + sys.argv[1]):\n"
        "    print('held', flush=True); sys.stdin.read()\n")


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=ENV)
    assert proc.stdout.readline().strip() == b"held"
    return proc


def _write_lock(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    info = {"pid": 1, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
            "started_unix": time.time(), "command": "fasterkd train", "token": "t0"}
    info.update(fields)
    (folder / LOCK_NAME).write_text(json.dumps(info))
    return folder / LOCK_NAME


def test_a_second_process_is_refused_naming_the_holder_then_a_killed_holder_is_taken_over(tmp_path):
    run = tmp_path / "runs" / "baseline"
    proc = _holder(run)
    try:
        with pytest.raises(RunLockedError) as info:
            RunLock(run).acquire()
        msg = str(info.value)
        assert f"pid {proc.pid} on {socket.gethostname()}" in msg and "fasterkd train baseline --out" in msg
        assert str(run) in msg and "\n" not in msg
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert read_lock(run / LOCK_NAME)["pid"] == proc.pid  # kill -9 left the lock behind
    with pytest.warns(RuntimeWarning, match=rf"took over the lock of a run that is gone \(pid {proc.pid} "):
        with RunLock(run, command="resume") as lock:
            assert read_lock(lock.path)["pid"] == os.getpid() and read_lock(lock.path)["command"] == "resume"
    assert not (run / LOCK_NAME).exists()


def test_the_holder_releasing_lets_the_next_run_in(tmp_path):
    proc = _holder(tmp_path)
    proc.stdin.close()  # the holder's with-block ends: it releases
    proc.wait()
    assert proc.returncode == 0 and not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path):
        pass


RACE = ("import os, sys, time\nfrom fasterkd.runlock import RunLock, RunLockedError\n"
        "print('ready', flush=True)\n"
        "while not os.path.exists(sys.argv[2]): time.sleep(0.001)\n"
        "lock = RunLock(sys.argv[1])\n"
        "try:\n    lock.acquire()\nexcept RunLockedError:\n    print('refused', flush=True)\n"
        "else:\n    print('held', flush=True)\n"
        "sys.stdin.read()\nlock.release()\n")


def test_runs_started_at_the_same_moment_get_exactly_one_lock(tmp_path):
    go = tmp_path / "go"
    run = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(run), str(go)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=ENV) for _ in range(4)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == [b"ready"] * 4
        go.write_text("")  # all four try at once, and each holds on until every answer is in
        outs = sorted(p.stdout.readline().strip().decode() for p in procs)
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=60)
    assert outs == ["held", "refused", "refused", "refused"], outs
    assert not (run / "run.lock").exists()  # the holder released on exit


def test_a_stale_lock_of_a_dead_pid_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, pid=dead.pid)
    with pytest.warns(RuntimeWarning, match=f"pid {dead.pid}"):
        RunLock(tmp_path).acquire().release()


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path):
    """The PID runs again, but that process started long after the lock was written."""
    _write_lock(tmp_path, pid=os.getpid(), started_unix=time.time() - 30 * 86400)
    with pytest.warns(RuntimeWarning, match="took over"):
        RunLock(tmp_path).acquire().release()


def test_a_live_holder_is_never_taken_over(tmp_path):
    _write_lock(tmp_path, pid=os.getppid(), started_unix=time.time())
    with pytest.raises(RunLockedError, match=f"pid {os.getppid()}"):
        RunLock(tmp_path).acquire()
    assert read_lock(tmp_path / LOCK_NAME)["pid"] == os.getppid()


def test_a_lock_of_another_host_is_refused_with_the_file_to_delete(tmp_path):
    path = _write_lock(tmp_path, pid=999_999, host="gpu-node-7")
    with pytest.raises(RunLockedError, match=rf"pid 999999 on gpu-node-7.*delete {path}"):
        RunLock(tmp_path).acquire()


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"pid": "12", "host": "h"}', "\xff\xfe"],
                         ids=["empty", "garbled", "list", "pid-string", "binary"])
def test_an_unreadable_lock_is_refused_naming_it(tmp_path, content):
    (tmp_path / LOCK_NAME).write_bytes(content.encode("latin-1"))
    with pytest.raises(RunLockedError, match=rf"cannot be checked.*delete {tmp_path / LOCK_NAME}"):
        RunLock(tmp_path).acquire()


def test_release_on_error_and_never_removes_another_runs_lock(tmp_path):
    with pytest.raises(KeyError):
        with RunLock(tmp_path):
            raise KeyError("crash inside the run")
    assert not (tmp_path / LOCK_NAME).exists()
    lock = RunLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).unlink()
    _write_lock(tmp_path, pid=os.getppid(), token="someone-else")
    lock.release()
    assert read_lock(tmp_path / LOCK_NAME)["token"] == "someone-else"


def test_a_file_where_the_run_folder_should_be(tmp_path):
    from fasterkd.utils import WriteError

    (tmp_path / "out").write_text("x")
    with pytest.raises(WriteError, match="out"):
        RunLock(tmp_path / "out").acquire()


def test_lock_records_pid_host_start_time_and_command(tmp_path):
    with RunLock(tmp_path, command="fasterkd train student --out x") as lock:
        info = read_lock(lock.path)
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert info["command"] == "fasterkd train student --out x" and abs(info["started_unix"] - time.time()) < 60
    assert info["started"].endswith("+00:00")
    assert [p.name for p in tmp_path.iterdir()] == []  # released, and no temporary left
