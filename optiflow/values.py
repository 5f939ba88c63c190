"""What a value written as text (a flag, a YAML file, an environment variable) means: the one coercion.

Configuration keys, component options, Optuna sampler and pruner options and search choices are all
typed here, and every "true" optiflow reads is parsed with one vocabulary:

- true: ``1 true yes on y t``; false: ``0 false no off n f`` (any case, surrounding spaces ignored).
"""

from __future__ import annotations

import math
import os
import re
import types
import typing
from typing import Any

TRUE_WORDS = frozenset({"1", "true", "yes", "on", "y", "t"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", "n", "f"})
MAX_INT = 2**63 - 1  # what torch and numpy sizes and seeds can hold
EXACT_FLOAT_INT = 2**53  # the largest whole number 1e15-style notation gives exactly
_NONE_WORDS = frozenset({"none", "null", ""})


def parse_bool(value: object) -> bool:
    """``value`` as a bool (a bool, or a word of the vocabulary above); ValueError otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(value)


def env_flag(variable: str, default: bool = False) -> bool:
    """Whether environment switch ``variable`` is on. A switch off by default is on only for a true word; one on
    by default (``default=True``) is off only for a false word; unset or empty gives ``default``."""
    text = os.environ.get(variable, "").strip().lower()
    return text not in FALSE_WORDS if default else text in TRUE_WORDS


def key_name(text: object) -> str:
    """A configuration key, option or search-space name as Python spells it: ``warmup-epochs`` and
    ``warmup_epochs`` are one name (a flag's dashes are a key's underscores)."""
    return str(text).replace("-", "_")


def dashed_name(text: str) -> str:
    """The reverse of :func:`key_name`: ``--batch-size`` for key ``batch_size``, ``step-lr`` for ``step_lr``."""
    return text.replace("_", "-")


def coerce(tp: object, value: object, *, ranged: bool = True) -> Any:
    """``value`` converted to type ``tp``: bool, int, float, str, a union of them (``none``, ``null`` or
    empty is None where it allows None; str is tried last), ``tuple[T, ...]`` (``64,32``, ``64x32``,
    ``[64,32]``, ``1-2``) or ``Any``.

    Raises TypeError or ValueError for a value that is not one, OverflowError for an integer beyond
    +-:data:`MAX_INT`.  ``ranged=False`` leaves ranges to the caller, which names them (a configuration
    key): ``inf``, ``nan`` and integers beyond MAX_INT come through.  A bool is never taken for a number,
    nor a fractional number for an int.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(args, value, ranged)
    if origin is tuple or tp is tuple:
        item_type = args[0] if args else float
        return tuple(coerce(item_type, item, ranged=ranged) for item in _items(value))
    if tp is bool:
        return parse_bool(value)
    if tp is int:
        return _coerce_int(value, ranged)
    if tp is float:
        if isinstance(value, (bool, dict, list, tuple)) or value is None:
            raise TypeError(value)
        number = float(value)  # type: ignore[arg-type]  # str, int, float; anything else raises
        if ranged and not math.isfinite(number):
            raise ValueError(value)
        return number
    if tp is str:
        if isinstance(value, (dict, list, tuple, set)) or value is None:
            raise TypeError(value)
        return str(value)
    if tp is Any:
        return value
    raise TypeError(f"unsupported type {tp!r}")


def is_number(text: str) -> bool:
    """Whether ``text`` (a CSV cell) reads as a number."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def literal(value: object) -> bool | int | float | str | None:
    """A value given without a type (a search choice, a sampler option) as Optuna stores it: a number when
    it reads as one, a bool when spelled ``true``/``false``, else the text.  Other true/false words stay
    text (``off`` may be a mode's name); a typed option reads them with :func:`coerce`."""
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    text = str(value).strip()
    for number_type in (int, float):  # Python's literals: 1e30 stays a float
        try:
            return number_type(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def type_name(tp: object) -> str:
    """How an error names type ``tp``: ``int``, ``float or none``, ``list of int``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is tuple:
        return f"list of {type_name(args[0])}" if args else "list"
    return str(getattr(tp, "__name__", tp)).replace("NoneType", "none")


def _coerce_union(args: tuple[object, ...], value: object, ranged: bool) -> object:
    if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
        return None
    for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):  # text takes anything: last
        try:
            return coerce(arg, value, ranged=ranged)
        except (TypeError, ValueError):
            continue
    raise ValueError(value)


def _items(value: object) -> list[object]:
    """The items of a list written as text (``64,32``, ``64x32``, ``[64,32]``, ``1-2``) or given as a list."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, str):
        return [value]
    text = value.strip()
    if text[:1] in "[(" or text[-1:] in "])":
        if text[:1] + text[-1:] not in ("[]", "()") or any(c in text[1:-1] for c in "[]()"):
            raise ValueError(value)
        text = text[1:-1]
    if "," in text:
        items = text.split(",")
    elif "x" in text:
        items = text.split("x")
    else:
        items = re.split(r"(?<=\d)-(?=[\d.])", text)
    return [v for v in items if v.strip()]


def _coerce_int(value: object, ranged: bool) -> int:
    if isinstance(value, (bool, dict, list, tuple)) or value is None:
        raise TypeError(value)
    if isinstance(value, str) and "e" in value.lower():  # 1e3: exact as a float up to 2**53, not 2.5e0 nor 1e30
        value = float(value)
        if abs(value) > EXACT_FLOAT_INT:
            raise ValueError(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)  # inf and nan included
    whole = int(value)  # type: ignore[call-overload]  # str, int, float; anything else raises
    if ranged and not -MAX_INT <= whole <= MAX_INT:
        raise OverflowError(value)
    return whole


DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhd])")


def parse_duration(value: object) -> float:
    """A wall time in seconds: ``90``, ``90s``, ``30m``, ``2h``, ``1h30m`` (units s, m, h, d, largest first, a part
    after a larger unit below it); ValueError otherwise (``1h99m``, ``''``, anything not finite and > 0)."""
    text = str(value).strip().lower().replace(" ", "")
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(number + unit for number, unit in parts) != text:
            raise ValueError(value) from None
        units = [DURATION_UNITS[unit] for _, unit in parts]
        # units largest first, each once; after a larger unit a part stays below it (1h30m, not 1h99m or 30m1h)
        if units != sorted(set(units), reverse=True) or any(
                float(number) * unit >= above for (number, _), unit, above in zip(parts[1:], units[1:], units)):
            raise ValueError(value) from None
        seconds = sum(float(number) * unit for (number, _), unit in zip(parts, units))
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(value)
    return seconds


def duration_text(seconds: float) -> str:
    """``seconds`` as a person reads a wall time: ``0.4s``, ``42s``, ``3m05s``, ``2h10m``."""
    if seconds < 9.95:
        return f"{max(0.0, seconds):.1f}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
