"""`--help`: every key with its default and one-line doc, grouped by section."""

from __future__ import annotations

import dataclasses

from titanlite.config.sections import SECTIONS
from titanlite.config.toml_io import _value

USAGE = """usage: python -m titanlite.train [--job.config_file FILE] [--section.key=value ...]

Values: defaults < TOML file < command line. Booleans take true/false; lists take a TOML list or a
comma string. A bare config name (e.g. gpt2_d26.toml) resolves to the shipped train_configs/.
"""


def help_text() -> str:
    out = [USAGE]
    for name, cls in SECTIONS.items():
        out.append(f"[{name}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            shown = ", ".join(c if c else "''" for c in choices) if choices else ""
            extra = f" (one of: {shown})" if choices else ""
            seed = f" [seed: {f.metadata['seed']}]" if f.metadata.get("seed") else ""
            out.append(f"  --{name}.{f.name}={_value(default)}\n      {f.metadata['doc']}{extra}{seed}")
        out.append("")
    return "\n".join(out)
