"""What a failed command tells its user: one line naming the file (or flag) and the cause.

The command lines (``fasterkd`` and ``python -m fasterkd.book``) catch :data:`USER_ERRORS` and
print :func:`describe_error` of it, exit 2. Everything a user can cause lands here: bad input
(``ValueError``, missing files), any OS error of a read or a write (full disk, read-only folder,
a file where a folder is expected, no permission, an existing name), ``MemoryError`` and the
``RuntimeError`` of a library that refused its input. Files written before the error stay as they
were: every writer of the package is atomic (:func:`fasterkd.utils.atomic_path`).
"""

from __future__ import annotations

#: the exceptions a command line reports as one line (``FileNotFoundError`` is an ``OSError``)
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, MemoryError, ValueError, RuntimeError)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def describe_error(exc: BaseException) -> str:
    """One line for ``exc``: the cause and the path of an OS error, the message of any other."""
    from fasterkd.utils import WriteError

    if isinstance(exc, WriteError):
        return _first_line(str(exc))
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        cause = exc.strerror[:1].lower() + exc.strerror[1:]
        where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
        return f"{cause}: {where}"
    if isinstance(exc, MemoryError):
        detail = _first_line(str(exc))
        return "out of memory" + (f" ({detail})" if detail else "") + \
            "; try a smaller --input/--size or --batch-size"
    return _first_line(str(exc)) or type(exc).__name__
