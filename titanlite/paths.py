"""Where generated artifacts (corpora, tokenizers, eval bundles) live: never inside the git checkout; and reading
back the small JSON records titanlite leaves in its folders."""

import json
import os
from pathlib import Path


def cache_dir() -> Path:
    """$TITANLITE_HOME, else ~/.cache/titanlite."""
    root = os.environ.get("TITANLITE_HOME")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "titanlite"


def read_json_object(path: Path) -> dict | None:
    """The JSON object in `path`; None when the file is missing, unreadable, damaged or not an object (a record
    another process is writing, or one a crash cut short, reads as absent)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
