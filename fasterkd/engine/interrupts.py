"""Stopping a run cleanly on SIGINT/SIGTERM, and the rules of a run folder (one run at a time, no
silent overwrite).

:class:`StopRequest` is installed only while ``fit()`` runs (main thread only; the previous handlers
come back on exit). The first signal sets a flag that the loop reads at the next step boundary: it
writes a resumable ``last.pt`` and raises :class:`RunInterrupted` (a ``KeyboardInterrupt``), which
the CLI prints as one line with the resume command and turns into exit 130 (SIGINT) or 143 (SIGTERM).
A second signal raises ``KeyboardInterrupt`` at once.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from fasterkd.runlock import RunLock
from fasterkd.utils import remove_stale_temporaries

# files a run writes at its top level: their presence means the folder holds a run
RUN_MARKERS = ("config.json", "last.pt")
# files an overwrite deletes before the new run starts (the rest is rewritten by the run itself)
RUN_OUTPUTS = ("last.pt", "best.pt", "eval.json", "metrics.json", "metrics.csv", "history.json")


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM after writing a resumable ``last.pt``.

    ``signum`` is the signal, ``epoch``/``step`` where it stopped (epoch 1-based), ``checkpoint``
    the file to resume from; ``exit_code`` is 128 + signum (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, epoch: int, step: int, checkpoint: Path, resume_hint: str) -> None:
        self.signum, self.epoch, self.step, self.checkpoint = signum, epoch, step, Path(checkpoint)
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"{name}: interrupted at epoch {epoch} step {step}; wrote {checkpoint}: "
                         f"resume with {resume_hint}")


def resume_hint() -> str:
    """The command that resumes this process's run: its CLI command with ``--resume``, or the
    library call when not run from the CLI."""
    argv = sys.argv
    if "fasterkd.cli" in sys.modules and argv[1:2] in (["train"], ["search"]):  # a fasterkd CLI process
        args = [a for a in argv[1:] if a != "--overwrite"]
        if "--resume" not in args:
            args.append("--resume")
        return shlex.join(["fasterkd", *args])
    return "run_stage(cfg, resume=True)"


class StopRequest:
    """SIGINT/SIGTERM handler for the duration of a ``with`` block (a no-op outside the main thread)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second signal: stop now
            self._restore()
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice: stopped at once")
        self.signum = signum
        print(f"{signal.Signals(signum).name} received: stopping after this step (again to stop at once)",
              file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()


def check_run_folder(out: Path, resume: Any, overwrite: bool) -> None:
    """Refuse a folder that already holds a run unless resuming or overwriting (which deletes the
    earlier run's checkpoints and results first)."""
    held = [m for m in RUN_MARKERS if (out / m).exists()]
    if not held or resume:
        return
    if not overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(held)}); resume it with --resume "
                         "(same configuration), choose another --out, or pass --overwrite to replace it")
    for name in RUN_OUTPUTS:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


@contextlib.contextmanager
def run_folder(out: Path, resume: Any, overwrite: bool, main: bool):
    """Rank 0 holds ``out``'s :class:`RunLock` for the block, after removing orphan temporaries and
    checking :func:`check_run_folder`; yields a :class:`StopRequest`."""
    if not main:
        with StopRequest() as stop:
            yield stop
        return
    with RunLock(out, command=" ".join(sys.argv)):
        remove_stale_temporaries(out, recursive=True)
        check_run_folder(out, resume, overwrite)
        with StopRequest() as stop:
            yield stop
