"""Raw configuration values (TOML, `KVSTORE_*` environment variables, flags) made into the
typed fields of a config dataclass, with one problem line per bad value. Generic: it knows a
key only by its dataclass field (type hint, default, and the `check` and `size` metadata that
kvstore/config.py's table sets), so the table stays one screen of definitions."""

from __future__ import annotations

import math
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any, Literal

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def expect(value: Any, kind: type, problem: str, problems: list[str]) -> Any:
    """`value` if it is a `kind`; else `problem` is noted and an empty `kind` stands in."""
    if isinstance(value, kind):
        return value
    problems.append(problem)
    return kind()


def read_toml(path: str, problems: list[str]) -> dict[str, Any]:
    """The file's tables; {} (and a problem) when it cannot be read or parsed."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as e:
        problems.append(f"config file {path}: {e.strerror}")
    except tomllib.TOMLDecodeError as e:
        problems.append(f"config file {path}: invalid TOML: {e}")
    except UnicodeDecodeError as e:  # (tomllib decodes the bytes first: TOML is UTF-8)
        problems.append(f"config file {path}: {not_utf8(e)}")
    return {}


def not_utf8(e: UnicodeDecodeError) -> str:
    """What is wrong with a TOML file (the config, the tokens file) that is not UTF-8 text."""
    return f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"


def fill(cls: type, where: str, layers: list[dict[str, tuple[Any, str]]], problems: list[str], **base: Any):
    """The values of `cls`'s keys: its defaults (and `base`), overridden by each layer in turn,
    parsed and checked. None when any of them has a problem (each one is added to `problems`)."""
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {n: f.default for n, f in known.items() if f.default is not MISSING} | base
    labels: dict[str, str] = {}
    bad: set[str] = set()  # already reported; "required" would only repeat it
    before = len(problems)
    for layer in layers:
        for key, (raw, label) in layer.items():
            if key not in known:
                problems.append(f"{where}.{key}: unknown key{_at(label)}; known: {', '.join(known)}")
                continue
            value = _coerce(f"{where}.{key}={raw!r}{_at(label)}", raw, hints[key], known[key].metadata)
            if isinstance(value, _Problem):
                problems.append(value)
                bad.add(key)
            else:
                values[key], labels[key] = value, label
    for name, f in known.items():
        if name in bad:
            continue
        if name not in values:
            problems.append(f"{where}.{name}: required")
        elif f.metadata["check"] and (problem := f.metadata["check"](values[name])):
            shown = f"{values[name]:g}" if isinstance(values[name], float) else repr(values[name])
            problems.append(f"{where}.{name}={shown}{_at(labels.get(name, ''))}: {problem}")
    return values if len(problems) == before else None


def _at(label: str) -> str:
    return f" ({label})" if label else ""


class _Problem(str):
    """A coercion failure, told apart from a value that happens to be a string."""


def _coerce(shown: str, raw: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    """Turn a TOML value, or a string from env or a flag, into the field's type."""
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        value = raw.lower() if isinstance(raw, str) else raw
        return value if value in choices else _Problem(f"{shown}: must be one of {', '.join(choices)}")
    if hint is str:
        return raw if isinstance(raw, str) else _Problem(f"{shown}: must be a string")
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word in ("true", "1", "yes", "on"):
            return True
        if word in ("false", "0", "no", "off"):
            return False
        return _Problem(f"{shown}: must be true or false")
    try:
        if isinstance(raw, bool):  # TOML `true` is an int to Python; never a number here
            raise ValueError
        if hint is int:
            return _parse_size(raw) if meta["size"] else _parse_int(raw)
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError
        return value
    except (TypeError, ValueError):
        what = "a number" if hint is float else "an integer" + (" or a size like 64GiB" * meta["size"])
        return _Problem(f"{shown}: must be {what}")


def _parse_int(raw: Any) -> int:
    if isinstance(raw, float):
        raise ValueError
    return int(raw)  # accepts "1_048_576" too


def _parse_size(raw: Any) -> int:
    if not isinstance(raw, str):
        return _parse_int(raw)
    m = re.fullmatch(r"\s*(\d[\d_]*)\s*([kmgt]?)(?:i?b)?\s*", raw.lower())
    if not m:
        raise ValueError
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def format_size(n: int) -> str:
    """1536 -> '1.5 KiB', as sizes are shown in errors, logs and docs."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = _SIZE_UNITS[unit[0].lower()]
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} B"


def doc_default(f: Any) -> str:
    """A key's default as the docs and --help show it."""
    if f.metadata["doc_default"]:
        return f.metadata["doc_default"]
    if f.default is MISSING:
        return "required"
    if f.metadata["size"]:
        return f"`{format_size(f.default)}`"
    if isinstance(f.default, bool):
        return f"`{str(f.default).lower()}`"
    if isinstance(f.default, str):
        return f'`"{f.default}"`' if f.default else "empty"
    return f"`{f.default:g}`" if isinstance(f.default, float) else f"`{f.default}`"
