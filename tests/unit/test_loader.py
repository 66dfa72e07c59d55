"""BOS-aligned best-fit packing loader: packing rule, utilisation, exact resume, stream dealing, val reset."""

import gc
import threading
import time
from dataclasses import replace

import pytest
import torch

from titanlite.config.sections import DataConfig
from titanlite.data import shards
from titanlite.data.corpora import prepare_corpus, prepare_tokenizer
from titanlite.data.loader import BestFitPacker, DocStream, ShardIndex, build_loader

VOCAB = 4096


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """The embedded corpus and a 4096-token tokenizer trained on it, built once per test session."""
    root = tmp_path_factory.getbasetemp() / "titanlite_embedded"
    cfg = replace(DataConfig(), data_dir=str(root / "data"), tokenizer_dir=str(root / "tok"), vocab_size=VOCAB)
    data_dir = prepare_corpus(cfg)
    return data_dir, prepare_tokenizer(cfg)


@pytest.fixture(scope="module")
def small(tmp_path_factory, embedded):
    """60 short distinct documents in 2 train shards of 4 row groups each + a val shard: epochs come fast."""
    folder = tmp_path_factory.mktemp("small")
    for i in range(2):
        texts = [f"Document {i}-{j}: " + "word " * (5 + (7 * j + i) % 40) for j in range(32)]
        shards.write_shard(folder / f"shard_{i:05d}.parquet", texts, row_group_size=8)
    shards.write_shard(folder / "shard_val.parquet", [f"val doc {j} " * (3 + j) for j in range(16)], 4)
    return folder, embedded[1]


def _take(loader, n):
    return [torch.stack(next(loader)) for _ in range(n)]


def _reference_bestfit(stream: DocStream, batch_size, seq_len, buffer_docs, num_batches):
    """The recipe's rule written the plain way: a list buffer and a linear scan for every placement."""
    buffer, out = [], []
    for _ in range(num_batches):
        rows = []
        for _ in range(batch_size):
            row = []
            while len(row) < seq_len + 1:
                while len(buffer) < buffer_docs:
                    buffer.extend(a.tolist() for a in stream.next_batch()[0])
                space = seq_len + 1 - len(row)
                best = None
                for i, doc in enumerate(buffer):
                    if len(doc) <= space and (best is None or len(doc) > len(buffer[best])):
                        best = i
                if best is None:
                    best = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                row.extend(buffer.pop(best)[:space])
            rows.append(row)
        rows = torch.tensor(rows)
        out.append(torch.stack([rows[:, :-1], rows[:, 1:]]))
    return out


def test_rows_follow_the_best_fit_rule_exactly(embedded):
    data_dir, tok = embedded
    loader = build_loader(data_dir, "train", tok, batch_size=4, seq_len=300, buffer_docs=50, prefetch=0)
    got = _take(loader, 12)
    stream = DocStream(ShardIndex.of(data_dir, "train"), 0, 1, tok)
    assert all(torch.equal(a, b) for a, b in zip(got, _reference_bestfit(stream, 4, 300, 50, 12)))


def test_rows_are_bos_aligned_whole_documents_without_padding(small):
    folder, tok = small
    docs = [tuple(ids) for ids in tok.encode(list(shards.iter_texts(shards.split_shards(folder, "train"))),
                                                 prepend=tok.bos_token_id)]
    whole = set(docs)
    loader = build_loader(folder, "train", tok, batch_size=3, seq_len=64, buffer_docs=20, prefetch=0)
    for _ in range(10):
        inputs, targets = next(loader)
        assert inputs.shape == targets.shape == (3, 64) and inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        rows = torch.cat([inputs, targets[:, -1:]], dim=1)
        assert (rows[:, 0] == tok.bos_token_id).all()
        assert ((rows >= 0) & (rows < tok.vocab_size)).all()  # no padding or ignore values anywhere
        for row in rows.tolist():
            starts = [i for i, t in enumerate(row) if t == tok.bos_token_id]
            segments = [tuple(row[a:b]) for a, b in zip(starts, starts[1:] + [len(row)])]
            assert all(seg in whole for seg in segments[:-1])  # every document but the last is whole
            assert any(doc[:len(segments[-1])] == segments[-1] for doc in docs)  # the last may be cropped


def test_best_fit_packer_picks():
    packer = BestFitPacker()
    lengths = [5, 9, 3, 9, 12, 3]
    for i, n in enumerate(lengths):
        packer.add(torch.full((n,), i).numpy(), (0, 0, i))
    tokens, fits = packer.pop(10)  # largest that fits is 9: the first of the two
    assert fits and tokens[0] == 1
    tokens, fits = packer.pop(2)  # nothing fits: the shortest (first 3) is cropped
    assert not fits and tokens[0] == 2
    assert packer.identities() == ((0, 0, 0), (0, 0, 3), (0, 0, 4), (0, 0, 5))  # arrival order kept


def _greedy_crop_utilisation(stream: DocStream, batch_size, seq_len, num_batches):
    """Baseline: documents in stream order, each row cut where it is full (the rest of that doc dropped)."""
    docs, kept, read = iter(()), 0, 0
    for _ in range(num_batches * batch_size):
        pos = 0
        while pos < seq_len + 1:
            doc = next(docs, None)
            if doc is None:
                docs = iter(stream.next_batch()[0])
                continue
            pos += min(len(doc), seq_len + 1 - pos)
            read += len(doc)
        kept += seq_len + 1
    return kept / read


def test_utilisation_beats_greedy_crop(embedded):
    data_dir, tok = embedded
    loader = build_loader(data_dir, "train", tok, batch_size=16, seq_len=512, prefetch=0)
    _take(loader, 40)
    best_fit = loader.stats()["utilisation"]
    greedy = _greedy_crop_utilisation(DocStream(ShardIndex.of(data_dir, "train"), 0, 1, tok), 16, 512, 40)
    print(f"\ntoken utilisation on the embedded corpus at T=512: best-fit {best_fit:.3f}, greedy crop {greedy:.3f}")
    assert best_fit >= greedy
    stats = loader.stats()
    assert stats["tokens_kept"] == 40 * 16 * 513 and stats["tokens_read"] > stats["tokens_kept"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_exact_resume(embedded, world_size):
    data_dir, tok = embedded
    kwargs = dict(batch_size=4, seq_len=256, world_size=world_size, buffer_docs=200, threads=2)
    for rank in range(world_size):
        reference = _take(build_loader(data_dir, "train", tok, rank=rank, prefetch=0, **kwargs), 150)
        first = build_loader(data_dir, "train", tok, rank=rank, prefetch=3, **kwargs)
        _take(first, 50)
        time.sleep(0.05)  # let the prefetch thread run ahead: the state must not count those batches
        state = first.state_dict()
        first.close()
        buffer = state["streams"][str(rank)]["buffer"]
        assert state["batches"] == 50 and 0 < len(buffer) <= 3 * (200 + 128)  # small: ids, not tokens
        resumed = build_loader(data_dir, "train", tok, rank=rank, prefetch=2, **kwargs)
        resumed.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(_take(resumed, 100), reference[50:]))
        assert resumed.stats()["batches"] == 150


def test_exact_resume_across_epochs_and_after_close(small):
    folder, tok = small
    kwargs = dict(batch_size=2, seq_len=64, buffer_docs=16, prefetch=2, threads=1)
    reference = _take(build_loader(folder, "train", tok, **kwargs), 60)
    loader = build_loader(folder, "train", tok, **kwargs)
    _take(loader, 25)
    state = loader.state_dict()
    loader.close()  # stopping the producer mid-flight must not skip the batches it had packed ahead
    assert all(torch.equal(a, b) for a, b in zip(_take(loader, 10), reference[25:35]))
    resumed = build_loader(folder, "train", tok, **kwargs)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_take(resumed, 35), reference[25:]))
    assert resumed.position()["epoch"] >= 3  # the small corpus wraps around several times


def test_streams_are_dealt_disjoint_row_groups(embedded):
    data_dir, tok = embedded
    paths = shards.split_shards(data_dir, "train")
    # the split's row groups in order (files by name, then row groups): stream k of 3 gets every third one
    every = [(f, rg) for f, p in enumerate(paths) for rg in range(shards.open_shard(p).num_row_groups)]
    assert len(every) > 3
    index = ShardIndex(paths, "train")
    seen = []
    for k in range(3):
        stream = DocStream(index, k, 3, tok)
        groups = []
        while stream.epoch == 1:
            for f, rg, _ in stream.next_batch()[1]:
                if not groups or groups[-1] != (f, rg):
                    groups.append((f, rg))
        assert groups == every[k::3]
        seen.append(set(groups))
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and set().union(*seen) == set(every)


def test_more_streams_than_row_groups_deal_documents(small):
    """A split with fewer row groups than streams (the small val shard has 4) deals single documents, so every
    stream gets data: stream k of 6 reads documents k, k+6, ... of the split, wrapping around (epochs)."""
    folder, tok = small
    index = ShardIndex.of(folder, "val")
    assert len(index.units) == 4 and index.num_docs == 16
    order = [index.locate(d) for d in range(16)]  # (file, row group, row) of each document, in split order
    assert order[5] == (0, 1, 1)
    for k in range(6):
        stream = DocStream(index, k, 6, tok)
        got = []
        while len(got) < 8:
            got.extend(stream.next_batch()[1])
        assert got[:8] == [order[(k + 6 * i) % 16] for i in range(8)]
    loader = build_loader(folder, "val", tok, batch_size=1, seq_len=16, rank=5, world_size=6)
    assert next(loader)[0].shape == (1, 16)


def test_val_loader_restarts_from_the_same_tokens(embedded):
    data_dir, tok = embedded
    val = build_loader(data_dir, "val", tok, batch_size=4, seq_len=128)
    first = _take(val, 3)
    _take(val, 2)
    val.reset()
    assert all(torch.equal(a, b) for a, b in zip(_take(val, 3), first))
    fresh = build_loader(data_dir, "val", tok, batch_size=4, seq_len=128)
    assert all(torch.equal(a, b) for a, b in zip(_take(fresh, 3), first))
    train_first = next(build_loader(data_dir, "train", tok, batch_size=4, seq_len=128, buffer_docs=100))
    assert not torch.equal(train_first[0], first[0][0])


def test_position_and_epochs(small):
    folder, tok = small
    loader = build_loader(folder, "train", tok, batch_size=2, seq_len=64, buffer_docs=8)
    next(loader)
    pos = loader.position()
    assert pos["epoch"] == 1 and pos["shard_name"].startswith("shard_0000") and pos["row_group"] >= 0
    epochs = [loader.position()["epoch"] for _ in range(80) if next(loader) is not None]
    assert epochs == sorted(epochs) and epochs[-1] >= 3


def test_dropped_loader_stops_its_thread(small):
    folder, tok = small
    loader = build_loader(folder, "train", tok, batch_size=2, seq_len=32, prefetch=2)
    next(loader)
    del loader
    gc.collect()
    deadline = time.time() + 5
    while time.time() < deadline and any(t.name.startswith("titanlite-loader") for t in threading.enumerate()):
        time.sleep(0.05)
    assert not any(t.name.startswith("titanlite-loader") for t in threading.enumerate())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_are_pinned_and_identical(embedded):
    data_dir, tok = embedded
    cpu = _take(build_loader(data_dir, "train", tok, batch_size=4, seq_len=256), 5)
    gpu_loader = build_loader(data_dir, "train", tok, batch_size=4, seq_len=256, device="cuda")
    for expected in cpu:
        inputs, targets = next(gpu_loader)
        assert inputs.is_cuda and targets.is_cuda
        assert torch.equal(torch.stack([inputs, targets]).cpu(), expected)


def test_a_packing_failure_is_raised_as_itself_and_the_loader_goes_on_where_it_was(small):
    """A failure in the prefetch thread reaches the training thread as the same exception (a user error stays
    one line), and the next batch is the one that failed, packed from the state after the last good batch."""
    from titanlite.errors import UserError

    folder, tok = small
    kwargs = dict(batch_size=2, seq_len=64, buffer_docs=16, threads=1)
    reference = _take(build_loader(folder, "train", tok, prefetch=0, **kwargs), 12)
    loader = build_loader(folder, "train", tok, prefetch=2, **kwargs)
    _take(loader, 5)
    loader.close()  # no thread packs while the stream is patched; the next batch starts a new one
    stream = loader.streams[0]
    real_pack, calls = stream.pack, []
    failure = UserError("shard_00001.parquet cannot be read: disk gone; fix the disk and resume")

    def failing_pack(out):
        calls.append(1)
        if len(calls) == 1:
            real_pack(out[:1])  # half a batch packed, then the fault: the buffer is left half used
            raise failure
        return real_pack(out)

    stream.pack = failing_pack
    with pytest.raises(UserError) as caught:
        next(loader)
    assert caught.value is failure and "\n" not in str(caught.value)
    assert all(torch.equal(a, b) for a, b in zip(_take(loader, 7), reference[5:12]))
    loader.close()
