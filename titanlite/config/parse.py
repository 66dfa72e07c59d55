"""Build a JobConfig from defaults < TOML file < command line, strictly.

Every mistake ends in a ConfigError (a UserError) whose message is one line naming the key, where it came
from, and the fix: unknown sections/keys get the closest valid name, wrong types name the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from pathlib import Path
from typing import Any

from titanlite.config.sections import SECTIONS, JobConfig
from titanlite.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

_TRUE = {"true", "on", "yes", "1"}
_FALSE = {"false", "off", "no", "0"}


class ConfigError(UserError):
    pass


def shipped_configs_dir() -> Path:
    """The train_configs/ shipped inside the package (a symlink to the repo's top-level folder in a checkout)."""
    return Path(__file__).resolve().parents[1] / "train_configs"


def resolve_config_file(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = shipped_configs_dir() / path.name
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    available = ", ".join(sorted(p.name for p in shipped_configs_dir().glob("*.toml")))
    raise ConfigError(f"config file '{name}' not found in the working directory or the shipped train_configs/ "
                      f"(shipped: {available})")


def field_specs(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}.get(
        tp, "a list of strings (TOML list or comma-separated)")


def _suggest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def _check_key(section: str, key: str, origin: str) -> dataclasses.Field:
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section '{section}' ({origin}).{_suggest(section, list(SECTIONS))} "
                          f"Valid sections: {', '.join(SECTIONS)}")
    specs = field_specs(section)
    if key not in specs:
        elsewhere = [s for s in SECTIONS if key in field_specs(s)]
        hint = (f" Did you mean '{elsewhere[0]}.{key}'?" if elsewhere
                else _suggest(key, list(specs)).replace("'", f"'{section}.", 1))
        raise ConfigError(f"unknown config key '{section}.{key}' ({origin}).{hint} "
                          f"Run with --help to list every key")
    return specs[key]


def coerce(section: str, f: dataclasses.Field, value: Any, origin: str) -> Any:
    """Convert a TOML value or a command-line string to the field's type, or fail naming the expected type."""
    tp = f.type  # sections.py has no postponed annotations: these are real types (int, ..., list[str])
    key = f"{section}.{f.name}"
    from_cli = isinstance(value, str) and origin == "from the command line"

    def bad() -> ConfigError:
        return ConfigError(f"{key} expects {_type_name(tp)}, got {value!r} ({origin})")

    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_cli:
            try:
                return int(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli:
            try:
                return float(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if f.metadata.get("loose") and isinstance(value, (bool, int)):
            return str(value).lower()
        raise bad()
    # list[str]
    if from_cli:
        text = value.strip()
        if text.startswith("["):
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                raise bad() from None
        else:
            return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise bad()


def parse_cli(argv: list[str]) -> list[tuple[str, str, str | None]]:
    """`--section.key=value`, `--section.key value`, or a bare `--section.key` (booleans: true)."""
    overrides = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or "." not in token:
            raise ConfigError(f"unexpected argument '{token}': options look like --section.key=value "
                              f"(run with --help to list every key)")
        name, eq, value = token[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--"):
                value = nxt
                i += 1
            else:
                value = None
        section, _, key = name.replace("-", "_").partition(".")
        overrides.append((section, key, value))
        i += 1
    return overrides


def _apply(values: dict[str, dict[str, Any]], section: str, key: str, raw: Any, origin: str) -> None:
    f = _check_key(section, key, origin)
    if raw is None:  # bare flag
        if f.type is not bool:
            raise ConfigError(f"--{section}.{key} needs a value ({origin})")
        raw = "true"
    value = coerce(section, f, raw, origin)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{section}.{key} must be one of {', '.join(repr(c) for c in choices)}, "
                          f"got {value!r} ({origin})")
    values[section][key] = value


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None


def build_config(toml_data: dict[str, Any] | None, overrides: list[tuple[str, str, Any]],
                 toml_origin: str = "in the TOML file") -> JobConfig:
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, table in (toml_data or {}).items():
        if not isinstance(table, dict):
            raise ConfigError(f"top-level key '{section}' {toml_origin} must be a [section] table")
        for key, raw in table.items():
            _apply(values, section, key, raw, toml_origin)
    for section, key, raw in overrides:
        _apply(values, section, key, raw, "from the command line")
    from titanlite.config.validate import validate

    config = JobConfig(**{name: cls(**values[name]) for name, cls in SECTIONS.items()})
    validate(config)
    return config


def config_from_toml_text(text: str) -> JobConfig:
    """A config written by `config_to_toml` (run folders, checkpoint meta.json), loaded back."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"stored config is not valid TOML: {exc}") from None
    return build_config(data, [], "in the stored config")


def load_config(argv: list[str]) -> JobConfig:
    """defaults < TOML (`--job.config_file`) < command line."""
    overrides = parse_cli(argv)
    config_file = None
    for section, key, value in overrides:
        if (section, key) == ("job", "config_file"):
            config_file = value
    toml_data: dict[str, Any] = {}
    origin = "in the TOML file"
    if config_file:
        path = resolve_config_file(config_file)
        toml_data = load_toml(path)
        origin = f"in {path}"
        overrides = [o if o[:2] != ("job", "config_file") else ("job", "config_file", str(path)) for o in overrides]
    return build_config(toml_data, overrides, origin)
