"""One run per folder: a lock file recording who writes into a run folder.

``<folder>/run.lock`` holds JSON ``{"pid", "host", "started", "started_unix", "command", "token"}``.
It appears atomically, complete (written to a temporary file, then hard-linked into place, which
fails when the name exists), so two runs starting at once cannot both hold it. A second run is
refused with :class:`RunLockedError` naming the holder. A lock whose holder is gone (same host,
PID dead or reused by a later process) is taken over with a warning; a lock of another host cannot
be checked and is refused (the message says which file to delete if that run is gone).

    with RunLock(out_dir, command=" ".join(sys.argv)):
        remove_stale_temporaries(out_dir)
        ...  # train

A ``kill -9`` leaves the file behind; the next run takes it over.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from fasterkd.utils import WriteError, create_temporary, pid_alive

LOCK_NAME = "run.lock"
_TAKEOVER_STALE_S = 30.0  # a takeover guard older than this was left by a killed process


class RunLockedError(RuntimeError):
    """The run folder is held by another live run (or by a lock that cannot be checked)."""


def read_lock(path: str | os.PathLike) -> dict[str, Any] | None:
    """The holder recorded in a lock file; None when the file does not exist.

    Raises ``ValueError`` naming the file when it exists but is not a lock of this format.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"lock file {path} cannot be read ({e})") from None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"lock file {path} is not JSON ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int) or not isinstance(info.get("host"), str):
        raise ValueError(f"lock file {path} lacks the pid/host of its holder")
    return info


def describe_holder(info: dict[str, Any]) -> str:
    cmd = info.get("command") or "?"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started', '?')}, command {cmd!r}"


class RunLock:
    """Exclusive use of ``folder`` by this process (a context manager; see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, command: str | None = None, name: str = LOCK_NAME) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.command = " ".join(sys.argv) if command is None else command
        self.info: dict[str, Any] | None = None

    @property
    def held(self) -> bool:
        return self.info is not None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise :class:`RunLockedError` naming the live holder."""
        if self.held:
            return self
        now = time.time()
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(timespec="seconds"),
            "started_unix": now,
            "command": self.command,
            "token": uuid.uuid4().hex,
        }
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError(self.path, e) from e
        for _ in range(5):
            if self._create(info):
                self.info = info
                return self
            try:
                holder = read_lock(self.path)
            except ValueError as e:
                raise RunLockedError(f"{self.folder} holds a lock file that cannot be checked ({e}); "
                                     f"if no run is using the folder, delete {self.path}") from None
            if holder is None:  # released between our attempt and the read: try again
                continue
            if holder["host"] == info["host"] and not pid_alive(holder["pid"], since=holder.get("started_unix")):
                if self._take_over(holder, info):
                    warnings.warn(f"{self.folder}: took over the lock of a run that is gone ({describe_holder(holder)})",
                                  RuntimeWarning, stacklevel=2)
                    self.info = info
                    return self
                continue
            where = "" if holder["host"] == info["host"] else f"; if that run is gone, delete {self.path}"
            raise RunLockedError(f"{self.folder} is in use by another run ({describe_holder(holder)}); "
                                 f"wait for it to end or choose another output folder{where}")
        raise RunLockedError(f"{self.folder}: could not take {self.path} (other runs keep taking it)")

    def _create(self, info: dict[str, Any]) -> bool:
        """Make the lock file appear complete, or return False when it exists."""
        fd, tmp = create_temporary(self.path)
        try:
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(info, f)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    return False
                except OSError:  # a file system without hard links: exclusive create instead
                    try:
                        out = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    except FileExistsError:
                        return False
                    with os.fdopen(out, "w") as f:
                        json.dump(info, f)
            except OSError as e:
                raise WriteError(self.path, e) from e
            return True
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _take_over(self, stale: dict[str, Any], info: dict[str, Any]) -> bool:
        """Replace a dead holder's lock; one process at a time (a guard file), the others retry."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - guard.stat().st_mtime > _TAKEOVER_STALE_S:
                    guard.unlink()
            time.sleep(0.05)
            return False
        except OSError as e:
            raise WriteError(guard, e) from e
        os.close(fd)
        try:
            try:
                current = read_lock(self.path)
            except ValueError:
                return False
            if current is not None:
                if current.get("token") != stale.get("token"):
                    return False  # someone else replaced it meanwhile
                self.path.unlink()
            return self._create(info)
        finally:
            with contextlib.suppress(OSError):
                guard.unlink()

    def release(self) -> None:
        """Delete the lock file if it is still this lock's."""
        if not self.held:
            return
        try:
            current = read_lock(self.path)
        except ValueError:
            current = None
        if current is not None and current.get("token") == self.info["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.info = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
