"""Write a JobConfig as TOML that loads back to an identical config (no third-party writer needed)."""

from __future__ import annotations

import dataclasses
import json
import math

from titanlite.config.sections import SECTIONS


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def config_to_toml(config) -> str:
    lines = []
    for name in SECTIONS:
        section = getattr(config, name)
        lines.append(f"[{name}]")
        for f in dataclasses.fields(section):
            lines.append(f"{f.name} = {_value(getattr(section, f.name))}")
        lines.append("")
    return "\n".join(lines)
