"""Where generated artifacts (corpora, tokenizers, eval bundles) live: never inside the git checkout."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """$TITANLITE_HOME, else ~/.cache/titanlite."""
    root = os.environ.get("TITANLITE_HOME")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "titanlite"
