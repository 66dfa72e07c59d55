"""Loader throughput alone: tokenise + best-fit pack, one process (the training step is not involved).

    python -m scripts.bench_loader                          # embedded corpus, vocab 32768, T=2048, batch 16
    python -m scripts.bench_loader --threads 2 --prefetch 2

Packs synchronously by default (prefetch 0) with one tokenizer thread and one torch thread, so the number
is the cost on one core. The first batch also fills the ~1000-document buffer; it is reported apart.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from titanlite.cli import run_cli
from titanlite.config.sections import DataConfig
from titanlite.data import build_loader, corpora
from titanlite.logging_utils import init_logger, logger


def parse_args(argv: list[str]) -> argparse.Namespace:
    d = DataConfig()
    p = argparse.ArgumentParser(prog="python -m scripts.bench_loader", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default=d.dataset, choices=("embedded", "local", "climbmix", "fineweb_edu"))
    p.add_argument("--local-path", default=d.local_path)
    p.add_argument("--data-dir", default=d.data_dir)
    p.add_argument("--tokenizer-dir", default=d.tokenizer_dir)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--buffer-docs", type=int, default=d.buffer_docs)
    p.add_argument("--threads", type=int, default=1, help="tokenizer threads")
    p.add_argument("--prefetch", type=int, default=0, help="batches packed ahead in a thread (0: synchronous)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    init_logger()
    args = parse_args(argv)
    torch.set_num_threads(1)
    cfg = replace(DataConfig(), dataset=args.dataset, local_path=args.local_path, data_dir=args.data_dir,
                  tokenizer_dir=args.tokenizer_dir, vocab_size=args.vocab_size)
    data_dir = corpora.prepare_corpus(cfg)
    tokenizer = corpora.prepare_tokenizer(cfg)
    loader = build_loader(data_dir, "train", tokenizer, args.batch_size, args.seq_len, buffer_docs=args.buffer_docs,
                          threads=args.threads, prefetch=args.prefetch)
    tokens_per_batch = args.batch_size * args.seq_len
    start = time.perf_counter()
    next(loader)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.batches):
        next(loader)
    elapsed = time.perf_counter() - start
    stats = loader.stats()
    rate = args.batches * tokens_per_batch / elapsed
    logger.info(f"bench_loader: {tokenizer} B={args.batch_size} T={args.seq_len} threads={args.threads} "
                f"prefetch={args.prefetch}")
    logger.info(f"bench_loader: first batch (fills the {loader.buffer_docs}-doc buffer) {first * 1000:.0f} ms")
    logger.info(f"bench_loader: {rate:,.0f} tokens/s over {args.batches} batches "
                f"({elapsed / args.batches * 1000:.1f} ms/batch), utilisation {stats['utilisation']:.3f}, "
                f"at {loader.position()}")
    loader.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
