"""Fault injection into the atomic writers, checkpoint checksums and orphaned temporary files.

Every OS error of a write (full disk, read-only folder, no permission, a file where a folder is
expected, ...) and MemoryError must become one WriteError naming the path and the cause, leave the
previous file byte-identical and no temporary behind. Faults are injected (tests run as root, so
chmod would not block the write).
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import fasterkd.utils as fu
from fasterkd.utils import (
    CorruptFileError,
    WriteError,
    atomic_path,
    atomic_torch_save,
    atomic_torch_save_all,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_verified,
    read_checksums,
    remove_stale_temporaries,
)

ROOT = Path(__file__).resolve().parents[1]
OLD = b"previous contents\n"


def _write_with_atomic_path(path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"new contents\n")


WRITERS = {
    "atomic_path": _write_with_atomic_path,
    "atomic_write_text": lambda p: atomic_write_text(p, "new contents\n"),
    "atomic_write_bytes": lambda p: atomic_write_bytes(p, b"new contents\n"),
    "atomic_write_json": lambda p: atomic_write_json(p, {"epoch": 2}),
    "atomic_torch_save": lambda p: atomic_torch_save({"w": torch.arange(6.0)}, p),
    "atomic_torch_save_all": lambda p: atomic_torch_save_all([({"w": torch.ones(3)}, p)]),
}


def _raise(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


# (case id, what to patch, errno, words the message must hold)
INJECTED = [
    ("replace-enospc", "os.replace", errno.ENOSPC, "no space left on device"),
    ("replace-erofs", "os.replace", errno.EROFS, "read-only file system"),
    ("replace-exdev", "os.replace", errno.EXDEV, "invalid cross-device link"),
    ("fsync-enospc", "os.fsync", errno.ENOSPC, "no space left on device"),
    ("fsync-eio", "os.fsync", errno.EIO, "input/output error"),
    ("mkstemp-erofs", "tempfile.mkstemp", errno.EROFS, "read-only file system"),
    ("mkstemp-eacces", "tempfile.mkstemp", errno.EACCES, "permission denied"),
    ("mkstemp-eexist", "tempfile.mkstemp", errno.EEXIST, "file exists"),
]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("case,target,code,words", INJECTED, ids=[c[0] for c in INJECTED])
def test_injected_os_error_is_one_write_error_and_keeps_the_old_file(tmp_path, monkeypatch, writer, case, target, code, words):
    path = tmp_path / "runs" / "x" / "last.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(OLD)
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(__import__(module), name, _raise(code))
    with pytest.raises(WriteError) as info:
        WRITERS[writer](path)
    err = info.value
    assert isinstance(err, OSError) and isinstance(err, ValueError) and err.errno == code
    assert str(err).startswith(words) and str(path) in str(err) and "\n" not in str(err)
    monkeypatch.undo()
    assert path.read_bytes() == OLD and _leftovers(path.parent) == []


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_file_where_a_folder_is_expected(tmp_path, writer):
    blocker = tmp_path / "out"
    blocker.write_bytes(OLD)
    with pytest.raises(WriteError, match=r"^not a directory writing .*out/sub/last.pt \(.*out\)$"):
        WRITERS[writer](blocker / "sub" / "last.pt")
    assert blocker.read_bytes() == OLD


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_folder_where_the_file_should_go(tmp_path, writer):
    (tmp_path / "last.pt").mkdir()
    with pytest.raises(WriteError, match=r"^is a directory writing .*last.pt$"):
        WRITERS[writer](tmp_path / "last.pt")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("writer", ["atomic_write_text", "atomic_write_bytes", "atomic_torch_save"])
def test_a_partial_write_then_full_disk(tmp_path, monkeypatch, writer):
    """The disk fills up half-way through the bytes: the old file stays, the partial temporary goes."""
    path = tmp_path / "metrics.json"
    path.write_bytes(OLD)
    real = Path.write_bytes

    def half_then_enospc(self, data):
        real(self, bytes(data)[: max(1, len(data) // 2)])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", half_then_enospc)
    monkeypatch.setattr(Path, "write_text", lambda self, text: half_then_enospc(self, text.encode()))
    with pytest.raises(WriteError, match=rf"^no space left on device writing {path}$"):
        WRITERS[writer](path)
    assert path.read_bytes() == OLD and _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [MemoryError(), MemoryError("cannot allocate")], ids=["bare", "message"])
def test_memory_error_while_serialising_a_checkpoint(tmp_path, monkeypatch, exc):
    path = tmp_path / "last.pt"
    path.write_bytes(OLD)

    def no_memory(*args, **kwargs):
        raise exc

    monkeypatch.setattr(torch, "save", no_memory)
    with pytest.raises(WriteError, match=rf"^out of memory writing {path}$"):
        atomic_torch_save({"w": torch.ones(2)}, path)
    assert path.read_bytes() == OLD and _leftovers(tmp_path) == []


@pytest.mark.parametrize("free,words", [(0, "no space left on device"), (10**6, "RuntimeError: \\[enforce fail")],
                         ids=["disk-full", "disk-not-full"])
def test_torch_zip_writer_failure_inside_atomic_path(tmp_path, monkeypatch, free, words):
    """torch.save straight into the temporary path reports a full disk as its zip writer's RuntimeError."""
    path = tmp_path / "best.pt"
    path.write_bytes(OLD)

    class Stat:
        f_bavail = free

    monkeypatch.setattr(os, "statvfs", lambda p: Stat())
    with pytest.raises(WriteError, match=rf"^{words}.* writing {path}"):
        with atomic_path(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    assert path.read_bytes() == OLD and _leftovers(tmp_path) == []


def test_errors_that_are_not_the_writes_pass_through(tmp_path):
    """A caller's own bug or a missing input file is not reported as a failed write of the output."""
    path = tmp_path / "out.png"
    with pytest.raises(KeyError):
        with atomic_path(path):
            raise KeyError("x")
    with pytest.raises(FileNotFoundError) as info:
        with atomic_path(path):
            open(tmp_path / "elsewhere" / "input.png", "rb")
    assert not isinstance(info.value, WriteError)
    assert not path.exists() and _leftovers(tmp_path) == []


def test_write_error_pickles_across_processes(tmp_path):
    err = WriteError(tmp_path / "a.pt", OSError(errno.ENOSPC, "No space left on device"))
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) == f"no space left on device writing {tmp_path / 'a.pt'}" and back.errno == errno.ENOSPC


def test_cli_prints_one_line_for_a_file_valued_out(tmp_path, capsys):
    from fasterkd.cli import main

    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    assert main(["data", "synth", "--out", str(blocker / "data"), "--n", "1", "--size", "16x32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a directory writing" in err and str(blocker) in err


def test_cli_refuses_an_impossible_synthetic_size_without_allocating(capsys, tmp_path):
    from fasterkd.cli import main

    t0 = time.perf_counter()
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--n", "1", "--size", "100000x100000"]) == 2
    assert time.perf_counter() - t0 < 5.0  # refused before rendering (rendering would need ~370 GiB)
    err = capsys.readouterr().err
    assert "at most 8192x8192" in err and "100000x100000" in err and not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------- checksums


def _member_offset(path: Path, suffix: str) -> tuple[int, int]:
    """(first byte, size) of a stored zip member's data, found by name suffix."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def _flip_bit(path: Path, at: int, bit: int = 6) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1 << bit
    path.write_bytes(bytes(data))


STATE = {
    "epoch": 2,
    "best_miou": 0.0468,
    "model": {"conv.weight": torch.full((4, 3), 0.82), "bn.num_batches_tracked": torch.tensor(7)},
    "half": torch.linspace(-1, 1, 8, dtype=torch.bfloat16),
    "mask": torch.tensor([True, False, True]),
    "rng": [torch.arange(5, dtype=torch.uint8), 12345],
}
# storages are numbered in pickling order: conv.weight 0, num_batches_tracked 1, half 2, mask 3, rng[0] 4
FLIPS = [("data/0", "model.conv.weight"), ("data/1", "model.bn.num_batches_tracked"), ("data/2", "half"),
         ("data/3", "mask"), ("data/4", "rng[0]")]


def test_checkpoint_round_trip_with_checksums(tmp_path):
    path = tmp_path / "last.pt"
    atomic_torch_save(STATE, path)
    back = load_verified(path)
    assert back["epoch"] == 2 and back["best_miou"] == 0.0468 and torch.equal(back["half"], STATE["half"])
    assert set(read_checksums(path)) == {"epoch", "best_miou", "model.conv.weight", "model.bn.num_batches_tracked",
                                         "half", "mask", "rng[0]", "rng[1]"}
    # still an ordinary torch file for every existing reader
    assert torch.equal(torch.load(path, weights_only=True)["model"]["conv.weight"], STATE["model"]["conv.weight"])


@pytest.mark.parametrize("member,name", FLIPS, ids=[f[1] for f in FLIPS])
def test_a_flipped_bit_in_a_tensor_is_an_error_naming_file_and_tensor(tmp_path, member, name):
    path = tmp_path / "best.pt"
    atomic_torch_save(STATE, path)
    start, size = _member_offset(path, member)
    _flip_bit(path, start + size // 2)
    with pytest.raises(CorruptFileError, match=rf"{path}: checksum mismatch in {re.escape(repr(name))}"):
        load_verified(path)


def test_a_flipped_bit_in_a_plain_value_is_caught(tmp_path):
    """best_miou 0.0468 becoming another float inside data.pkl (where no tensor lives)."""
    path = tmp_path / "last.pt"
    atomic_torch_save(STATE, path)
    raw = path.read_bytes()
    at = raw.index(struct.pack(">d", 0.0468))  # pickle BINFLOAT, big-endian
    _flip_bit(path, at + 1, bit=0)
    with pytest.raises(CorruptFileError, match=rf"{path}: checksum mismatch in 'best_miou'"):
        load_verified(path)


def test_a_tampered_checksum_record_is_an_error(tmp_path):
    path = tmp_path / "last.pt"
    atomic_torch_save(STATE, path)
    start, size = _member_offset(path, "fasterkd_checksums.json")
    _flip_bit(path, start + size // 2, bit=0)  # zipfile's CRC check of the record fires
    with pytest.raises(CorruptFileError, match=str(path)):
        load_verified(path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "png", "zip-without-pickle"])
def test_damaged_or_foreign_files_name_the_file(tmp_path, damage):
    path = tmp_path / "last.pt"
    atomic_torch_save(STATE, path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("epoch: 3\n")
    elif damage == "png":
        from PIL import Image

        Image.new("L", (4, 4)).save(path, format="PNG")
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/version", "3")
    with pytest.raises(CorruptFileError, match=rf"^{path}: not a loadable fasterkd checkpoint"):
        load_verified(path)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    torch.save({"model": {}, "x": _Payload(str(marker))}, path)
    with pytest.raises(CorruptFileError, match=rf"^{path}: not a loadable"):
        load_verified(path)
    assert not marker.exists()


def test_legacy_checkpoint_without_checksums_warns_or_is_refused(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.warns(UserWarning, match=rf"{path} has no tensor checksums"):
        assert torch.equal(load_verified(path)["w"], torch.ones(2))
    with pytest.raises(CorruptFileError, match="has no tensor checksums"):
        load_verified(path, require_checksums=True)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_verified(tmp_path / "nope.pt")


def test_save_all_stages_every_file_before_renaming_any(tmp_path):
    """best.pt then last.pt as one commit: a failure on the second leaves the first unchanged too."""
    best, last = tmp_path / "best.pt", tmp_path / "blocked" / "last.pt"
    best.write_bytes(OLD)
    (tmp_path / "blocked").write_bytes(OLD)  # a file where last.pt's folder should be
    with pytest.raises(WriteError, match="not a directory"):
        atomic_torch_save_all([({"epoch": 2}, best), ({"epoch": 2}, last)])
    assert best.read_bytes() == OLD and _leftovers(tmp_path) == []
    last = tmp_path / "last.pt"
    atomic_torch_save_all([({"epoch": 3}, best), ({"epoch": 3}, last)])
    assert load_verified(best)["epoch"] == load_verified(last)["epoch"] == 3


def test_save_all_renames_in_the_order_given(tmp_path, monkeypatch):
    order = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(Path(b).name), real(a, b)))
    atomic_torch_save_all([({"e": 1}, tmp_path / "best.pt"), ({"e": 1}, tmp_path / "last.pt")])
    assert order == ["best.pt", "last.pt"]


# ---------------------------------------------------------------------------- orphaned temporaries


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _owned(folder: Path, name: str, pid: int, host: str | None = None) -> Path:
    p = folder / f".{name}.{host or fu._host_tag()}-{pid}.ab12cd_z.tmp"
    p.write_bytes(b"x" * 100)
    return p


def test_remove_stale_temporaries_takes_only_dead_writers_files(tmp_path):
    dead = _owned(tmp_path, "last.pt", _dead_pid())
    mine = _owned(tmp_path, "best.pt", os.getpid())
    other_host = _owned(tmp_path, "last.pt", _dead_pid(), host="0badc0de" if fu._host_tag() != "0badc0de" else "0badc0df")
    legacy_old = tmp_path / ".last.pt.k3j9x_q2.tmp"
    legacy_new = tmp_path / ".best.pt.p0o9i8u7.tmp"
    for p in (legacy_old, legacy_new):
        p.write_bytes(b"x")
    os.utime(legacy_old, (time.time() - 3600, time.time() - 3600))
    keep = [tmp_path / "last.pt", tmp_path / ".hidden.tmp", tmp_path / ".last.pt.k3j9x_q2.tmp.bak", tmp_path / "a.tmp"]
    for p in keep:
        p.write_bytes(b"keep")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([dead, legacy_old])
    for p in [mine, other_host, legacy_new, *keep]:
        assert p.exists(), p


def test_remove_stale_temporaries_sees_a_reused_pid(tmp_path):
    """A live PID whose process started after the file was written is not the writer."""
    p = _owned(tmp_path, "last.pt", os.getpid())
    os.utime(p, (time.time() - 10 * 86400, time.time() - 10 * 86400))  # before this process started
    if fu.process_start_time(os.getpid()) is None:
        pytest.skip("no /proc start times here")
    assert remove_stale_temporaries(tmp_path) == [p]


def test_remove_stale_temporaries_recursive_and_missing_folder(tmp_path):
    sub = tmp_path / "predictions"
    sub.mkdir()
    p = _owned(sub, "frame.png", _dead_pid())
    assert remove_stale_temporaries(tmp_path) == [] and p.exists()
    assert remove_stale_temporaries(tmp_path, recursive=True) == [p]
    assert remove_stale_temporaries(tmp_path / "nope") == []


def test_a_writer_killed_mid_write_leaves_a_temporary_that_start_up_removes(tmp_path):
    """kill -9 inside atomic_path: the target keeps its old bytes, the orphan is cleaned afterwards."""
    target = tmp_path / "last.pt"
    target.write_bytes(OLD)
    code = ("import sys, time; from fasterkd.utils import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'half' * 1000); print('writing', flush=True); time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    orphans = _leftovers(tmp_path)
    assert len(orphans) == 1 and f"-{proc.pid}." in orphans[0]
    assert target.read_bytes() == OLD
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == orphans and _leftovers(tmp_path) == []
