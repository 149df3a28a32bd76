"""Command argument validation that reports errors in QEMU's words.

A tiny stand-in for QEMU's QAPI input visitor: members are visited in schema
order, unknown members are reported after the known ones, and nested names are
spelled ``capabilities[0].state`` as QEMU does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from postcopy.control._errors import QMPError

__all__ = ["Enum", "Field", "ListOf", "Struct", "validate"]

_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1
_UINT64_LIMIT: Final = 1 << 64


@dataclass(frozen=True, slots=True)
class Enum:
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ListOf:
    element: Type


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    type: Type
    optional: bool = False


@dataclass(frozen=True, slots=True)
class Struct:
    fields: tuple[Field, ...] = ()


# "str", "bool", "int" (int64), "uint64" and "size" (both uint64 in QEMU's JSON visitor)
Type = str | Enum | ListOf | Struct


def _type_error(path: str, expected: str) -> QMPError:
    return QMPError(f"Invalid parameter type for '{path}', expected: {expected}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _visit(value: object, type_: Type, path: str, name: str | None) -> object:
    if isinstance(type_, Struct):
        if not isinstance(value, Mapping):
            raise _type_error(path, "object")
        return _visit_struct(value, type_, path)
    if isinstance(type_, ListOf):
        if not isinstance(value, list):
            raise _type_error(path, "array")
        return [_visit(item, type_.element, f"{path}[{i}]", None) for i, item in enumerate(value)]
    if isinstance(type_, Enum):
        if not isinstance(value, str):
            raise _type_error(path, "string")
        if value not in type_.values:
            # QEMU names the bare member here, or 'null' for a list element
            raise QMPError(f"Parameter '{name or 'null'}' does not accept value '{value}'")
        return value
    if type_ == "str":
        if not isinstance(value, str):
            raise _type_error(path, "string")
        return value
    if type_ == "bool":
        if not isinstance(value, bool):
            raise _type_error(path, "boolean")
        return value
    if type_ == "int":
        if not _is_int(value) or not _INT64_MIN <= value <= _INT64_MAX:  # type: ignore[operator]
            raise _type_error(path, "integer")
        return value
    if type_ in ("uint64", "size"):
        # QEMU accepts negative int64 for uint64 "for backward compatibility" and wraps it
        if not _is_int(value) or not _INT64_MIN <= value < _UINT64_LIMIT:  # type: ignore[operator]
            raise QMPError(f"Parameter '{path}' expects uint64")
        return value % _UINT64_LIMIT  # type: ignore[operator]
    raise AssertionError(f"unknown schema type {type_!r}")


def _visit_struct(value: Mapping[str, object], schema: Struct, path: str) -> dict[str, object]:
    prefix = f"{path}." if path else ""
    out: dict[str, object] = {}
    for field in schema.fields:
        full = prefix + field.name
        if field.name not in value:
            if field.optional:
                continue
            raise QMPError(f"Parameter '{full}' is missing")
        out[field.name] = _visit(value[field.name], field.type, full, field.name)
    for key in value:
        if key not in out:
            raise QMPError(f"Parameter '{prefix}{key}' is unexpected")
    return out


def validate(arguments: Mapping[str, object], schema: Struct) -> dict[str, object]:
    """Check ``arguments`` against ``schema``; return them with uint64 values normalised.

    Raises QMPError with QEMU's message for a missing, unexpected or ill-typed member.
    """
    return _visit_struct(arguments, schema, "")
