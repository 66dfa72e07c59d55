"""The 22 CORE tasks (DCLM's low-variance ICL suite minus MMLU), as the public eval bundle lists them.

The evaluator reads everything it needs from a bundle's own `core.yaml` and `eval_meta_data.csv`; this table
is what the offline bundle builder writes, and what names the tasks a partial bundle is missing. Baselines are
DCLM's `eval_meta_data` values, in percent.
"""

from __future__ import annotations

from dataclasses import dataclass

MULTIPLE_CHOICE = "multiple_choice"
SCHEMA = "schema"
LANGUAGE_MODELING = "language_modeling"
TASK_TYPES = (MULTIPLE_CHOICE, SCHEMA, LANGUAGE_MODELING)


@dataclass(frozen=True)
class CoreTaskSpec:
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    random_baseline: float  # percent, as in eval_meta_data.csv
    dataset_uri: str  # relative to <bundle>/eval_data/
    category: str


_ANSWER = "\nAnswer: "

CORE_TASKS: tuple[CoreTaskSpec, ...] = (
    CoreTaskSpec("hellaswag_zeroshot", MULTIPLE_CHOICE, 0, " ", 25.0,
                 "language_understanding/hellaswag.jsonl", "language understanding"),
    CoreTaskSpec("jeopardy", LANGUAGE_MODELING, 10, _ANSWER, 0.0,
                 "world_knowledge/jeopardy_all.jsonl", "world knowledge"),
    CoreTaskSpec("bigbench_qa_wikidata", LANGUAGE_MODELING, 10, " ", 0.0,
                 "world_knowledge/bigbench_qa_wikidata.jsonl", "world knowledge"),
    CoreTaskSpec("arc_easy", MULTIPLE_CHOICE, 10, _ANSWER, 25.0,
                 "world_knowledge/arc_easy.jsonl", "world knowledge"),
    CoreTaskSpec("arc_challenge", MULTIPLE_CHOICE, 10, _ANSWER, 25.0,
                 "world_knowledge/arc_challenge.jsonl", "world knowledge"),
    CoreTaskSpec("copa", MULTIPLE_CHOICE, 0, " ", 50.0,
                 "commonsense_reasoning/copa.jsonl", "commonsense reasoning"),
    CoreTaskSpec("commonsense_qa", MULTIPLE_CHOICE, 10, " ", 20.0,
                 "commonsense_reasoning/commonsense_qa.jsonl", "commonsense reasoning"),
    CoreTaskSpec("piqa", MULTIPLE_CHOICE, 10, _ANSWER, 50.0,
                 "commonsense_reasoning/piqa.jsonl", "commonsense reasoning"),
    CoreTaskSpec("openbook_qa", MULTIPLE_CHOICE, 0, " ", 25.0,
                 "commonsense_reasoning/openbook_qa.jsonl", "commonsense reasoning"),
    CoreTaskSpec("lambada_openai", LANGUAGE_MODELING, 0, " ", 0.0,
                 "language_understanding/lambada_openai.jsonl", "language understanding"),
    CoreTaskSpec("hellaswag", MULTIPLE_CHOICE, 10, " ", 25.0,
                 "language_understanding/hellaswag.jsonl", "language understanding"),
    CoreTaskSpec("winograd", SCHEMA, 0, " ", 50.0,
                 "language_understanding/winograd_wsc.jsonl", "language understanding"),
    CoreTaskSpec("winogrande", SCHEMA, 0, " ", 50.0,
                 "language_understanding/winogrande.jsonl", "language understanding"),
    CoreTaskSpec("bigbench_dyck_languages", LANGUAGE_MODELING, 10, " ", 0.0,
                 "symbolic_problem_solving/bigbench_dyck_languages.jsonl", "symbolic problem solving"),
    CoreTaskSpec("agi_eval_lsat_ar", MULTIPLE_CHOICE, 3, " ", 20.0,
                 "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", "symbolic problem solving"),
    CoreTaskSpec("bigbench_cs_algorithms", LANGUAGE_MODELING, 10, " ", 0.0,
                 "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", "symbolic problem solving"),
    CoreTaskSpec("bigbench_operators", LANGUAGE_MODELING, 10, " ", 0.0,
                 "symbolic_problem_solving/bigbench_operators.jsonl", "symbolic problem solving"),
    CoreTaskSpec("bigbench_repeat_copy_logic", LANGUAGE_MODELING, 10, " ", 0.0,
                 "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", "symbolic problem solving"),
    CoreTaskSpec("squad", LANGUAGE_MODELING, 10, " ", 0.0,
                 "reading_comprehension/squad.jsonl", "reading comprehension"),
    CoreTaskSpec("coqa", LANGUAGE_MODELING, 0, " ", 0.0,
                 "reading_comprehension/coqa.jsonl", "reading comprehension"),
    CoreTaskSpec("boolq", MULTIPLE_CHOICE, 10, _ANSWER, 62.0,
                 "reading_comprehension/boolq.jsonl", "reading comprehension"),
    CoreTaskSpec("bigbench_language_identification", MULTIPLE_CHOICE, 10, " ", 9.1,
                 "language_understanding/bigbench_language_identification.jsonl", "language understanding"),
)

CORE_TASK_LABELS: tuple[str, ...] = tuple(t.label for t in CORE_TASKS)
NUM_CORE_TASKS = len(CORE_TASKS)


def core_task(label: str) -> CoreTaskSpec:
    for spec in CORE_TASKS:
        if spec.label == label:
            return spec
    raise KeyError(label)
