"""The common shape of every model result: a dataclass with a one-line summary and JSON.

Like lmfit's ``ModelResult.dumps``/``loads``, a result survives a round trip through JSON so a
notebook or a report can store it next to the run and read it back. Non-finite floats (an
infinite N*, an unknown delay) are written as ``null`` so the JSON stays standard, and read back
as ``nan``/``None`` according to the field's type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, TypeVar

R = TypeVar("R", bound="Result")


def _plain(value: Any) -> Any:
    """Dataclasses, tuples, numpy scalars -> JSON-ready Python values (non-finite -> None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _revive(hint: Any, value: Any) -> Any:
    """Rebuild a value of type ``hint`` from its JSON form (inverse of :func:`_plain`)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _revive(non_none[0], value) if non_none else value
    if hint is float:
        return math.nan if value is None else float(value)
    if hint is int:
        return int(value)
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_revive(args[0], v) for v in value)
        return tuple(_revive(a, v) for a, v in zip(args, value))
    if origin is list:
        return [_revive(args[0], v) for v in value]
    if origin is dict:
        key_t, val_t = args
        return {_revive(key_t, k): _revive(val_t, v) for k, v in value.items()}
    return value


def _from_dict(cls: type, data: dict) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _revive(hints[f.name], data[f.name])
    return cls(**kwargs)


class Result:
    """Mixin for model result dataclasses: ``summary()``, ``to_dict()``, ``to_json()``,
    ``from_json()``."""

    #: model name written into the JSON so a stored result says what it is
    kind: typing.ClassVar[str] = "result"

    def summary(self) -> str:  # pragma: no cover - every result overrides it
        raise NotImplementedError

    def to_dict(self) -> dict:
        data = _plain(self)
        data["model"] = self.kind
        data["summary"] = self.summary()
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls: type[R], data: dict) -> R:
        return _from_dict(cls, data)

    @classmethod
    def from_json(cls: type[R], text: str) -> R:
        return cls.from_dict(json.loads(text))
