"""Small helpers shared by every stage: device choice, seeding, atomic file writes.

Every file fasterkd writes goes through :func:`atomic_path` (or the ``atomic_*`` writers built on
it): the bytes go to a hidden temporary file ``.<name>.<host>-<pid>.<random>.tmp`` beside the
target, which is fsynced and renamed over the target. A crash leaves the previous file intact; an
OS error (full disk, read-only folder, a file where a folder is expected, no memory) becomes one
:class:`WriteError` naming the path and the cause. :func:`remove_stale_temporaries` deletes the
temporary files a killed writer left. :func:`atomic_torch_save` records a SHA-256 of every tensor
and value inside the checkpoint; :func:`load_verified` checks them on load.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import hashlib
import io
import json
import math
import os
import random
import re
import socket
import tempfile
import time
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:  # torch is imported where used: the run lock and the cleanup start without it
    import torch


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """Return a torch.device; ``"auto"`` picks CUDA when present, else CPU."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parse_size(text: str | tuple[int, int] | list[int], name: str = "size") -> tuple[int, int]:
    """Parse ``"HxW"`` (or a pair) into ``(H, W)``; the error names the parameter."""
    if isinstance(text, (tuple, list)):
        if len(text) != 2:
            raise ValueError(f"{name} must be a pair (H, W), got {text!r}")
        h, w = (int(v) for v in text)
    else:
        parts = str(text).lower().replace("*", "x").split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"{name} must look like HxW (e.g. 256x512), got {text!r}")
        h, w = (int(p) for p in parts)
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {h}x{w}")
    return h, w


def jsonable(obj: Any) -> Any:
    """``obj`` with tuples as lists and paths as strings, as ``json`` writes and reads it back."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def strict_json(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as ``None`` (null), so the file is valid strict JSON (empty classes)."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------------------------
# Atomic writes and their one error type
# --------------------------------------------------------------------------------------------


class WriteError(OSError, ValueError):
    """A file could not be written. ``str()`` is one line naming the cause and the path.

    It is an ``OSError`` (``errno`` is the cause's) and a ``ValueError``, so a command line that
    prints ``ValueError`` as one line (``fasterkd.cli.main``) already reports it without a traceback.
    """

    def __init__(self, path: str | os.PathLike, cause: BaseException) -> None:
        code = getattr(cause, "errno", None)
        super().__init__(code, _describe_cause(cause))
        self.path = Path(path)
        self.cause = cause
        where = f"writing {self.path}"
        other = getattr(cause, "filename", None)
        if other is not None and Path(other) != self.path and not Path(str(other)).name.endswith(".tmp"):
            where += f" ({other})"
        self.message = f"{self.strerror} {where}"

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # picklable across processes (DataLoader workers, multiprocessing)
        return (_rebuild_write_error, (str(self.path), self.errno, self.message))


def _rebuild_write_error(path: str, code: int | None, message: str) -> WriteError:
    err = WriteError(path, OSError(code, message))
    err.message = message
    return err


def _describe_cause(cause: BaseException) -> str:
    if isinstance(cause, MemoryError):
        return "out of memory"
    code = getattr(cause, "errno", None)
    if code:
        text = os.strerror(code)
        return text[:1].lower() + text[1:]
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return f"{type(cause).__name__}: {first};"


# torch.save reports a failed write (a full disk, above all) as a RuntimeError of its zip writer
_TORCH_WRITE_FAILURE = re.compile(r"inline_container|PytorchStreamWriter|unexpected pos|file write failed")


def _as_write_error(path: Path, exc: BaseException) -> WriteError | None:
    """The :class:`WriteError` for an exception raised while writing ``path``; None if it is not one."""
    if isinstance(exc, WriteError):
        return exc
    if isinstance(exc, OSError) and getattr(exc, "filename", None) is not None:
        named = Path(exc.filename)
        if named != path and named.parent != path.parent and named not in path.parents:
            return None  # an error of another file the caller read (e.g. its input), not of this write
    if isinstance(exc, (OSError, MemoryError)):
        return WriteError(path, exc)
    if isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILURE.search(str(exc)):
        with contextlib.suppress(OSError):
            if os.statvfs(path.parent).f_bavail == 0:
                return WriteError(path, OSError(_errno.ENOSPC, os.strerror(_errno.ENOSPC)))
        return WriteError(path, exc)
    return None


def _host_tag() -> str:
    """8 hex digits of this machine's name: a temporary file's owner is (host, pid)."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def create_temporary(path: Path) -> tuple[int, Path]:
    """Create the folder and an empty owned temporary ``.<name>.<host>-<pid>.<random>.tmp`` beside ``path``."""
    try:
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():  # a file where a folder is expected
            raise NotADirectoryError(_errno.ENOTDIR, os.strerror(_errno.ENOTDIR), str(ancestor))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(_errno.EISDIR, os.strerror(_errno.EISDIR), str(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host_tag()}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except (OSError, MemoryError) as e:
        raise WriteError(path, e) from e
    return fd, Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    A crash or a kill while writing leaves the old file (or nothing), never a half-written one.
    Any OS error or ``MemoryError`` (raised here or by the caller's write into the temporary path)
    becomes a :class:`WriteError` naming ``path``; the previous file stays and no temporary is left.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        fd, tmp_path = create_temporary(path)
        os.close(fd)
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
        except BaseException as e:
            err = _as_write_error(path, e)
            if err is None:
                raise
            if err is e:
                raise
            raise err from e
        with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# --------------------------------------------------------------------------------------------
# Checkpoints with checksums
# --------------------------------------------------------------------------------------------

CHECKSUM_RECORD = ".data/fasterkd_checksums.json"  # inside the zip archive torch.save writes
CHECKSUM_FORMAT = "fasterkd-checksums"


class CorruptFileError(ValueError):
    """A checkpoint that cannot be trusted: unreadable, refused by ``weights_only``, or a checksum
    that differs. The message names the file (and the first differing entry)."""


def _leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, leaf) of every tensor and plain value in nested dicts/lists/tuples, in order."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        if not obj:
            yield prefix or "<root>", type(obj).__name__ + "()"
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix or "<root>", obj


def _digest(value: Any) -> str:
    import torch

    h = hashlib.sha256()
    if isinstance(value, torch.Tensor):
        t = value.detach()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}\n".encode())
        if t.layout == torch.strided and not t.is_quantized and t.device.type != "meta":
            flat = t.cpu().contiguous().reshape(-1)
            if flat.numel():
                h.update(memoryview(flat.view(torch.uint8).numpy()))
        else:  # no such tensors in fasterkd checkpoints; their repr still covers dtype and shape
            h.update(repr(t).encode())
    else:
        h.update(f"{type(value).__name__} {value!r}".encode())
    return h.hexdigest()


def tensor_checksums(obj: Any) -> dict[str, str]:
    """SHA-256 (hex) of every tensor (dtype, shape and bytes) and plain value in ``obj``, by dotted name."""
    return {name: _digest(leaf) for name, leaf in _leaves(obj)}


def _add_checksum_record(buf: io.BytesIO, sums: dict[str, str]) -> None:
    record = {"format": CHECKSUM_FORMAT, "version": 1, "algorithm": "sha256", "entries": sums}
    with zipfile.ZipFile(buf, "a") as z:
        prefix = z.namelist()[0].split("/")[0]
        z.writestr(f"{prefix}/{CHECKSUM_RECORD}", json.dumps(record))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically, with a SHA-256 of every tensor and value recorded
    inside the file's zip archive (:func:`load_verified` checks them; plain ``torch.load`` ignores
    them). Serialised in memory first, so a failed write is an ``OSError`` of the file, not torch's
    ``inline_container`` message; any failure is a :class:`WriteError` naming ``path``."""
    import torch

    path = Path(path)
    try:
        buf = io.BytesIO()
        torch.save(obj, buf)
        _add_checksum_record(buf, tensor_checksums(obj))
        data = buf.getbuffer()
    except MemoryError as e:
        raise WriteError(path, e) from e
    atomic_write_bytes(path, data)


def atomic_torch_save_all(items: Sequence[tuple[Any, str | os.PathLike]]) -> None:
    """Save several checkpoints as one commit: every file is written to its temporary first (a full
    disk fails before any target changes), then renamed over its target in the order given.

    Give the file that records progress last (``[(state, best), (state, last)]``): a kill between two
    renames then leaves the earlier files newer, never older, than the last one, so a resume that
    redoes the unfinished step rewrites them consistently.
    """
    import torch

    with contextlib.ExitStack() as stack:
        temps = []
        for obj, target in items:
            target = Path(target)
            try:
                buf = io.BytesIO()
                torch.save(obj, buf)
                _add_checksum_record(buf, tensor_checksums(obj))
            except MemoryError as e:
                raise WriteError(target, e) from e
            temps.append((stack.enter_context(_staged(target, buf.getbuffer())), target))
        for tmp, target in temps:
            try:
                os.replace(tmp, target)
            except OSError as e:
                raise WriteError(target, e) from e


@contextlib.contextmanager
def _staged(path: Path, data: bytes | memoryview) -> Iterator[Path]:
    """A fsynced temporary beside ``path`` holding ``data``; removed on exit unless renamed away."""
    tmp_path: Path | None = None
    try:
        fd, tmp_path = create_temporary(path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, MemoryError) as e:
            raise WriteError(path, e) from e
        yield tmp_path
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink()


def read_checksums(path: str | os.PathLike) -> dict[str, str] | None:
    """The checksums recorded in a checkpoint written by :func:`atomic_torch_save`; None when it has none."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/" + CHECKSUM_RECORD)]
            if not names:
                return None
            record = json.loads(z.read(names[0]))  # zipfile checks this record's CRC
    except (zipfile.BadZipFile, ValueError, KeyError, EOFError) as e:
        raise CorruptFileError(f"{path}: the checksum record cannot be read ({e})") from None
    if not isinstance(record, dict) or record.get("format") != CHECKSUM_FORMAT or not isinstance(record.get("entries"), dict):
        raise CorruptFileError(f"{path}: the checksum record is malformed")
    return record["entries"]


def load_verified(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                  require_checksums: bool = False) -> Any:
    """Load a checkpoint with ``torch.load(weights_only=True)`` and verify its recorded checksums.

    Raises ``FileNotFoundError`` for a missing file and :class:`CorruptFileError` (a ``ValueError``)
    naming the file for one that is truncated, not a checkpoint, refused by ``weights_only`` (a
    pickle that would run code) or whose first differing tensor/value it names. A file without
    checksums (written before they were recorded, or by plain ``torch.save``) loads with a warning,
    or is refused when ``require_checksums``.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # torch/pickle/zip raise many types for a damaged or foreign file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CorruptFileError(f"{path}: not a loadable fasterkd checkpoint ({type(e).__name__}: {first})") from None
    expected = read_checksums(path)
    if expected is None:
        if require_checksums:
            raise CorruptFileError(f"{path}: has no tensor checksums (not written by fasterkd's atomic_torch_save)")
        warnings.warn(f"{path} has no tensor checksums (written by plain torch.save or an older fasterkd); "
                      "loaded without verification", stacklevel=2)
        return obj
    actual = tensor_checksums(obj)
    for name, digest in actual.items():
        if name not in expected:
            raise CorruptFileError(f"{path}: entry {name!r} is not among the recorded checksums (the file is corrupt)")
        if expected[name] != digest:
            raise CorruptFileError(f"{path}: checksum mismatch in {name!r}: its bytes differ from the ones written "
                                   "(the file is corrupt; use another copy or retrain)")
    missing = [n for n in expected if n not in actual]
    if missing:
        raise CorruptFileError(f"{path}: entry {missing[0]!r} was written but is missing (the file is corrupt)")
    return obj


# --------------------------------------------------------------------------------------------
# Processes and orphaned temporary files
# --------------------------------------------------------------------------------------------


def _boot_time() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    return None


def process_start_time(pid: int) -> float | None:
    """Unix time the process ``pid`` started (Linux ``/proc``); None where unknown."""
    boot = _boot_time()
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None
    if boot is None:
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def pid_alive(pid: int, since: float | None = None) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie counts as dead).

    With ``since`` (a Unix time the owner was known to run, e.g. a file's mtime), a process that
    started more than 2 s after it is a later process that reused the PID, and counts as dead.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    except OSError:
        return False
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        if stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X"):
            return False
    if since is not None:
        started = process_start_time(pid)
        if started is not None and started > since + 2.0:
            return False
    return True


_TMP_OWNED = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")
_TMP_LEGACY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = False,
                             legacy_age_s: float = 600.0) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` left in ``folder`` when its writer was killed.

    Only the writer's own pattern ``.<name>.<host>-<pid>.<random>.tmp`` is touched, and only when
    that host is this one and the PID is no longer alive (or was reused by a later process).
    Names without an owner (``.<name>.<random>.tmp``, written before the owner was recorded) are
    removed once unmodified for ``legacy_age_s`` seconds. Call it at run start-up, after taking
    the folder's :class:`fasterkd.runlock.RunLock`. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host, now, removed = _host_tag(), time.time(), []
    candidates = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    for p in sorted(candidates):
        try:
            st = p.lstat()
        except OSError:
            continue
        if not p.is_file() or p.is_symlink():
            continue
        owned = _TMP_OWNED.match(p.name)
        if owned:
            if owned["host"] != host or pid_alive(int(owned["pid"]), since=st.st_mtime):
                continue
        elif not (_TMP_LEGACY.match(p.name) and now - st.st_mtime >= legacy_age_s):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed
