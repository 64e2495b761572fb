"""YAML configs: defaults, dotted command-line overrides, validation before any work.

A schema maps section -> key -> :class:`Field`. :func:`load_config` reads the YAML file,
applies ``--set section.key=value`` overrides (values parsed as YAML), and checks everything
up front: unknown sections or keys, a key given twice in the file (YAML would silently keep the
last), wrong types, values out of range (every integer also fits in 64 bits), missing input
files.
Each problem raises :class:`~utils.errors.UserInputError` with one line naming the key (and
the value or path), so scripts exit with status 2 before loading any data. The result is a
plain nested dict with every default filled in; :func:`dump_config` writes it as YAML beside
a run's outputs.
"""

from __future__ import annotations

import argparse
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import yaml

from models.moe_mae import MODEL_SIZES
from utils.errors import UserInputError

REQUIRED = object()  # Field default: the key must be given
MAX_SEED = 2 ** 32 - 1  # what NumPy's legacy seeding and scikit-learn's random_state accept
_INT64 = 2 ** 63
# the bands of BEN-L and of EuroSAT-L without its thermal band (datasets read 7 bands)
DATA_BANDS = 7


@dataclass(frozen=True)
class Field:
    """One config key.

    kind: ``int``, ``float``, ``bool``, ``str``, ``path`` or ``paths`` (a mapping of names to
    paths). Paths are strings; with ``must_exist`` set to ``"file"``, ``"dir"`` or ``"any"``
    they are checked on disk.
    check: optional ``value -> error text or None`` for ranges and cross-key rules.
    """

    kind: str
    default: Any = REQUIRED
    choices: Tuple = ()
    nullable: bool = False
    must_exist: Optional[str] = None
    check: Optional[Callable[[Any], Optional[str]]] = None
    help: str = ""


Schema = Mapping[str, Mapping[str, Field]]


# Range checks, returning an error text or None.
def positive(value):
    return None if value > 0 else "must be > 0"


def non_negative(value):
    return None if value >= 0 else "must be >= 0"


def unit_interval_open(value):  # [0, 1)
    return None if 0 <= value < 1 else "must be in [0, 1)"


def fraction(value):  # (0, 1]
    return None if 0 < value <= 1 else "must be in (0, 1]"


def seed_range(value):
    return None if 0 <= value <= MAX_SEED else f"must be in [0, {MAX_SEED}]"


def data_bands(value):
    return None if value == DATA_BANDS else \
        f"must be {DATA_BANDS} (the bands SR_B1..SR_B7 the datasets read)"


def check_range(option: str, value, minimum=None, maximum=None) -> None:
    """A command-line number within [minimum, maximum] (either may be None), else a one-line
    UserInputError naming the option."""
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "-inf" if minimum is None else minimum
        high = "inf" if maximum is None else maximum
        raise UserInputError(f"{option} must be in [{low}, {high}], got {value}")


def check_seed(option: str, value: int) -> None:
    check_range(option, value, 0, MAX_SEED)


def model_fields(**extra: Field) -> Dict[str, Field]:
    """The ``model`` section of every config: the published architecture keys, plus ``extra``."""
    return {
        "size": Field("str", "S", choices=tuple(MODEL_SIZES)),
        "img_size": Field("int", 40, check=positive),
        "patch_size": Field("int", 4, check=positive),
        "in_channels": Field("int", DATA_BANDS, check=data_bands),
        **extra,
    }


def load_config(path, schema: Schema, overrides: Sequence[str] = ()) -> Dict[str, Dict[str, Any]]:
    """Read, override, validate and complete a config; see the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{path}: not a UTF-8 text file (byte {exc.start}: "
                             f"{exc.reason})") from None
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read the config ({exc.strerror})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise UserInputError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    except _DuplicateKey as exc:
        raise UserInputError(f"{path}: {exc}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserInputError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override)
    return validate(raw, schema, source=str(path))


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(f"key '{key}' is given twice (lines {seen[key]} and "
                                        f"{line}); YAML would keep the last one silently")
                seen[key] = line
            except TypeError:  # an unhashable key: PyYAML reports it
                continue
        return super().construct_mapping(node, deep)


def validate(raw: Mapping, schema: Schema, source: str = "config") -> Dict[str, Dict[str, Any]]:
    for section, values in raw.items():
        if section not in schema:
            raise UserInputError(f"{source}: unknown section '{section}'"
                                 f"{_suggest(section, schema)}")
        if values is not None and not isinstance(values, dict):
            raise UserInputError(f"{source}: section '{section}' must be a mapping of keys")
        for key in values or {}:
            if key not in schema[section]:
                raise UserInputError(f"{source}: unknown key '{section}.{key}'"
                                     f"{_suggest(key, schema[section])}")
    config = {}
    for section, fields in schema.items():
        given = raw.get(section) or {}
        config[section] = {key: _value(f"{section}.{key}", given.get(key, field.default), field,
                                       source, key in given)
                           for key, field in fields.items()}
    return config


def _value(name: str, value: Any, field: Field, source: str, given: bool) -> Any:
    if value is REQUIRED:
        raise UserInputError(f"{source}: missing required key '{name}'")
    if value is None:
        if field.nullable:
            return None
        raise UserInputError(f"{source}: '{name}' must not be empty")
    value = _coerce(name, value, field.kind, source)
    if field.choices and value not in field.choices:
        raise UserInputError(f"{source}: '{name}' must be one of "
                             f"{', '.join(map(str, field.choices))}, got {value!r}")
    if field.check is not None:
        problem = field.check(value)
        if problem:
            raise UserInputError(f"{source}: '{name}' {problem}, got {value!r}")
    if field.must_exist and given:
        paths = value.items() if isinstance(value, dict) else [("", value)]
        for sub_key, path in paths:
            exists = {"file": Path(path).is_file, "dir": Path(path).is_dir,
                      "any": Path(path).exists}[field.must_exist]()
            if not exists:
                where = f"{name}.{sub_key}" if sub_key else name
                what = "path" if field.must_exist == "any" else field.must_exist
                raise UserInputError(f"{source}: '{where}': {what} not found: {path}")
    return value


def _coerce(name: str, value: Any, kind: str, source: str) -> Any:
    def wrong():
        return UserInputError(f"{source}: '{name}' must be {kind_names[kind]}, got {value!r}")

    kind_names = {"int": "an integer", "float": "a number", "bool": "true or false",
                  "str": "a string", "path": "a path", "paths": "a mapping of names to paths"}
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise wrong()
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            if not -_INT64 <= value < _INT64:
                raise UserInputError(f"{source}: '{name}' is out of range (more than 64 bits), "
                                     f"got {value}")
            return value
        raise wrong()
    if kind == "float":
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise wrong() from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise wrong()
    if kind in ("str", "path"):
        if isinstance(value, str) and value:
            return value
        raise wrong()
    if kind == "paths":
        if isinstance(value, dict) and value and all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()):
            return dict(value)
        raise wrong()
    raise ValueError(f"unknown field kind {kind!r}")


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise UserInputError(f"bad --set '{override}': use section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    section, name = parts
    if raw.get(section) is None:
        raw[section] = {}
    if not isinstance(raw[section], dict):
        raise UserInputError(f"bad --set '{override}': section '{section}' is not a mapping")
    raw[section][name] = value


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(options)}"


def config_arguments(description: str) -> argparse.ArgumentParser:
    """The command line every config-driven script shares: ``--config_yaml PATH`` and
    repeatable ``--set section.key=value`` overrides (add script-specific flags to it)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config_yaml", required=True, help="YAML config")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable)")
    return parser


def dump_config(config: Mapping) -> str:
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)
