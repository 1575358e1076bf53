"""Stage settings, defined once: a frozen dataclass per stage whose fields carry their defaults and
help. The command line's options and the whole-pipeline TOML keys are derived from it.

    @dataclass(frozen=True)
    class ChunkConfig:
        input: str = setting(help="Glob of books.")                 # no default: required
        chunk_tokens: int = setting(1000, "Target tokens per chunk.")
        limits: PairLimits = nested(PairLimits)                     # a core config, flattened

An option's name is its field name: the TOML key `chunk_tokens`, the flag `--chunk-tokens` (plus any
`flags` aliases). A nested dataclass (the config a pure core function takes) is flattened into its
fields, whose names must be unique across the whole config. Types: str, int, float, bool, X | None,
tuple[X, ...] (comma-separated on the command line, or a repeatable flag with `repeat=True`),
dict[str, float] (`kind=share,kind=share`), or any type with a `parse` function from text.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass
from typing import Any

from lwm_data.errors import ConfigError


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    flags: tuple[str, ...] = (),
    repeat: bool = False,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A config field with its help; `flags` are extra spellings of its option, `repeat` makes a
    tuple option repeatable instead of comma-separated, `parse` reads it from command-line text."""
    metadata = {"help": help, "flags": flags, "repeat": repeat, "parse": parse}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def nested(cls: type) -> Any:
    """A field holding a core config dataclass, whose own fields become options."""
    return dataclasses.field(default_factory=cls, metadata={"nested": True})


@dataclass(frozen=True)
class Option:
    """One setting as the command line and TOML see it."""

    name: str
    path: tuple[str, ...]  # attribute path from the stage config (nested configs included)
    type: Any
    default: Any  # MISSING when required
    help: str
    flags: tuple[str, ...]
    repeat: bool
    parse: Callable[[str], Any] | None

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def cli_flags(self) -> list[str]:
        return [f"--{self.name.replace('_', '-')}", *self.flags]

    @property
    def base_type(self) -> Any:
        """The type without `| None`."""
        args = [a for a in typing.get_args(self.type) if a is not type(None)]
        return args[0] if _is_union(self.type) and len(args) == 1 else self.type

    @property
    def optional(self) -> bool:
        return _is_union(self.type) and type(None) in typing.get_args(self.type)

    @property
    def takes_text(self) -> bool:
        """Given as one string on the command line (tuples, mappings, parsed values)."""
        return self.parse is not None or (typing.get_origin(self.base_type) in (tuple, dict) and not self.repeat)

    def from_text(self, text: str) -> Any:
        """The value of a command-line string."""
        if self.parse is not None:
            return self.parse(text)
        base, origin = self.base_type, typing.get_origin(self.base_type)
        if origin is tuple:
            item = typing.get_args(base)[0]
            return tuple(item(part.strip()) for part in text.split(",") if part.strip())
        if origin is dict:
            return parse_mapping(text)
        return base(text)

    def coerce(self, value: Any) -> Any:
        """A value from TOML (or the command line, already typed) in this option's type."""
        if value is None:
            if self.optional:
                return None
            raise ConfigError(f"{self.name} cannot be empty")
        if isinstance(value, str) and self.repeat:
            return (value,)
        if isinstance(value, str) and self.takes_text:
            return self.from_text(value)
        origin = typing.get_origin(self.base_type)
        if origin is tuple:
            item = typing.get_args(self.base_type)[0]
            return tuple(item(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        if origin is dict:
            return {str(k): float(v) for k, v in dict(value).items()}
        if self.base_type is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        expected = self.base_type if isinstance(self.base_type, type) else object
        if not isinstance(value, expected):
            raise ConfigError(f"{self.name} must be {getattr(expected, '__name__', expected)}, got {value!r}")
        return value


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def parse_mapping(text: str) -> dict[str, float] | None:
    """`chat=0.84,text=0.16` -> {"chat": 0.84, "text": 0.16}; empty text -> None."""
    if not text or not text.strip():
        return None
    mapping = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{part!r} is not key=value")
        try:
            mapping[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"{part!r}: {value!r} is not a number") from None
    return mapping


def options(cls: type) -> list[Option]:
    """Every option of a config dataclass, nested configs flattened, in field order."""
    found: list[Option] = []
    _collect(cls, (), found)
    names = [o.name for o in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TypeError(f"{cls.__name__}: option names used twice: {duplicates}")
    return found


def _collect(cls: type, prefix: tuple[str, ...], found: list[Option]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            _collect(hints[f.name], prefix + (f.name,), found)
            continue
        default = (
            f.default
            if f.default is not MISSING
            else (f.default_factory() if f.default_factory is not MISSING else MISSING)
        )
        meta = f.metadata
        found.append(
            Option(
                f.name,
                prefix + (f.name,),
                hints[f.name],
                default,
                meta.get("help", ""),
                tuple(meta.get("flags", ())),
                bool(meta.get("repeat")),
                meta.get("parse"),
            )
        )


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """A config from option values by name (missing ones take their defaults); unknown names and
    missing required ones raise ConfigError."""
    known = {o.name: o for o in options(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown settings {unknown}; {cls.__name__} has: {', '.join(known)}")
    missing = [name for name, o in known.items() if o.required and values.get(name) is None]
    if missing:
        raise ConfigError(f"missing required settings: {', '.join(missing)}")
    tree: dict[str, Any] = {}
    for name, option in known.items():
        if name in values:
            node = tree
            for part in option.path[:-1]:
                node = node.setdefault(part, {})
            node[option.path[-1]] = option.coerce(values[name])
    return _instantiate(cls, tree)


def _instantiate(cls: type, tree: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            kwargs[f.name] = _instantiate(hints[f.name], tree.get(f.name, {}))
        elif f.name in tree:
            kwargs[f.name] = tree[f.name]
    return cls(**kwargs)


def flat(config: Any) -> dict[str, Any]:
    """Option name -> value (tuples as lists): the form manifests record and TOML takes back."""
    values = {}
    for option in options(type(config)):
        value = config
        for part in option.path:
            value = getattr(value, part)
        values[option.name] = list(value) if isinstance(value, tuple) else value
    return values
