"""CORE: DCLM's in-context-learning score, computed the way the reference recipe computes it.

A bundle (the reference's public `eval_bundle/` or one built by scripts/prepare_core_offline.py) holds
`core.yaml` (the task list), `eval_data/<uri>.jsonl` (the items) and `eval_meta_data.csv` (random baselines
in percent). Every item becomes one prompt per choice (or two for language modelling); the model scores the
continuation tokens; accuracy is centered by the random baseline and CORE is the mean of the centered scores.

Prompts are scored whole, as the published numbers were: the reference crops nothing its rotary table covers
(10 x the training context), so neither does this file. A prompt longer than the model's position limit is
left-cropped to it with one warning per task; cropping to the training context is an explicit option
(`eval.core_crop_to_seq_len`). The evaluation dtype follows the reference too (`eval.core_dtype`): bf16 on CUDA,
fp32 on CPU, whatever dtype training runs in. The CORE line (`core_line`) states both.

Where the recipe is silent or would crash, this file decides (each spot says so): a choice whose tokens are
all shared with another still scores its last token; `num_fewshot` is capped at the items available; a
continuation that does not fit in the cropped prompt counts as wrong; an LM item whose short prompt is not a
token prefix of the long one is scored from the common prefix.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from titanlite.errors import UserError
from titanlite.eval.core_tasks import (CORE_TASK_LABELS, LANGUAGE_MODELING, MULTIPLE_CHOICE, NUM_CORE_TASKS,
                                       SCHEMA, TASK_TYPES)
from titanlite.logging_utils import logger

SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234
# Examples are tokenized and scored a chunk at a time so a 10k-item, 10-shot task never holds all its tokens.
EXAMPLES_PER_CHUNK = 256


# ----------------------------------------------------------------------------------------------------------
# Bundle reading
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    dataset_uri: str
    random_baseline: float  # percent


def _yaml_error_line(exc: yaml.YAMLError, source: str) -> str:
    """One line for a YAML syntax error: `source:line:column: problem (context)`."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        return f"{source}: character {char} at position {exc.position}: {exc.reason}"
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    return f"{where}: {problem}" + (f" ({context})" if context else "")


def parse_core_yaml(text: str, source: str = "core.yaml") -> list[dict]:
    """The `icl_tasks` list of a core.yaml (a list of task mappings; other top-level keys are ignored)."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"cannot read {_yaml_error_line(exc, source)}") from None
    if document is None:
        return []
    if not isinstance(document, dict):
        raise UserError(f"{source}: expected a mapping with an `icl_tasks:` list at the top, "
                        f"got a {type(document).__name__}")
    tasks = document.get("icl_tasks")
    if tasks is None:
        return []
    if not isinstance(tasks, list):
        raise UserError(f"{source}: expected `icl_tasks:` followed by a block list of tasks")
    for index, entry in enumerate(tasks):
        if not isinstance(entry, dict):
            raise UserError(f"{source}: icl_tasks entry {index + 1} is a {type(entry).__name__}, "
                            f"expected a `- label: ...` task mapping")
    return tasks


def read_random_baselines(csv_path: Path) -> dict[str, float]:
    """`Eval Task` -> `Random baseline` (percent) from eval_meta_data.csv."""
    if not csv_path.is_file():
        raise UserError(f"{csv_path} is missing; an eval bundle needs eval_meta_data.csv with random baselines")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "Eval Task" not in reader.fieldnames \
                or "Random baseline" not in reader.fieldnames:
            raise UserError(f"{csv_path}: needs the columns 'Eval Task' and 'Random baseline'")
        baselines = {}
        for row in reader:
            try:
                baselines[row["Eval Task"].strip()] = float(row["Random baseline"])
            except (TypeError, ValueError):
                raise UserError(f"{csv_path}: random baseline {row['Random baseline']!r} of "
                                f"{row['Eval Task']!r} is not a number") from None
    return baselines


def load_bundle(bundle_dir: str | Path) -> list[CoreTask]:
    """The tasks a bundle declares, validated, in core.yaml order."""
    bundle_dir = Path(bundle_dir)
    yaml_path = bundle_dir / "core.yaml"
    if not yaml_path.is_file():
        raise UserError(f"no core.yaml in {bundle_dir}; run `python -m scripts.download_eval_bundle` or "
                        f"`python -m scripts.prepare_core_offline`, or set eval.eval_bundle_dir")
    try:
        text = yaml_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{yaml_path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    entries = parse_core_yaml(text, str(yaml_path))
    baselines = read_random_baselines(bundle_dir / "eval_meta_data.csv")
    tasks = []
    for entry in entries:
        label = entry.get("label")
        for key in ("label", "dataset_uri", "icl_task_type", "num_fewshot"):
            if entry.get(key) in (None, []):
                raise UserError(f"{yaml_path}: task {label!r} has no {key}")
        if entry["icl_task_type"] not in TASK_TYPES:
            raise UserError(f"{yaml_path}: task {label!r} has icl_task_type {entry['icl_task_type']!r}; "
                            f"expected one of {', '.join(TASK_TYPES)}")
        shots = entry["num_fewshot"]
        shots = shots[0] if isinstance(shots, list) else shots  # the recipe uses the first listed shot count
        if label not in baselines:
            raise UserError(f"{bundle_dir / 'eval_meta_data.csv'} has no random baseline for task {label!r}")
        delimiter = entry.get("continuation_delimiter")
        tasks.append(CoreTask(label=str(label), task_type=entry["icl_task_type"], num_fewshot=int(shots),
                              delimiter=" " if delimiter is None else str(delimiter),
                              dataset_uri=str(entry["dataset_uri"]), random_baseline=baselines[label]))
    if not tasks:
        raise UserError(f"{yaml_path} lists no icl_tasks")
    return tasks


_REQUIRED_FIELDS = {
    MULTIPLE_CHOICE: ("query", "choices", "gold"),
    SCHEMA: ("context_options", "continuation", "gold"),
    LANGUAGE_MODELING: ("context", "continuation"),
}


def load_task_items(bundle_dir: str | Path, task: CoreTask) -> list[dict]:
    """A task's JSONL items, each checked against its task type's schema."""
    path = Path(bundle_dir) / "eval_data" / task.dataset_uri
    if not path.is_file():
        raise UserError(f"{path} is missing (task {task.label}); the eval bundle is incomplete")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from None
            missing = [k for k in _REQUIRED_FIELDS[task.task_type] if k not in item]
            if missing:
                raise UserError(f"{where}: a {task.task_type} item needs {', '.join(missing)}")
            options = item.get("choices", item.get("context_options"))
            if task.task_type != LANGUAGE_MODELING and (
                    not isinstance(options, list) or not options
                    or not isinstance(item["gold"], int) or not 0 <= item["gold"] < len(options)):
                raise UserError(f"{where}: gold must index a non-empty list of options")
            items.append(item)
    if not items:
        raise UserError(f"{path} has no items (task {task.label})")
    return items


# ----------------------------------------------------------------------------------------------------------
# Example preparation: shuffling, few-shot choice, prompt rendering, continuation spans
# ----------------------------------------------------------------------------------------------------------

def shuffle_and_truncate(items: list[dict], max_per_task: int) -> list[dict]:
    """The recipe's order: shuffle with Random(1337), then keep the first max_per_task (<= 0 keeps all)."""
    items = list(items)
    random.Random(SHUFFLE_SEED).shuffle(items)
    return items[:max_per_task] if max_per_task > 0 else items


def fewshot_indices(idx: int, num_items: int, num_fewshot: int) -> list[int]:
    """Same draw as `Random(1234 + idx).sample([i for i in range(n) if i != idx], k)`, without the O(n) list.

    `sample` only ever indexes its population, so sampling positions of range(n - 1) and shifting those at or
    past idx by one gives the identical result. k is capped at n - 1 (the recipe would raise).
    """
    k = min(num_fewshot, num_items - 1)
    if k <= 0:
        return []
    picks = random.Random(FEWSHOT_SEED + idx).sample(range(num_items - 1), k)
    return [j + 1 if j >= idx else j for j in picks]


def render_prompts(task_type: str, item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """Prompts for one item: demos each followed by a blank line, then the item (one prompt per option;
    for language modelling [without continuation (stripped), with continuation])."""
    if task_type == MULTIPLE_CHOICE:
        demos = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{demos}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == SCHEMA:
        demos = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{demos}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]
    if task_type == LANGUAGE_MODELING:
        demos = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        stem = f"{demos}{item['context'].strip()}{delimiter}"
        return [stem.strip(), stem + item["continuation"]]
    raise ValueError(f"unknown task type {task_type!r}")


def common_prefix_length(sequences: list[list[int]]) -> int:
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        if any(s[i] != sequences[0][i] for s in sequences):
            return i
    return shortest


def common_suffix_length(sequences: list[list[int]]) -> int:
    return common_prefix_length([s[::-1] for s in sequences])


def continuation_spans(task_type: str, token_lists: list[list[int]]):
    """(rows, starts, ends): the sequences to score and, per row, the token span [start, end) to score."""
    if task_type == MULTIPLE_CHOICE:
        start = common_prefix_length(token_lists)
        # A choice that is a token prefix of every other would have an empty span (NaN mean in the recipe):
        # keep at least its last token so it still gets a score.
        return token_lists, [min(start, len(t) - 1) for t in token_lists], [len(t) for t in token_lists]
    if task_type == SCHEMA:
        suffix = common_suffix_length(token_lists)
        suffix = min(suffix, min(len(t) for t in token_lists) - 1)  # never score the BOS position
        return token_lists, [len(t) - suffix for t in token_lists], [len(t) for t in token_lists]
    if task_type == LANGUAGE_MODELING:
        without, with_continuation = token_lists
        start = len(without)
        if with_continuation[:start] != without:
            # BPE merged across the prompt/continuation boundary; the recipe asserts here. Score from the
            # last shared token instead so one odd item cannot stop a training run.
            start = common_prefix_length(token_lists)
        start = min(start, len(with_continuation) - 1)
        return [with_continuation], [start], [len(with_continuation)]
    raise ValueError(f"unknown task type {task_type!r}")


def crop_length(crop_len: int | None, position_limit: int | None) -> int | None:
    """The length prompts are left-cropped to: the requested crop, never past the model's position limit."""
    limits = [n for n in (crop_len, position_limit) if n is not None]
    return min(limits) if limits else None


def crop_left(tokens: list[int], start: int, end: int, max_seq_len: int | None):
    """Keep the last max_seq_len tokens (the continuation is at the end); start < 1 afterwards means the
    continuation no longer has a context token in front of it, and the row cannot be scored."""
    if max_seq_len is None or len(tokens) <= max_seq_len:
        return tokens, start, end
    dropped = len(tokens) - max_seq_len
    return tokens[dropped:], start - dropped, end - dropped


@dataclass
class _PromptStats:
    """Per-task prompt bookkeeping for the CORE line: how many rows, the longest, and how many were cropped
    because cropping was asked for (`cropped`) or because the model cannot take them (`over_limit`)."""
    prompts: int = 0
    longest: int = 0
    cropped: int = 0
    over_limit: int = 0

    def add(self, length: int, crop_len: int | None, position_limit: int | None) -> None:
        self.prompts += 1
        self.longest = max(self.longest, length)
        kept = crop_length(crop_len, position_limit)
        if kept is not None and length > kept:
            if kept == crop_len:
                self.cropped += 1
            else:
                self.over_limit += 1


@dataclass
class _Example:
    index: int  # position in the (shuffled, truncated) task list: the correctness slot it fills
    rows: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int | None  # None for language modelling

    @property
    def width(self) -> int:
        return max(len(r) for r in self.rows)


def _prepare_examples(task: CoreTask, items: list[dict], indices: list[int], tokenizer, crop_len: int | None,
                      position_limit: int | None, stats: _PromptStats) -> list[_Example]:
    prompts_per_example = []
    for idx in indices:
        fewshot = [items[j] for j in fewshot_indices(idx, len(items), task.num_fewshot)]
        prompts_per_example.append(render_prompts(task.task_type, items[idx], task.delimiter, fewshot))
    flat = [p for prompts in prompts_per_example for p in prompts]
    encoded = tokenizer.encode(flat, prepend=tokenizer.bos_token_id) if flat else []
    examples, offset = [], 0
    for idx, prompts in zip(indices, prompts_per_example):
        token_lists = encoded[offset:offset + len(prompts)]
        offset += len(prompts)
        rows, starts, ends = continuation_spans(task.task_type, token_lists)
        for r in rows:
            stats.add(len(r), crop_len, position_limit)
        keep = crop_length(crop_len, position_limit)
        cropped = [crop_left(r, s, e, keep) for r, s, e in zip(rows, starts, ends)]
        examples.append(_Example(index=idx, rows=[c[0] for c in cropped], starts=[c[1] for c in cropped],
                                 ends=[c[2] for c in cropped],
                                 gold=None if task.task_type == LANGUAGE_MODELING else items[idx]["gold"]))
    return examples


def _plan_batches(examples: list[_Example], batch_size: int, max_batch_tokens: int) -> list[list[_Example]]:
    """Group whole examples (all their rows together) into forwards of at most batch_size rows and
    max_batch_tokens padded tokens; examples sorted by length so padding stays small. An example larger
    than the limits still runs, alone."""
    batches: list[list[_Example]] = []
    current: list[_Example] = []
    rows = width = 0
    for ex in sorted(examples, key=lambda e: e.width, reverse=True):
        new_rows, new_width = rows + len(ex.rows), max(width, ex.width)
        if current and (new_rows > batch_size or new_rows * new_width > max_batch_tokens):
            batches.append(current)
            current, new_rows, new_width = [], len(ex.rows), ex.width
        current.append(ex)
        rows, width = new_rows, new_width
    if current:
        batches.append(current)
    return batches


# ----------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------

def _score_batch(model, batch: list[_Example], pad_id: int, device) -> list[tuple[bool, list[float]]]:
    """One forward for every row of every example in the batch (right-padded with BOS, which causal
    attention never lets influence the scored positions); per example (correct, mean CE of each row's
    continuation, inf where the row has no context token before it)."""
    rows = [(ex, r) for ex in batch for r in range(len(ex.rows))]
    width = max(len(ex.rows[r]) for ex, r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    row_ids, positions, targets, owners = [], [], [], []
    scorable = []
    for b, (ex, r) in enumerate(rows):
        tokens, start, end = ex.rows[r], ex.starts[r], ex.ends[r]
        input_ids[b, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        ok = 1 <= start < end
        scorable.append(ok)
        if ok:
            # logits at position p predict token p + 1
            row_ids.extend([b] * (end - start))
            positions.extend(range(start - 1, end - 1))
            targets.extend(tokens[start:end])
            owners.extend([b] * (end - start))
    logits = model(input_ids.to(device))
    if row_ids:
        picked = logits[torch.tensor(row_ids, device=device), torch.tensor(positions, device=device)].float()
        target_t = torch.tensor(targets, device=device)
        losses = F.cross_entropy(picked, target_t, reduction="none").cpu()
        hits = (picked.argmax(dim=-1) == target_t).cpu()
    owner_t = torch.tensor(owners, dtype=torch.long)
    mean_loss, all_hit = [], []
    for b in range(len(rows)):
        if not scorable[b]:
            mean_loss.append(math.inf)
            all_hit.append(False)
            continue
        mask = owner_t == b
        mean_loss.append(losses[mask].mean().item())
        all_hit.append(bool(hits[mask].all().item()))
    results, b = [], 0
    for ex in batch:
        n = len(ex.rows)
        example_losses = mean_loss[b:b + n]
        if ex.gold is None:
            results.append((all_hit[b], example_losses))
        else:
            best = min(example_losses)
            # first option with the lowest mean loss, as list.index(min(...)) picks it; all-unscorable = wrong
            results.append((math.isfinite(best) and example_losses.index(best) == ex.gold, example_losses))
        b += n
    return results


def _process_group_active(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


@dataclass
class TaskScore:
    accuracy: float
    scored: int  # examples whose every prompt kept a context token before its continuation
    prompts: _PromptStats
    losses: dict[int, list[float]]  # example index -> mean CE per prompt, this rank's examples (if recorded)


def evaluate_task(model, tokenizer, task: CoreTask, items: list[dict], *, device="cpu", rank: int = 0,
                  world_size: int = 1, batch_size: int = 32, max_batch_tokens: int = 16384,
                  crop_len: int | None = None, position_limit: int | None = None,
                  record_losses: bool = False) -> TaskScore:
    """One task over `items` (already shuffled/truncated), examples strided across ranks; counts are global."""
    correct = [0.0] * len(items)
    scored = 0
    stats = _PromptStats()
    losses: dict[int, list[float]] = {}
    local = list(range(rank, len(items), world_size))
    # Same chunk count on every rank (from the largest rank share), so the forward-count sync below lines up.
    num_chunks = math.ceil(math.ceil(len(items) / world_size) / EXAMPLES_PER_CHUNK)
    synced = _process_group_active(world_size)
    for c in range(num_chunks):
        chunk = local[c * EXAMPLES_PER_CHUNK:(c + 1) * EXAMPLES_PER_CHUNK]
        examples = _prepare_examples(task, items, chunk, tokenizer, crop_len, position_limit, stats)
        batches = _plan_batches(examples, batch_size, max_batch_tokens)
        num_forwards = len(batches)
        if synced:
            # A sharded (FSDP) model all-gathers inside every forward, so all ranks must run the same number.
            count = torch.tensor([num_forwards], dtype=torch.long, device=device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            num_forwards = int(count.item())
        for batch in batches:
            for ex, (ok, row_losses) in zip(batch, _score_batch(model, batch, tokenizer.bos_token_id, device)):
                correct[ex.index] = float(ok)
                scored += all(math.isfinite(x) for x in row_losses)
                if record_losses:
                    losses[ex.index] = row_losses
        for _ in range(num_forwards - len(batches)):
            model(torch.full((1, 1), tokenizer.bos_token_id, dtype=torch.long, device=device))
    # the counts ride along with the correctness slots (each filled by exactly one rank): one SUM for all;
    # fp32 counts are exact below 2**24 (and MPS has no fp64)
    counts = [scored, stats.prompts, stats.cropped, stats.over_limit]
    summed = torch.tensor(correct + counts, dtype=torch.float32, device=device)
    longest = torch.tensor([stats.longest], dtype=torch.long, device=device)
    if synced:
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    total = summed.tolist()
    scored, prompts, cropped, over_limit = (int(x) for x in total[len(items):])
    accuracy = sum(total[:len(items)]) / len(items)
    return TaskScore(accuracy=accuracy, scored=scored, losses=losses,
                     prompts=_PromptStats(prompts, int(longest.item()), cropped, over_limit))


# ----------------------------------------------------------------------------------------------------------
# The metric
# ----------------------------------------------------------------------------------------------------------

def center_accuracy(accuracy: float, random_baseline_percent: float) -> float:
    """0 at chance, 1 at perfect: (acc - rb/100) / (1 - rb/100)."""
    baseline = 0.01 * random_baseline_percent
    if not 0.0 <= baseline < 1.0:
        raise UserError(f"random baseline {random_baseline_percent}% is outside [0, 100)")
    return (accuracy - baseline) / (1.0 - baseline)


def core_label(labels: list[str]) -> str:
    """'CORE' for the full 22-task suite, else e.g. 'CORE-20 (20 of 22 tasks)'."""
    if len(labels) == NUM_CORE_TASKS and set(labels) == set(CORE_TASK_LABELS):
        return "CORE"
    return f"CORE-{len(labels)} ({len(labels)} of {NUM_CORE_TASKS} tasks)"


# ----------------------------------------------------------------------------------------------------------
# Settings: precision and cropping
# ----------------------------------------------------------------------------------------------------------

CORE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_core_dtype(requested: str, device_type: str) -> torch.dtype:
    """`eval.core_dtype` -> dtype. auto is the reference's choice: bf16 on CUDA (SM80+), fp32 on CPU, MPS and
    older GPUs, whatever dtype training runs in (the published CPU numbers are fp32 ones)."""
    if requested == "auto":
        from titanlite.precision import has_native_bf16

        return torch.bfloat16 if device_type == "cuda" and has_native_bf16("cuda") else torch.float32
    if requested not in CORE_DTYPES:
        raise UserError(f"eval.core_dtype = {requested!r} is not supported; use auto, bfloat16 or float32")
    return CORE_DTYPES[requested]


@dataclass(frozen=True)
class CoreSettings:
    dtype: torch.dtype
    crop_len: int | None  # left-crop prompts to this many tokens (None: only the model's position limit)
    note: str = ""  # said on the CORE line next to the dtype


def core_settings(eval_cfg, seq_len: int, device_type: str,
                  fsdp_param_dtype: torch.dtype | None = None) -> CoreSettings:
    """What CORE runs with, from the `eval` config section.

    fsdp_param_dtype: the FSDP MixedPrecisionPolicy param_dtype of a sharded model (None: not sharded, or
    FSDP does no casting). FSDP gathers the weights in that dtype and casts every sharded module's floating
    inputs to it, so the sharded blocks compute in it whatever the model's compute dtype says: CORE then
    runs in it (nothing gained by pretending otherwise) and the note says why.
    """
    dtype = resolve_core_dtype(eval_cfg.core_dtype, device_type)
    note = ""
    if fsdp_param_dtype is not None and fsdp_param_dtype != dtype:
        note = (f"eval.core_dtype gives {dtype_name(dtype)}, but FSDP runs the sharded model in its param_dtype "
                f"{dtype_name(fsdp_param_dtype)}; scripts.base_eval scores in {dtype_name(dtype)}")
        dtype = fsdp_param_dtype
    return CoreSettings(dtype=dtype, crop_len=seq_len if eval_cfg.core_crop_to_seq_len else None, note=note)


def model_position_limit(model) -> int | None:
    """Longest sequence the model takes (GPT: its RoPE table, 10 x the training context); None: unknown."""
    limit = getattr(model, "max_positions", None)
    return int(limit) if limit else None


@contextlib.contextmanager
def _run_in_dtype(model, dtype: torch.dtype | None, device_type: str):
    """The model computes in `dtype` inside the block (its weights are fp32 masters, so nothing is copied),
    with an attention kernel that takes that dtype; both are restored afterwards."""
    if dtype is None or not hasattr(model, "set_compute_dtype"):
        yield
        return
    old_dtype = model.compute_dtype
    old_backend = getattr(model, "attention_backend", None)
    model.set_compute_dtype(dtype)
    try:
        if old_backend not in (None, "auto"):
            from titanlite.attention import backend_available, select_attention_backend

            if not backend_available(old_backend, device_type, dtype)[0]:  # e.g. flash kernels take no fp32
                pattern = getattr(getattr(model, "args", None), "window_pattern", "L")
                model.set_attention_backend(select_attention_backend("auto", device_type, dtype, pattern)[0])
        yield
    finally:
        model.set_compute_dtype(old_dtype)
        if old_backend is not None and model.attention_backend != old_backend:
            model.set_attention_backend(old_backend)


# ----------------------------------------------------------------------------------------------------------
# Running it
# ----------------------------------------------------------------------------------------------------------

@dataclass
class CoreResult:
    accuracy: dict[str, float]  # per task, in bundle order
    centered: dict[str, float]
    core: float  # mean of centered over the tasks evaluated
    num_tasks: int
    label: str  # "CORE" or "CORE-n (n of 22 tasks)"
    num_examples: dict[str, int]
    seconds: float
    examples_per_second: float
    missing_tasks: list[str] = field(default_factory=list)  # standard CORE tasks not evaluated
    dtype: str = "float32"  # what the model computed in
    crop_len: int | None = None  # the requested crop (eval.core_crop_to_seq_len), None: none asked for
    position_limit: int | None = None  # the model's own limit (its RoPE table); longer prompts are cropped to it
    num_scored: dict[str, int] = field(default_factory=dict)  # examples whose continuations all kept context
    num_prompts: int = 0  # scored sequences (one per choice; one per LM item)
    longest_prompt: int = 0  # tokens, before any crop
    cropped_prompts: int = 0  # cropped to crop_len
    over_limit_prompts: int = 0  # cropped to position_limit
    example_losses: dict[str, dict[int, list[float]]] = field(default_factory=dict)  # with record_losses


def evaluate_core(model, tokenizer, bundle_dir: str | Path, max_per_task: int = -1, device="cpu",
                  rank: int = 0, world_size: int = 1, batch_size: int = 32, max_seq_len: int | None = None,
                  tasks: list[str] | None = None, max_batch_tokens: int = 16384, dtype: torch.dtype | None = None,
                  record_losses: bool = False) -> CoreResult:
    """Score `model` on a bundle's tasks. Every rank must call this with the same arguments.

    batch_size caps the rows (prompts) per forward, max_batch_tokens the padded tokens per forward (bounds
    the (rows, T, vocab) logits). Prompts are scored whole up to the model's position limit
    (`max_positions`, cropped to it with one warning per task); max_seq_len left-crops them further (None:
    no crop, as the published numbers). dtype: the compute dtype for the evaluation (None: the model's own).
    record_losses keeps each example's per-prompt mean continuation CE (this rank's examples).
    """
    all_tasks = load_bundle(bundle_dir)
    if tasks is not None:
        known = {t.label for t in all_tasks}
        unknown = [label for label in tasks if label not in known]
        if unknown:
            raise UserError(f"task(s) {', '.join(unknown)} not in {Path(bundle_dir) / 'core.yaml'}; "
                            f"available: {', '.join(sorted(known))}")
        all_tasks = [t for t in all_tasks if t.label in set(tasks)]
        if not all_tasks:
            raise UserError("no CORE tasks selected; pass at least one task label")
    limit = model_position_limit(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    accuracy, centered, counts, scored, losses = {}, {}, {}, {}, {}
    prompts = _PromptStats()
    started = time.perf_counter()
    try:
        with torch.no_grad(), _run_in_dtype(model, dtype, torch.device(device).type):
            used_dtype = getattr(model, "compute_dtype", None) or torch.float32
            for task in all_tasks:
                task_start = time.perf_counter()
                items = shuffle_and_truncate(load_task_items(bundle_dir, task), max_per_task)
                score = evaluate_task(model, tokenizer, task, items, device=device, rank=rank,
                                      world_size=world_size, batch_size=batch_size,
                                      max_batch_tokens=max_batch_tokens, crop_len=max_seq_len,
                                      position_limit=limit, record_losses=record_losses)
                accuracy[task.label] = score.accuracy
                centered[task.label] = center_accuracy(score.accuracy, task.random_baseline)
                counts[task.label], scored[task.label] = len(items), score.scored
                if record_losses:
                    losses[task.label] = score.losses
                p = score.prompts
                prompts = _PromptStats(prompts.prompts + p.prompts, max(prompts.longest, p.longest),
                                       prompts.cropped + p.cropped, prompts.over_limit + p.over_limit)
                if p.over_limit:
                    logger.warning(f"warning: CORE task {task.label}: {p.over_limit} of {p.prompts} prompts are "
                                   f"longer than the model's {limit} positions (its RoPE table) and were "
                                   f"left-cropped to their last {limit} tokens")
                elapsed = time.perf_counter() - task_start
                logger.info(f"CORE {task.label}: accuracy {score.accuracy:.4f} | centered "
                            f"{centered[task.label]:.4f} | {len(items)} examples in {elapsed:.1f}s")
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    seconds = time.perf_counter() - started
    labels = list(accuracy)
    total = sum(counts.values())
    return CoreResult(accuracy=accuracy, centered=centered,
                      core=sum(centered.values()) / len(centered), num_tasks=len(labels),
                      label=core_label(labels), num_examples=counts, seconds=seconds,
                      examples_per_second=total / seconds if seconds > 0 else float("inf"),
                      missing_tasks=[t for t in CORE_TASK_LABELS if t not in accuracy],
                      dtype=dtype_name(used_dtype), crop_len=max_seq_len, position_limit=limit,
                      num_scored=scored, num_prompts=prompts.prompts, longest_prompt=prompts.longest,
                      cropped_prompts=prompts.cropped, over_limit_prompts=prompts.over_limit,
                      example_losses=losses)


def core_line(result: CoreResult, note: str = "") -> str:
    """The CORE summary line: score, the dtype it was computed in, and whether prompts were cropped."""
    dtype = f"{result.dtype} ({note})" if note else result.dtype
    limit = f", model limit {result.position_limit}" if result.position_limit else ""
    over = result.over_limit_prompts
    if result.crop_len is not None:
        crop = (f"prompts cropped to {result.crop_len} tokens (eval.core_crop_to_seq_len): "
                f"{result.cropped_prompts} of {result.num_prompts}")
        if over:
            crop += f", {over} more to the model's {result.position_limit} positions"
    elif over:
        crop = (f"prompts cropped only past the model's {result.position_limit} positions: {over} of "
                f"{result.num_prompts} (longest {result.longest_prompt} tokens)")
    else:
        crop = f"no prompt cropping (longest {result.longest_prompt} tokens{limit})"
    return (f"{result.label}: {result.core:.4f} | dtype {dtype} | {crop} | "
            f"{result.examples_per_second:.1f} examples/s")


def write_core_csv(result: CoreResult, path: str | Path) -> None:
    """Task, Accuracy, Centered per task, then the mean row (named by result.label), like the reference."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n")
        for label, acc in result.accuracy.items():
            f.write(f"{label:<35}, {acc:<10.6f}, {result.centered[label]:<10.6f}\n")
        f.write(f"{result.label:<35}, {'':<10}, {result.core:<10.6f}\n")
