"""Tokenizer: rustbpe training, tiktoken serving, plain-file save/load, token_bytes, vocab check."""

import json
import random

import numpy as np
import pytest
import torch

from titanlite.data.tokenizer import SPECIAL_TOKENS, Tokenizer, capped_texts, check_vocab
from titanlite.errors import UserError

VOCAB = 1024

UNICODE_TEXTS = [
    "Hello, world! It's 2024-11-25 and we'll test 1234567 numbers.",
    "naïve café — déjà vu; Straße, Ærøskøbing, ĳ",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji 🙂🚀👩‍👩‍👧 and combining e\u0301 marks",
    "tabs\tand\r\nwindows line ends\n\n\n   trailing spaces   ",
    "",
    " ",
]


def _corpus(num_docs: int = 400, seed: int = 0) -> list[str]:
    """Synthetic prose: a few hundred made-up words plus Unicode lines, enough for ~1000 merges."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(400)]
    docs = []
    for _ in range(num_docs):
        sentences = []
        for _ in range(rng.randint(3, 10)):
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
            sentences.append(sentence.capitalize() + rng.choice([".", "!", "?", ","]))
        docs.append(" ".join(sentences) + "\n" + rng.choice(UNICODE_TEXTS))
    return docs


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(_corpus(), VOCAB, progress=False)


def test_train_vocab_layout(tokenizer):
    assert tokenizer.vocab_size == VOCAB
    first_special = VOCAB - len(SPECIAL_TOKENS)
    assert tokenizer.bos_token_id == first_special
    assert [tokenizer.encode_special(name) for name in SPECIAL_TOKENS] == list(range(first_special, VOCAB))
    assert sorted(tokenizer.mergeable_ranks.values()) == list(range(first_special))
    # the 256 single bytes are all there, so any text can be encoded
    assert all(bytes([b]) in tokenizer.mergeable_ranks for b in range(256))


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_round_trip_unicode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.bos_token_id for i in ids)


def test_training_compresses(tokenizer):
    text = _corpus()[0]  # text of the training distribution: merges must cut its length well below bytes
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8")) / 2


def test_specials_never_produced_from_plain_text(tokenizer):
    text = "".join(SPECIAL_TOKENS) + " <|bos|>hello<|assistant_end|> <|endoftext|>"
    for ids in [tokenizer.encode(text)] + tokenizer.encode([text, text], num_threads=2):
        assert max(ids) < tokenizer.bos_token_id
        assert tokenizer.decode(ids) == text
    arrays = tokenizer.encode_arrays([text], prepend=None)
    assert int(arrays[0].max()) < tokenizer.bos_token_id


def test_prepend_and_batch_paths_agree(tokenizer):
    texts = _corpus(20, seed=2) + UNICODE_TEXTS
    single = [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode(texts, num_threads=1) == single
    assert tokenizer.encode(texts, num_threads=3) == single
    bos = tokenizer.bos_token_id
    with_bos = tokenizer.encode(texts, prepend=bos, num_threads=2)
    assert with_bos == [[bos] + ids for ids in single]
    assert tokenizer.encode(texts[0], prepend="<|bos|>") == [bos] + single[0]
    arrays = tokenizer.encode_arrays(texts, prepend=bos, num_threads=2)
    assert [a.dtype for a in arrays] == [np.int32] * len(texts)
    assert [a.tolist() for a in arrays] == with_bos


def test_save_load_identical_ids_plain_files(tokenizer, tmp_path):
    from tiktoken.load import load_tiktoken_bpe

    folder = tokenizer.save(tmp_path / "tok")
    assert sorted(p.name for p in folder.iterdir()) == ["token_bytes.npy", "tokenizer.json", "tokenizer.tiktoken"]
    # the ranks file is tiktoken's own text format; the meta is JSON; token_bytes needs no pickle
    assert load_tiktoken_bpe(str(folder / "tokenizer.tiktoken")) == tokenizer.mergeable_ranks
    meta = json.loads((folder / "tokenizer.json").read_text())
    assert meta["vocab_size"] == VOCAB and meta["special_tokens"]["<|bos|>"] == tokenizer.bos_token_id
    assert np.load(folder / "token_bytes.npy", allow_pickle=False).tolist() == tokenizer.token_bytes().tolist()
    loaded = Tokenizer.load(folder)
    texts = _corpus(10, seed=3) + UNICODE_TEXTS
    assert loaded.encode(texts) == tokenizer.encode(texts)
    assert loaded.vocab_size == tokenizer.vocab_size and loaded.bos_token_id == tokenizer.bos_token_id
    assert loaded.pattern == tokenizer.pattern


def test_token_bytes(tokenizer):
    tb = tokenizer.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (VOCAB,)
    for i in range(tokenizer.bos_token_id):
        assert tb[i].item() == len(tokenizer.decode_single_token_bytes(i))
    assert tb[tokenizer.bos_token_id:].tolist() == [0] * len(SPECIAL_TOKENS)
    assert tb[:256].tolist() == [1] * 256 and tb.max().item() > 1


def test_check_vocab(tokenizer):
    check_vocab(tokenizer, VOCAB)
    with pytest.raises(UserError, match=r"vocab size 1024 does not match data.vocab_size=32768"):
        check_vocab(tokenizer, 32768)


def test_doc_cap_and_max_chars():
    docs = ["a" * 50, "b" * 50, "c" * 50, "d" * 50]
    assert list(capped_texts(docs, doc_cap=10, max_chars=25)) == ["a" * 10, "b" * 10, "c" * 10]
    assert list(capped_texts(docs, doc_cap=0, max_chars=10**9)) == docs


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="too small for vocab_size"):
        Tokenizer.train(["tiny text"] * 3, 1024, progress=False)
    with pytest.raises(UserError, match="at least 265"):
        Tokenizer.train(["x"], 100, progress=False)
    with pytest.raises(UserError, match="no tokenizer at"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    (tmp_path / "broken" / "tokenizer.tiktoken").write_text("garbage\n")
    with pytest.raises(UserError, match="cannot read the tokenizer"):
        Tokenizer.load(tmp_path / "broken")
