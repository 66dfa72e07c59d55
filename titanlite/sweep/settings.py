"""A sweep folder holds runs of one configuration: the first start writes it, later starts must match it.

Runs of different settings in one sweep folder would be fitted as if comparable. Depths and budgets may grow
from one start to the next (that only adds runs); every other setting is pinned. The stored config is also what
`--collect` reads the dial's target_param_data_ratio from.
"""

from __future__ import annotations

import sys
from pathlib import Path

from titanlite.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

SETTINGS_FILE = "sweep_config.toml"
UNPINNED = {"job.config_file", "job.dump_folder", "job.description"}  # where a config came from, not what it is


def _flat(toml_text: str) -> dict[str, object]:
    return {f"{section}.{key}": value for section, table in tomllib.loads(toml_text).items()
            for key, value in table.items() if f"{section}.{key}" not in UNPINNED}


def check_same_settings(sweep_dir: Path, toml_text: str) -> None:
    path = sweep_dir / SETTINGS_FILE
    if not path.is_file():
        sweep_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(toml_text)
        return
    stored, now = _flat(path.read_text()), _flat(toml_text)
    for key in sorted(stored.keys() | now.keys()):
        if stored.get(key) != now.get(key):
            raise UserError(f"sweep folder {sweep_dir} holds runs with {key} = {stored.get(key)!r}, this start has "
                            f"{now.get(key)!r}; use the same settings to continue it, or another folder (--out)")
