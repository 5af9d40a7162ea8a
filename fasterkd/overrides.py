"""Typed configuration values: ``--set KEY=VALUE`` strings and config-file values, checked against
the type of the field they set, and a safe reader for YAML/JSON config files.

``coerce_override("loss.ohem", "False", bool)`` is ``False`` (not the truthy string "False");
``coerce_override("epochs", [1], int)`` raises ``ValueError("epochs: expected an integer, got [1]")``.
Strings are parsed (booleans ``true/false/yes/no/on/off/1/0`` in any case, numbers, sizes such as
``256x512`` or ``[256, 512]``, ``none``/``null`` for optional fields); values that are already typed
(from JSON or YAML) are validated the same way. ``field_types(SomeConfig)`` gives a dataclass's
resolved field types to pass as the target.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null"}
_INT = re.compile(r"[+-]?\d+")


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of every field of dataclass ``cls`` (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_annotation(target: Any) -> bool:
    return (target is Any or isinstance(target, (type, types.UnionType))
            or typing.get_origin(target) is not None)


def _type_of_default(value: Any) -> Any:
    """The type a field holds, judged from its default value (used when no annotation is given)."""
    if value is None:
        return Any
    if isinstance(value, tuple):
        kinds = {type(v) for v in value}
        return tuple[(_type_of_default(value[0]) if len(kinds) == 1 else Any), ...]
    if isinstance(value, list):
        kinds = {type(v) for v in value}
        return list[_type_of_default(value[0]) if len(kinds) == 1 else Any]
    if isinstance(value, dict):
        return dict[str, Any]
    return type(value)


def describe_type(tp: Any) -> str:
    """Words for a type in an error message, e.g. ``2 integers (e.g. 256x512 or [256, 512])``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin in (typing.Union, types.UnionType):
        names = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or none" if type(None) in args else "")
    if tp is bool:
        return "a boolean (true/false, yes/no, on/off, 1/0)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_plural(args[0])}"
    if origin is tuple and args:
        if len(set(args)) == 1 and args[0] is int and len(args) == 2:
            return "2 integers (e.g. 256x512 or [256, 512])"
        if len(set(args)) == 1:
            return f"{len(args)} {_plural(args[0])}"
        return f"a list of {len(args)} values ({', '.join(describe_type(a) for a in args)})"
    if origin is list:
        return f"a list of {_plural(args[0]) if args else 'values'}"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(
        tp, f"values ({describe_type(tp)})")


def coerce_override(key: str, raw: Any, target: Any) -> Any:
    """``raw`` as a value of the field ``key``'s type, or ``ValueError`` naming ``key`` and the type.

    ``target`` is the field's type (``int``, ``float | None``, ``tuple[int, int]``, ... as given by
    :func:`field_types`) or, when it is not a type, the field's default value, whose type is used
    (a default tuple stands for a tuple of any length: pass the annotation to fix the length; a
    default None accepts any JSON value). Prefer the annotation.
    ``raw`` is a command-line string (parsed) or a value read from JSON/YAML (validated).
    """
    tp = target if _is_annotation(target) else _type_of_default(target)
    return _coerce(key, raw, tp)


def _fail(key: str, raw: Any, tp: Any, why: str = "") -> ValueError:
    return ValueError(f"{key}: expected {describe_type(tp)}, got {raw!r}{'; ' + why if why else ''}")


def _coerce(key: str, raw: Any, tp: Any) -> Any:
    text = isinstance(raw, str)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        if text:
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                return raw
        return raw
    if origin in (typing.Union, types.UnionType):
        if raw is None or (text and raw.strip().lower() in _NONE):
            if type(None) in args:
                return None
            raise _fail(key, raw, tp)
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(key, raw, option)
            except ValueError:
                continue
        raise _fail(key, raw, tp)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        if text and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise _fail(key, raw, tp)
    if tp is int:
        if isinstance(raw, bool):
            raise _fail(key, raw, tp)
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if text and _INT.fullmatch(raw.strip()):
            return int(raw.strip())
        raise _fail(key, raw, tp)
    if tp is float:
        if isinstance(raw, bool):
            raise _fail(key, raw, tp)
        if isinstance(raw, (int, float)):
            value = float(raw)
        elif text:
            try:
                value = float(raw.strip())
            except ValueError:
                raise _fail(key, raw, tp) from None
        else:
            raise _fail(key, raw, tp)
        if not math.isfinite(value):
            raise _fail(key, raw, tp, "NaN and infinity are not allowed")
        return value
    if tp is str:
        if text:
            return raw
        if isinstance(raw, os.PathLike):  # a checkpoint or arch path given as a Path
            return os.fspath(raw)
        raise _fail(key, raw, tp)
    if origin in (tuple, list):
        return _coerce_sequence(key, raw, tp, origin, args)
    if origin is dict or tp is dict:
        value = raw
        if text:
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                raise _fail(key, raw, tp, "write it as JSON, e.g. {\"a\": 1}") from None
        if not isinstance(value, dict):
            raise _fail(key, raw, tp)
        return value
    raise TypeError(f"{key}: coerce_override does not handle the type {tp!r}")


def _coerce_sequence(key: str, raw: Any, tp: Any, origin: type, args: tuple) -> Any:
    if args and len(args) == 2 and args[1] is Ellipsis:
        elem_types, fixed = None, None
        elem = args[0]
    elif origin is tuple and args:
        elem_types, fixed, elem = list(args), len(args), None
    else:
        elem_types, fixed, elem = None, None, (args[0] if args else Any)
    items: Any = raw
    if isinstance(raw, str):
        s = raw.strip()
        if s[:1] in "[(":
            try:
                items = json.loads(s.replace("(", "[").replace(")", "]"))
            except json.JSONDecodeError:
                raise _fail(key, raw, tp) from None
        elif s == "":
            items = []
        elif all(t is int for t in (elem_types or [elem])) and re.fullmatch(r"\s*\d+\s*[x*]\s*\d+\s*", s.lower()):
            items = re.split(r"[x*]", s.lower())
        else:
            items = [p for p in s.split(",")]
    if not isinstance(items, (list, tuple)):
        if not isinstance(raw, str) and elem is not None and not isinstance(raw, (dict, bool)):
            items = [raw]  # a single number for a variable-length list: e.g. scales: 1.0
        else:
            raise _fail(key, raw, tp)
    if fixed is not None and len(items) != fixed:
        raise _fail(key, raw, tp, f"{len(items)} value(s) given")
    out = []
    for i, item in enumerate(items):
        item_type = elem_types[i] if elem_types is not None else elem
        try:
            out.append(_coerce(f"{key}[{i}]", item.strip() if isinstance(item, str) else item, item_type))
        except ValueError:
            raise _fail(key, raw, tp, f"item {i} ({item!r}) is not {describe_type(item_type)}") from None
    return tuple(out) if origin is tuple else out


def parse_set(item: str) -> tuple[str, str]:
    """Split one ``--set KEY=VALUE`` into ``(key, raw value string)``; ``ValueError`` when malformed."""
    if "=" not in item:
        raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ValueError(f"--set expects KEY=VALUE with KEY a field name such as optim.lr, got {item!r}")
    return key, value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or JSON config file as a mapping of option names to values.

    YAML is read with ``safe_load``: a ``!!python/...`` tag (which would build Python objects) is a
    ``ValueError`` naming the file and line, as is a syntax error, a file that is not text, or a
    top level that is not a mapping. A missing file is ``FileNotFoundError``; an empty one is ``{}``.
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise ValueError(f"config {str(path)!r} is not a file (expected a YAML or JSON file)")
        raise FileNotFoundError(f"config {str(path)!r} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"config {path}: not a UTF-8 text file (expected YAML or JSON)") from None
    except OSError as e:
        raise ValueError(f"config {path}: cannot be read ({e.strerror or e})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.constructor.ConstructorError as e:
            line = f" line {e.problem_mark.line + 1}:" if e.problem_mark is not None else ""
            raise ValueError(f"config {path}:{line} {e.problem} (a config file holds plain values only; "
                             "no !!python tags)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1} column {mark.column + 1}:" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"config {path}: not valid YAML ({line.strip()} {problem})".replace("( ", "(")) from None
    else:
        try:
            data = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as e:
            raise ValueError(f"config {path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ValueError(f"config {path}: option names must be strings, got {bad[0]!r}")
    return data
