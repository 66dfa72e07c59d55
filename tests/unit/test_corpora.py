"""Corpora -> parquet shards: embedded default, local files, web-scale downloads, bad-data errors."""

import json
import random
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from titanlite.config.sections import DataConfig
from titanlite.data import corpora, download, shards
from titanlite.data.corpora import prepare_corpus, prepare_tokenizer
from titanlite.data.loader import build_loader
from titanlite.data.tokenizer import Tokenizer
from titanlite.errors import UserError


# ---- embedded default ------------------------------------------------------------------------------------
def test_embedded_corpus_prepares_from_scratch(tmp_path):
    cfg = replace(DataConfig(), data_dir=str(tmp_path / "embedded"))
    data_dir = prepare_corpus(cfg)
    names = [p.name for p in shards.list_shards(data_dir)]
    assert names[-1] == "shard_val.parquet" and names[0] == "shard_00000.parquet" and len(names) >= 3
    assert shards.split_shards(data_dir, "val")[0].name == "shard_val.parquet"
    manifest = json.loads((data_dir / "corpus.json").read_text())
    total = manifest["num_train_docs"] + manifest["num_val_docs"]
    assert total > 1900  # ~790 Shakespeare scenes + 1189 KJV chapters
    assert 0.03 < manifest["num_val_docs"] / total < 0.07
    meta = pq.ParquetFile(data_dir / names[0]).metadata
    assert meta.schema.to_arrow_schema().names == ["text"]
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert meta.num_row_groups >= 4  # small corpus: small row groups so several ranks get their own
    texts = list(shards.iter_texts(shards.list_shards(data_dir)))
    assert len(texts) == total
    joined = "\n".join(texts)
    assert "**" not in joined and "### " not in joined and "_Enter" not in joined  # markup stripped
    assert any(t.startswith("Genesis 1\n") for t in texts)
    assert sum("HAMLET" in t for t in texts) > 5  # one document per scene

    # idempotent: a second call leaves valid shards untouched
    mtimes = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()}
    assert prepare_corpus(cfg) == data_dir
    assert {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()} == mtimes

    # deterministic: building again elsewhere gives the same documents in the same shards
    other = prepare_corpus(replace(cfg, data_dir=str(tmp_path / "again")))
    assert list(shards.iter_texts(shards.list_shards(other))) == texts


# ---- local files -----------------------------------------------------------------------------------------
def _local_folder(root: Path) -> Path:
    folder = root / "mytexts"
    (folder / "sub").mkdir(parents=True)
    for i in range(30):
        (folder / f"doc{i:02d}.txt").write_text(f"Plain text document number {i}. " * 20, encoding="utf-8")
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # not UTF-8: skipped
    lines = [json.dumps({"text": f"json line {i} ünïcödé"}) for i in range(20)]
    lines += [json.dumps({"no_text": 1}), "{broken json"]
    (folder / "sub" / "docs.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff byte"}\n')
    pq.write_table(pa.table({"text": [f"parquet row {i}" for i in range(10)], "id": list(range(10))}),
                   folder / "sub" / "table.parquet")
    (folder / "ignored.csv").write_text("a,b\n")
    return folder


def test_local_corpus(tmp_path):
    folder = _local_folder(tmp_path)
    scan = corpora.read_local_documents(folder)
    assert len(scan.docs) == 30 + 20 + 10
    assert scan.skipped_non_utf8 == 2  # latin1.txt + the \xff jsonl line
    assert scan.skipped_malformed == 2
    cfg = replace(DataConfig(), dataset="local", local_path=str(folder), data_dir=str(tmp_path / "shards"))
    data_dir = prepare_corpus(cfg)
    texts = list(shards.iter_texts(shards.list_shards(data_dir)))
    assert sorted(texts) == sorted(scan.docs)
    assert len(list(shards.iter_texts(shards.split_shards(data_dir, "val")))) == 1  # 1% of 60, at least 1
    manifest = json.loads((data_dir / "corpus.json").read_text())
    assert manifest["skipped_non_utf8"] == 2

    # a changed source folder is noticed and the shards are rebuilt
    (folder / "new.txt").write_text("a brand new document", encoding="utf-8")
    prepare_corpus(cfg)
    assert "a brand new document" in set(shards.iter_texts(shards.list_shards(data_dir)))


def test_local_corpus_errors(tmp_path):
    base = replace(DataConfig(), dataset="local", data_dir=str(tmp_path / "out"))
    with pytest.raises(UserError, match="needs data.local_path"):
        prepare_corpus(base)
    with pytest.raises(UserError, match="does not exist"):
        prepare_corpus(replace(base, local_path=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .txt, .jsonl or .parquet files"):
        prepare_corpus(replace(base, local_path=str(tmp_path / "empty")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(UserError, match="no usable documents"):
        prepare_corpus(replace(base, local_path=str(tmp_path / "bad")))


# ---- bad shards ------------------------------------------------------------------------------------------
def _write(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("no_shards", r"no parquet shards"),
    ("one_shard", "at least two shards"),
    ("empty_shard", "is empty"),
    ("no_text_column", "has no 'text' column"),
    ("unreadable", "cannot read shard"),
])
def test_bad_shards_raise_one_clear_line(tmp_path, case, message):
    folder = tmp_path / "data"
    if case != "missing":
        folder.mkdir()
    good = pa.table({"text": ["hello there"] * 4})
    if case in ("one_shard", "empty_shard", "no_text_column", "unreadable"):
        _write(folder / "shard_00000.parquet", good)
    if case == "empty_shard":
        _write(folder / "shard_00001.parquet", pa.table({"text": pa.array([], type=pa.string())}))
    if case == "no_text_column":
        _write(folder / "shard_00001.parquet", pa.table({"content": ["x"]}))
    if case == "unreadable":
        (folder / "shard_00001.parquet").write_bytes(b"this is not parquet at all")
    tokenizer = Tokenizer.train(["hello there general kenobi"] * 50, 270, progress=False)
    with pytest.raises(UserError, match=message) as info:
        build_loader(folder, "val", tokenizer, batch_size=1, seq_len=8)
    assert "\n" not in str(info.value)
    assert not shards.shards_ready(folder)


# ---- tokenizer preparation ---------------------------------------------------------------------------------
def test_prepare_tokenizer_trains_once_and_checks_vocab(tmp_path):
    cfg = replace(DataConfig(), dataset="local", local_path=str(_local_folder(tmp_path)),
                  data_dir=str(tmp_path / "shards"), tokenizer_dir=str(tmp_path / "tok"), vocab_size=300,
                  tokenizer_doc_cap=200, tokenizer_max_chars=100_000)
    prepare_corpus(cfg)
    tok = prepare_tokenizer(cfg)
    assert tok.vocab_size == 300 and (tmp_path / "tok" / "tokenizer.tiktoken").is_file()
    stamp = (tmp_path / "tok" / "tokenizer.tiktoken").stat().st_mtime_ns
    again = prepare_tokenizer(cfg)  # loads, does not retrain
    assert (tmp_path / "tok" / "tokenizer.tiktoken").stat().st_mtime_ns == stamp
    assert again.encode("json line 3") == tok.encode("json line 3")
    with pytest.raises(UserError, match="does not match data.vocab_size=512"):
        prepare_tokenizer(replace(cfg, vocab_size=512))


def test_default_dirs_follow_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TITANLITE_HOME", str(tmp_path))
    cfg = DataConfig()
    assert corpora.resolve_data_dir(cfg) == tmp_path / "data" / "embedded"
    assert corpora.resolve_tokenizer_dir(cfg) == tmp_path / "tokenizer" / "embedded-32768"


# ---- downloads -----------------------------------------------------------------------------------------
class _ShardServer:
    """Loopback-only HTTP server for shard files with Range support; can cut chosen responses short."""

    def __init__(self, root: Path):
        self.root = root
        self.cut_after: dict[str, int] = {}  # file name -> bytes sent before dropping the connection, once
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                path = server.root / name
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = data[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.cut_after.pop(name, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/resolve/main"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _remote(tmp_path: Path, count: int) -> tuple[Path, download.RemoteDataset]:
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    dataset = download.RemoteDataset("test/tiny", last_index=count)
    rng = random.Random(0)
    for i in list(range(count)) + [count]:
        # random text, so each file is ~100 kB even after zstd (the cut below must fall inside it)
        texts = [f"shard {i} doc {j} " + rng.randbytes(200).hex() for j in range(300)]
        shards.write_shard(remote_dir / download.shard_name(i), texts, row_group_size=64)
    return remote_dir, dataset


def test_download_parallel_and_resume(tmp_path):
    remote_dir, dataset = _remote(tmp_path, 3)
    local = tmp_path / "local"
    with _ShardServer(remote_dir) as server:
        server.cut_after["shard_00001.parquet"] = 3000  # first attempt dies mid-file
        paths = download.download_shards(dataset, local, num_shards=2, workers=3, backoff_s=0.01,
                                          base_url=server.url, timeout_s=10)
        assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00003.parquet"]
        assert (remote_dir / "shard_00001.parquet").stat().st_size > 50_000
        for p in paths:
            assert p.read_bytes() == (remote_dir / p.name).read_bytes()
        assert not list(local.glob("*.tmp"))
        resumed = [rng for name, rng in server.requests if name == "shard_00001.parquet"]
        assert resumed == [None, "bytes=3000-"]  # the retry asked only for the missing bytes

        # a partial file from an earlier, killed run is resumed, and complete shards are not fetched again
        (local / "shard_00002.parquet.tmp").write_bytes((remote_dir / "shard_00002.parquet").read_bytes()[:5000])
        server.requests.clear()
        download.download_shards(dataset, local, num_shards=-1, base_url=server.url, backoff_s=0.01)
        assert server.requests == [("shard_00002.parquet", "bytes=5000-")]
        assert (local / "shard_00002.parquet").read_bytes() == (remote_dir / "shard_00002.parquet").read_bytes()
        assert shards.split_shards(local, "val")[0].name == "shard_00003.parquet"

        with pytest.raises(UserError, match="HTTP 404"):
            download.download_file(f"{server.url}/shard_09999.parquet", local / "x.parquet", backoff_s=0.01)


def test_download_without_network_is_one_line(tmp_path, monkeypatch):
    import socket
    import urllib.error
    import urllib.request

    def no_dns(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", no_dns)
    with pytest.raises(UserError, match=r"cannot reach huggingface.co \(no network\?\)") as info:
        download.download_shards("climbmix", tmp_path / "d", num_shards=2, backoff_s=0.0)
    assert "\n" not in str(info.value)
    monkeypatch.undo()

    # a host that refuses connections: retried with backoff, then one line
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    with pytest.raises(UserError, match="failed after 2 attempts"):
        download.download_file(f"http://127.0.0.1:{port}/shard_00000.parquet", tmp_path / "s.parquet", retries=2,
                               backoff_s=0.01, timeout_s=5)


def test_web_dataset_urls():
    assert download.DATASETS["climbmix"].url(7) == (
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_00007.parquet")
    assert download.shard_indices(download.DATASETS["climbmix"], 3) == [0, 1, 2, 6542]
    assert download.shard_indices(download.DATASETS["fineweb_edu"], 2) == [0, 1, 1822]
    assert len(download.shard_indices(download.DATASETS["fineweb_edu"], -1)) == 1823
