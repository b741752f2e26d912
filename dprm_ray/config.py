"""One config tree per job: OmegaConf structured configs built from dataclasses.

A job's config is its dataclass defaults, then an optional YAML file (`--config FILE`) or mapping
of values (a Ray Serve application's `args`), then dotted overrides (`a.b=c`, or `--a-b c` for convenience). Unknown keys, wrong types, missing
required values and numbers out of range raise `ConfigError` with a one-line message that names
the key, before any Ray or model start-up.

Ranges and output paths are declared in a field's metadata, next to its help text:
`min`/`max` (inclusive) and `above`/`below` (exclusive) bound a number (None, where a field
allows it, is not checked); `output: "file"` or `"folder"` marks a path the job writes, checked
by `check_output_paths` before the job starts.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

if typing.TYPE_CHECKING:  # imported where configs are built: the checks below need no OmegaConf
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

# OmegaConf's marker of a required value (omegaconf.MISSING is this string), defined here so that
# the library's config dataclasses and their checks import without OmegaConf (bench/gpu_check.py
# runs where only torch and transformers are installed).
MISSING = "???"

T = TypeVar("T")

__all__ = [
    "MISSING",
    "ConfigError",
    "check_output_paths",
    "check_ranges",
    "describe_config",
    "load_config",
    "normalise_overrides",
    "to_yaml",
    "validate_config",
]


class ConfigError(ValueError):
    """A config problem the user must fix; the message is one line naming the key."""


def normalise_overrides(args: Sequence[str]) -> list[str]:
    """Turn `--some-key value`, `--some-key=value` and `a.b=c` into dotted `key=value` strings."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, value = body, args[i + 1]
                i += 1
            else:
                # A bare flag means true, like argparse's store_true.
                key, value = body, "true"
            out.append(f"{key.replace('-', '_')}={value}")
        elif "=" in arg and not arg.startswith("="):
            out.append(arg)
        else:
            raise ConfigError(f"cannot read argument '{arg}': expected key=value or --key value")
        i += 1
    return out


def _key_of(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    return str(key)


def _one_line(exc: OmegaConfBaseException) -> str:
    # OmegaConf messages carry a multi-line "full_key / object_type" trailer; keep the first line.
    return str(exc).splitlines()[0].strip()


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        OmegaConfBaseException,
        ValidationError,
    )

    try:
        return typing.cast(DictConfig, OmegaConf.merge(base, other))
    except (ConfigKeyError, ConfigAttributeError) as exc:
        raise ConfigError(f"{source}: unknown config key '{_key_of(exc)}'") from None
    except ValidationError as exc:
        raise ConfigError(f"{source}: bad value for '{_key_of(exc)}': {_one_line(exc)}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_one_line(exc)}") from None


RANGE_KEYS = {"min": ">=", "max": "<=", "above": ">", "below": "<"}


def _out_of_range(value: float, metadata: Any) -> str | None:
    """`must be >= 1` if `value` breaks a bound in the field's metadata, else None."""
    for key, op in RANGE_KEYS.items():
        if key not in metadata:
            continue
        bound = metadata[key]
        ok = {
            ">=": value >= bound,
            "<=": value <= bound,
            ">": value > bound,
            "<": value < bound,
        }[op]
        if not ok:
            return f"must be {op} {bound}"
    return None


def range_text(metadata: Any) -> str:
    """The bounds of a field as text, e.g. `>= 0, < 1` ('' when unbounded)."""
    return ", ".join(f"{op} {metadata[key]}" for key, op in RANGE_KEYS.items() if key in metadata)


def _leaf_fields(cfg: Any, schema: type, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, dataclass field, value) of every field of `cfg` that is not itself a nested
    config; nested configs are walked."""
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        key = f"{prefix}{field.name}"
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(hints[field.name]):
            yield from _leaf_fields(value, typing.cast(type, hints[field.name]), f"{key}.")
        else:
            yield key, field, value


def check_ranges(cfg: Any, schema: type, prefix: str = "") -> None:
    """Raise ConfigError naming the first key whose number is outside its declared range.

    `prefix` is where `cfg` sits in the job's config (e.g. `ppo.`), so that the message names the
    full dotted key when a nested config checks itself."""
    for key, field, value in _leaf_fields(cfg, schema, prefix):
        if not set(RANGE_KEYS) & set(field.metadata):
            continue
        if value is None or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        problem = _out_of_range(value, field.metadata)
        if problem:
            raise ConfigError(f"{key}: {problem}, got {value}")


def check_output_paths(cfg: Any, schema: type) -> None:
    """Raise ConfigError naming the first output key (and `output_dir`) that cannot be written:
    a file where a folder is wanted, a folder where a file is, or a file in the way of either."""
    for key, field, value in _leaf_fields(cfg, schema):
        kind = "folder" if field.name == "output_dir" else field.metadata.get("output")
        if not kind or not value:
            continue
        path = Path(value)
        if kind == "folder" and path.exists() and not path.is_dir():
            raise ConfigError(f"{key}: {path} is a file, expected a folder to write into")
        if kind == "file" and path.is_dir():
            raise ConfigError(f"{key}: {path} is a folder, expected the name of a file to write")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"{key}: cannot write {path}: {parent} is a file")
                break


def validate_config(cfg: Any) -> None:
    """Run the config's own `validate()` (the rules beyond types and declared ranges), if its
    dataclass has one: it raises ConfigError naming the dotted key, and checks the nested configs
    it holds. The runner calls it for every job before the job starts."""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()


def load_config(
    schema: type[T],
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    values: Mapping[str, Any] | None = None,
    values_source: str = "values",
) -> T:
    """Build the job config: dataclass defaults <- YAML file <- `values` <- dotted overrides;
    validate. Errors in `values` (a nested mapping of config keys) name `values_source`."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    cfg = OmegaConf.structured(schema)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors come in several exception types
            raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(file_cfg, DictConfig):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        cfg = _merge(cfg, file_cfg, str(path))
    if values is not None:
        if not isinstance(values, Mapping):
            raise ConfigError(f"{values_source}: expected a mapping of config keys")
        try:
            values_cfg = OmegaConf.create(dict(values))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{values_source}: {_one_line(exc)}") from None
        cfg = _merge(cfg, values_cfg, values_source)
    for item in overrides:
        key, _, value = item.partition("=")
        if not key:
            raise ConfigError(f"override '{item}': empty key")
        try:
            dotted = OmegaConf.from_dotlist([f"{key}={value}"])
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override '{item}': {_one_line(exc)}") from None
        cfg = _merge(cfg, dotted, f"override '{item}'")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"missing required config value '{missing[0]}' (set it with {missing[0]}=...)"
        )
    try:
        OmegaConf.to_container(cfg, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        raise ConfigError(f"missing required config value '{_key_of(exc)}'") from None
    check_ranges(cfg, schema)
    OmegaConf.set_readonly(cfg, True)
    return typing.cast(T, cfg)


def to_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg, resolve=True)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def describe_config(schema: type, prefix: str = "") -> list[str]:
    """One line per leaf key: `key: type = default  # help` (help from field metadata)."""
    lines: list[str] = []
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        key = f"{prefix}{field.name}"
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe_config(typing.cast(type, tp), prefix=f"{key}."))
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = MISSING
        shown = "(required)" if default == MISSING else repr(default)
        doc = field.metadata.get("help", "")
        bounds = range_text(field.metadata)
        doc = f"{bounds}; {doc}" if bounds and doc else bounds or doc
        lines.append(f"  {key}: {_type_name(tp)} = {shown}" + (f"  # {doc}" if doc else ""))
    return lines
