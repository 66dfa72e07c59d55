"""`scripts.export --format hf`: a gpt and a llama run trained here, read back by transformers in a fresh interpreter
that cannot import titanlite (tests/helpers/hf_reader.py), give titanlite's logits and greedy tokens; the exported
tokenizer gives titanlite's ids for 1,000 corpus documents and odd text, and decodes them back.

The trained checkpoints are a few steps old, so their residual branches (zero-initialised projections) and head
(std 0.001) still carry little: the same weights re-drawn at full scale (every branch, gate and scalar large,
logits in the softcap's bend) go through the same writer, so a wrong term cannot hide under a small one.
"""

import dataclasses
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

pytest.importorskip("transformers")

from scripts.export import main as export_main  # noqa: E402
from titanlite import train  # noqa: E402
from titanlite.config import load_config  # noqa: E402
from titanlite.data import shards  # noqa: E402
from titanlite.data.corpora import prepare_tokenizer, resolve_data_dir  # noqa: E402
from titanlite.data.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402
from titanlite.errors import UserError  # noqa: E402
from titanlite.export import read_checkpoint_weights  # noqa: E402
from titanlite.generate import generate  # noqa: E402
from titanlite.hf.export import export_hf, write_hf_folder  # noqa: E402
from titanlite.hf.tokenizer import byte_to_unicode  # noqa: E402

READER = Path(__file__).resolve().parents[1] / "helpers" / "hf_reader.py"
VOCAB = 512
# sequence_len 256, pattern SL: layer 0 sees 128 keys back (S = quarter context rounded up to 128), layer 1 256;
# prompts of 300 and 700 tokens run past both windows (and past the training length)
TINY = ["--model.depth=2", "--model.aspect_ratio=64", "--model.head_dim=32", "--model.max_seq_len=256",
        "--model.window_pattern=SL", "--training.device_type=cpu", "--training.dtype=float32",
        "--training.device_batch_size=2", "--training.total_batch_size=512", "--training.num_iterations=3",
        f"--data.vocab_size={VOCAB}", "--eval.eval_every=-1", "--eval.sample_every=-1",
        "--eval.core_metric_every=-1", "--metrics.tensorboard=false", "--compile.enabled=false",
        "--lr_scheduler.warmup_steps=1"]
PROMPT_LENGTHS = (1, 300, 700)
ODD_TEXTS = [
    "héllo wörld — ünïcödé ½ 日本語のテキスト、句読点。 한국어 русский",
    "ελληνικά עברית العربية 😀🎉👩‍👩‍👧",
    "\u00a0no-break\u2003em\u2009thin\u200bzero-width \r\n\r\n\ttabs\t\t\v\f end",
    "don't I'LL we've THEY'RE it's ſ 1234567 3.14159 0x1F $5,000.00 ---- ....... !!!???",
    "   leading spaces\n\n\n trailing   \n",
    "literal specials stay text: <|bos|> <|user_start|>hi<|user_end|> <|assistant_start|>",
    "",
    "a",
    "\U0001F600" * 5 + "\u0301\u0301 combining",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two trained runs (gpt, llama), their exports, and every reference the reader is compared with."""
    root = tmp_path_factory.mktemp("hf")
    mp = pytest.MonkeyPatch()
    mp.setenv("TITANLITE_HOME", str(root / "home"))
    torch.set_num_threads(1)
    try:
        yield _prepare(root)
    finally:
        mp.undo()


def _train(root: Path, family: str) -> Path:
    trainer = train.Trainer(load_config(TINY + [f"--model.name={family}", f"--job.dump_folder={root / family}"]))
    try:
        trainer.train()
    finally:
        trainer.close()
    return root / family / "d2"


def _full_scale(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The same tensors re-drawn so that every path is large: matrices ~ N(0, 1 / fan_in), embeddings N(0, 1),
    the head 4x (logits of about +-10, bent by a softcap of 15), gains and scalars in [0.2, 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in sorted(weights.items()):
        if t.ndim == 2:
            std = 1.0 if name.startswith(("wte", "value_embeds")) else t.shape[1] ** -0.5
            out[name] = torch.randn(t.shape, generator=g) * (4 * std if name == "lm_head.weight" else std)
        else:
            out[name] = torch.rand(t.shape, generator=g) * 0.8 + 0.2
    return out


def _titanlite_model(spec, args, weights):
    model = spec.build_meta_model(dataclasses.replace(args, attention_backend="sdpa"))
    model.to_empty(device="cpu")
    model.load_state_dict(weights, strict=True)
    model.init_buffers()
    return model.eval()


def _prepare(root: Path):
    g = torch.Generator().manual_seed(0)
    prompts = {f"len{n}": torch.randint(0, VOCAB, (1, n), generator=g) for n in PROMPT_LENGTHS}
    save_file(prompts, str(root / "prompts.safetensors"))
    jobs, references = [], {}
    for family in ("gpt", "llama"):
        run = _train(root, family)
        assert export_main([str(run), "--format", "hf", "--out", str(root / f"{family}-hf")]) == 0
        assert export_main([str(run), "--format", "hf", "--dtype", "bfloat16", "--out",
                            str(root / f"{family}-hf-bf16")]) == 0
        spec, meta, weights = read_checkpoint_weights(run / "step-000003")
        args = spec.args_from_dict(meta["model_args"])
        big = _full_scale(weights, seed=1)
        tokenizer = prepare_tokenizer(load_config(TINY).data)
        write_hf_folder(root / f"{family}-hf-full", spec, args, big, tokenizer)
        for name, tensors in ((f"{family}", weights), (f"{family}-full", big)):
            model = _titanlite_model(spec, args, tensors)
            with torch.no_grad():
                references[name] = {key: (model(ids), list(generate(model, ids[0].tolist(), 32)))
                                    for key, ids in prompts.items()}
            jobs.append({"name": name, "folder": str(root / f"{name.replace(family, family + '-hf', 1)}"),
                         "dtype": "float32", "prompts": str(root / "prompts.safetensors"), "generate": True,
                         "padded_batch": ["len1", "len300"] if name.endswith("full") else None})
        jobs.append({"name": f"{family}-bf16", "folder": str(root / f"{family}-hf-bf16"), "dtype": "bfloat16",
                     "prompts": str(root / "prompts.safetensors"), "generate": False})

    config = load_config(TINY)
    tokenizer = prepare_tokenizer(config.data)
    paths = sorted(resolve_data_dir(config.data).glob("shard_*.parquet"))
    texts = []
    for text in shards.iter_texts(paths):
        texts.append(text)
        if len(texts) == 1000:
            break
    texts += ODD_TEXTS
    paths = {"site": sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}),
             "out": str(root / "reader.safetensors"), "report": str(root / "reader.json"), "models": jobs,
             "tokenizer": {"folder": str(root / "gpt-hf"), "texts": texts, "specials": list(SPECIAL_TOKENS)}}
    (root / "jobs.json").write_text(json.dumps(paths), encoding="utf-8")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HOME": str(root / "hf_home"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    result = subprocess.run([sys.executable, "-S", str(READER), str(root / "jobs.json")], cwd=elsewhere, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    from safetensors.torch import load_file

    report = json.loads((root / "reader.json").read_text(encoding="utf-8"))
    return {"root": root, "prompts": prompts, "references": references, "report": report,
            "read": load_file(str(root / "reader.safetensors")), "texts": texts, "tokenizer": tokenizer}


def test_the_reader_could_not_import_titanlite(runs):
    report = runs["report"]
    assert report["titanlite_importable"] is False and report["titanlite_loaded_later"] is False
    assert not any(Path(p).resolve() == Path(__file__).resolve().parents[2] for p in report["sys_path"] if p)
    classes = {name: info["class"] for name, info in report["models"].items()}
    assert classes["llama"] == classes["llama-full"] == "LlamaForCausalLM"
    assert report["models"]["llama"]["module"].startswith("transformers.models.llama")  # the library's own class
    assert classes["gpt"] == "TitanliteGPTForCausalLM"
    assert report["models"]["gpt"]["module"].startswith("transformers_modules")  # the folder's remote code
    assert report["models"]["gpt-bf16"]["dtype"] == "torch.bfloat16"


@pytest.mark.parametrize("name", ["gpt", "gpt-full", "llama", "llama-full"])
def test_transformers_logits_and_greedy_tokens_equal_titanlite(runs, name):
    for key, ids in runs["prompts"].items():
        expected_logits, expected_tokens = runs["references"][name][key]
        logits = runs["read"][f"{name}/logits/{key}"]
        assert logits.shape == expected_logits.shape == (1, ids.size(1), VOCAB)
        scale = expected_logits.abs().max().item()
        diff = (logits - expected_logits).abs().max().item()
        assert diff <= 1e-4 * scale, (key, diff, scale)
        assert runs["read"][f"{name}/generate/{key}"][0].tolist() == expected_tokens, key
    if name.endswith("full"):
        # a batch with the 1-token prompt left-padded to 300 generates what each prompt does alone
        batch = runs["read"][f"{name}/padded_batch"].tolist()
        assert batch == [runs["references"][name]["len1"][1], runs["references"][name]["len300"][1]]
    if name == "gpt-full":  # the re-drawn weights do reach the softcap's bend
        assert 5 < runs["references"][name]["len300"][0].abs().max().item() < 15


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_bfloat16_export_loads_and_stays_close(runs, family):
    with safe_open(str(runs["root"] / f"{family}-hf-bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    for key in runs["prompts"]:
        expected = runs["references"][family][key][0]
        got = runs["read"][f"{family}-bf16/logits/{key}"]
        # bf16 weights and activations: 8 significant bits
        assert (got - expected).abs().max().item() <= 0.05 * expected.abs().max().item() + 1e-3, key


def test_tokenizer_encodes_and_decodes_as_titanlite(runs):
    tok, texts, report = runs["tokenizer"], runs["texts"], runs["report"]["tokenizer"]
    assert len(texts) == 1000 + len(ODD_TEXTS)
    assert sum(any(ord(c) > 127 for c in t) for t in texts) >= 6  # non-ASCII text is in the comparison
    bos = tok.bos_token_id
    assert report["bos_token_id"] == report["eos_token_id"] == bos
    assert report["special_ids"] == {name: tok.encode_special(name) for name in SPECIAL_TOKENS}
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        assert report["ids"][i] == [bos] + ids, (i, text[:80])  # <|bos|> first, as the loader packs documents
        assert report["ids_no_specials"][i] == ids, (i, text[:80])
        assert report["decoded"][i] == text == tok.decode(ids), (i, text[:80])
        assert report["decoded_with_specials"][i] == "<|bos|>" + text
    # a padded batch: left padding with <|bos|> (the vocab has no pad token), masked out
    width = max(len(report["ids"][0]), len(report["ids"][1]))
    for ids, padded, mask in zip(report["ids"][:2], report["padded"], report["padded_mask"]):
        assert padded == [bos] * (width - len(ids)) + ids and mask == [0] * (width - len(ids)) + [1] * len(ids)
    assert len(report["ids"][0]) != len(report["ids"][1])
    # literal special-token text is ordinary text in both (titanlite's Tokenizer.encode never emits a special)
    k = 1000 + next(i for i, t in enumerate(ODD_TEXTS) if "<|bos|>" in t)
    assert not set(report["ids"][k][1:]) & set(tok.special_tokens.values())


def test_byte_alphabet_is_one_printable_character_per_byte():
    table = byte_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "\u0120" and table[0] == "\u0100"  # Ġ for space
    assert all(ch.isprintable() and not ch.isspace() for ch in table.values())


def test_export_refuses_a_foreign_folder_and_a_wrong_tokenizer(runs, tmp_path):
    run = runs["root"] / "gpt" / "d2"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="did not export there"):
        export_hf(run / "step-000003", foreign)
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1
    ours = runs["tokenizer"]
    other_dir = tmp_path / "other-tok"  # same size, specials in another order: other ids mean other text
    Tokenizer(ours.mergeable_ranks, ours.pattern, list(reversed(SPECIAL_TOKENS))).save(other_dir)
    with pytest.raises(UserError, match="not the one"):
        export_hf(run / "step-000003", tmp_path / "out", tokenizer_dir=other_dir)
    with pytest.raises(UserError, match="no tokenizer at"):
        export_hf(run / "step-000003", tmp_path / "out", tokenizer_dir=tmp_path / "missing")
    assert not (tmp_path / "out").exists()
    # a second export into its own folder replaces it (the manifest lists what it wrote)
    again = export_hf(run / "step-000003", runs["root"] / "gpt-hf")
    manifest = json.loads((again / "titanlite_export.json").read_text())
    assert manifest["family"] == "gpt" and manifest["step"] == 3
    assert sorted(manifest["files"]) == sorted(p.name for p in again.iterdir())


def test_only_the_exported_remote_code_imports_transformers():
    import ast

    repo = Path(__file__).resolve().parents[2]
    importers = []
    for path in sorted((repo / "titanlite").rglob("*.py")) + sorted((repo / "scripts").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("transformers", "tokenizers") for n in names):
                importers.append(str(path.relative_to(repo)))
    assert sorted(set(importers)) == ["titanlite/models/gpt/hf_remote/configuration_titanlite_gpt.py",
                                      "titanlite/models/gpt/hf_remote/modeling_titanlite_gpt.py"]
