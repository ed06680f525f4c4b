"""Plain dicts <-> typed dataclasses: the checks and messages every config section shares.

`build(cls, data, prefix)` makes a dataclass from a mapping, refusing unknown keys (with a
suggestion) and values of the wrong type (one line naming the dotted key); `set_dotted` and
`parse_overrides` apply `key=value` command-line overrides to a nested dict. No raykd imports
beyond the error type, so every module can use it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from typing import Any

import yaml

from raykd.errors import ConfigError, suggest


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _number_text(value, tp):
    """A float field given text that reads as a number takes the number: YAML 1.1 reads `1e-3` (no dot)
    as a string, and a person writing train.lr=1e-3 means 0.001."""
    if isinstance(value, str) and float in (typing.get_args(tp) or (tp,)):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def build(cls, data: dict, prefix: str):
    """The dataclass `cls` from `data` (nested sections built recursively; `prefix` names them in errors)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping of fields, got {data!r}; set its fields one by one, e.g. {prefix}.FIELD=VALUE")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{path}: unknown key{suggest(key, names) or ';'} valid keys here: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if key == "teacher" and isinstance(value, str):  # `teacher: smollm2-135m` shorthand
                value = {"model": value}
            kwargs[key] = build(tp, value or {}, path)
            continue
        value = _number_text(value, tp)
        if not _type_ok(value, tp):
            raise ConfigError(f"{path}: expected {_tname(tp)}, got {value!r}; fix the value in the YAML or the override")
        kwargs[key] = float(value) if tp is float else value
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the key check above
        raise ConfigError(f"{prefix}: {e}") from None


_FRIENDLY = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", dict: "a mapping"}


def _tname(tp) -> str:
    """'an integer', 'a list or null', ... for error messages."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _tname(a) for a in typing.get_args(tp))
    return _FRIENDLY.get(typing.get_origin(tp) or tp, str(tp))


def set_dotted(data: dict, dotted: str, value) -> None:
    """Set `a.b.c` in a nested dict (creating intermediate mappings)."""
    node = data
    keys = dotted.split(".")
    for k in keys[:-1]:
        if k == "teacher" and isinstance(node.get(k), str):
            node[k] = {"model": node[k]}
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{k}' is not a section; set its fields instead")
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip() or ".." in item.split("=", 1)[0]:
            raise ConfigError(f"{item}: overrides look like key=value, e.g. student.num_layers=10")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _refuse_glued_colons(key.strip(), raw, value)
        out.append((key.strip(), value))
    return out


def _refuse_glued_colons(key: str, raw: str, value) -> None:
    """`data.mix={sotu:1}` is YAML for a key 'sotu:1' with no value: refused here, naming the spelling that works,
    rather than later as an unknown key or a missing weight."""
    if isinstance(value, dict):
        glued = next((k for k, v in value.items() if v is None and isinstance(k, str) and ":" in k.strip(":")), None)
        if glued is not None:
            fixed = re.sub(r"(?<=[\w'\"]):(?=[^\s/])", ": ", raw)
            raise ConfigError(f"{key}: '{glued}' reads as one key with no value (YAML needs a space after ':'); write {key}='{fixed}'")
        for k, v in value.items():
            _refuse_glued_colons(f"{key}.{k}", raw, v)


class _Duplicate(yaml.YAMLError):
    """A key given twice in one mapping, at line:column."""


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                mark = key_node.start_mark
                raise _Duplicate(f"{mark.line + 1}:{mark.column + 1}: '{key}' is given twice in one mapping (YAML would keep the last silently); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml_file(path) -> dict:
    """A YAML config file as a mapping (an empty file: {}), or one ConfigError naming the file, the line and the fix."""
    if os.path.isdir(path):
        raise ConfigError(f"config: {path} is a directory; pass the path of a YAML config such as jobs/demo.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"config: file not found: {path}; pass the path of a YAML config such as jobs/demo.yaml")
    with open(path) as fh:
        try:
            data = yaml.load(fh, Loader=_StrictLoader) or {}  # noqa: S506 (a SafeLoader subclass)
        except _Duplicate as e:
            raise ConfigError(f"config: {path}:{e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config: {where}: not valid YAML ({what}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of sections (teacher:, student:, ...)")
    return data
