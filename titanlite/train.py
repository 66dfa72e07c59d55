"""`python -m titanlite.train --job.config_file FILE [--section.key=value ...]` — the thin entry point."""

from __future__ import annotations

import sys

from titanlite.cli import run_cli
from titanlite.config import config_to_toml, help_text, load_config
from titanlite.logging_utils import init_logger, logger


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    init_logger()
    config = load_config(argv)
    logger.info("Resolved config:\n" + config_to_toml(config))
    from titanlite.trainer import run_training

    return run_training(config)


def cli_main() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli_main()
