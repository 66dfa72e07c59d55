"""Prepare a corpus as parquet shards (and optionally its tokenizer).

    python -m scripts.prepare_data                                  # embedded default (no network)
    python -m scripts.prepare_data --dataset local --local-path ~/texts
    python -m scripts.prepare_data --dataset climbmix --num-shards 170   # + the validation shard
    python -m scripts.prepare_data --tokenizer --vocab-size 32768    # also train the tokenizer
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from titanlite.cli import run_cli
from titanlite.config.sections import DataConfig
from titanlite.data import corpora, shards
from titanlite.logging_utils import init_logger, logger


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = DataConfig()
    p = argparse.ArgumentParser(prog="python -m scripts.prepare_data", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default=defaults.dataset, choices=("embedded", "local", "climbmix", "fineweb_edu"))
    p.add_argument("--local-path", default=defaults.local_path, help="folder of .txt/.jsonl/.parquet (local)")
    p.add_argument("--data-dir", default=defaults.data_dir, help="output folder ('' = <cache>/data/<dataset>)")
    p.add_argument("--num-shards", type=int, default=defaults.num_shards,
                   help="training shards to download (web-scale sets; -1 = all); the val shard always comes too")
    p.add_argument("--tokenizer", action="store_true", help="also train (or check) the tokenizer")
    p.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    p.add_argument("--tokenizer-dir", default=defaults.tokenizer_dir)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    init_logger()
    args = parse_args(argv)
    cfg = replace(DataConfig(), dataset=args.dataset, local_path=args.local_path, data_dir=args.data_dir,
                  num_shards=args.num_shards, vocab_size=args.vocab_size, tokenizer_dir=args.tokenizer_dir)
    data_dir = corpora.prepare_corpus(cfg)
    names = [p.name for p in shards.list_shards(data_dir)]
    logger.info(f"data: {data_dir} holds {len(names) - 1} train shard(s) + validation shard {names[-1]}")
    if args.tokenizer:
        tokenizer = corpora.prepare_tokenizer(cfg)
        logger.info(f"tokenizer: {tokenizer} at {corpora.resolve_tokenizer_dir(cfg)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
