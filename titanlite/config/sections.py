"""One dataclass per TOML section. Every field has a default and a one-line doc (shown by `--help`).

Defaults are the seed's (the user's description of the feature: its option table); the recipe's best values
live in the shipped train_configs/. The seed flag each field answers to is noted in `seed=` (see
scripts/base_train.py).
"""

from dataclasses import dataclass, field
from typing import Any


def opt(default: Any, doc: str, *, choices: tuple | None = None, seed: str | None = None,
        loose: bool = False) -> Any:
    """A config field: default + one-line doc (+ allowed values, + the seed flag mapped onto it).

    `loose` lets a string field also take a TOML integer or boolean (e.g. `resume_from_step = 120`).
    """
    meta = {"doc": doc, "choices": choices, "seed": seed, "loose": loose}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class JobSectionConfig:
    config_file: str = opt("", "TOML job file; a bare name falls back to the shipped train_configs/")
    dump_folder: str = opt("outputs", "root folder for run folders (config, TensorBoard, checkpoints)")
    description: str = opt("", "free text describing the run, written to the run folder")
    dry_run: bool = opt(False, "print the resolved config and the plan, then exit (no weights allocated)")


@dataclass(frozen=True)
class ModelConfig:
    name: str = opt("gpt", "registered model (TrainSpec) to train")
    depth: int = opt(20, "transformer layers: the main scaling dial", seed="--depth")
    aspect_ratio: int = opt(64, "model_dim = depth * aspect_ratio (rounded up to head_dim)", seed="--aspect-ratio")
    head_dim: int = opt(128, "attention head dimension", seed="--head-dim")
    max_seq_len: int = opt(2048, "context length T", seed="--max-seq-len")
    window_pattern: str = opt("SSSL", "gpt: sliding-window pattern tiled over layers (L=full, S=quarter context)",
                              seed="--window-pattern")
    attention_backend: str = opt("auto", "attention kernel",
                                 choices=("auto", "fa3", "fa4", "flash_attn", "flex", "sdpa"))
    softcap: float = opt(15.0, "gpt: logit softcap c in c*tanh(logits/c)")


@dataclass(frozen=True)
class TrainingConfig:
    device_type: str = opt("", "device: '' autodetects cuda > mps > cpu", choices=("", "auto", "cuda", "cpu", "mps"),
                           seed="--device-type")
    dtype: str = opt("auto", "compute dtype (fp32 master weights); auto = bf16 where the hardware has it",
                     choices=("auto", "bfloat16", "float32"))
    num_iterations: int = opt(-1, "exact optimizer steps (-1: derive from target_flops or the ratio)",
                              seed="--num-iterations")
    target_flops: float = opt(-1.0, "FLOPs budget that sets the steps (-1: off)", seed="--target-flops")
    target_param_data_ratio: float = opt(10.5, "training tokens per scaling parameter (-1: off)",
                                         seed="--target-param-data-ratio")
    device_batch_size: int = opt(32, "sequences per device per micro-step (reduce on OOM)",
                                 seed="--device-batch-size")
    total_batch_size: int = opt(-1, "global tokens per optimizer step (-1: auto from model size)",
                                seed="--total-batch-size")
    seed: int = opt(42, "global seed: every parallel layout starts from the same weights")
    gc_every: int = opt(5000, "steps between collective gc.collect() calls after the first step freezes GC")


@dataclass(frozen=True)
class OptimizerConfig:
    embedding_lr: float = opt(0.3, "AdamW LR of the token and value embeddings", seed="--embedding-lr")
    unembedding_lr: float = opt(0.004, "AdamW LR of lm_head", seed="--unembedding-lr")
    matrix_lr: float = opt(0.02, "Muon LR of the block matrices", seed="--matrix-lr")
    scalar_lr: float = opt(0.5, "AdamW LR of the per-layer scalars", seed="--scalar-lr")
    weight_decay: float = opt(0.2, "Muon weight decay before scaling", seed="--weight-decay")
    adam_beta1: float = opt(0.8, "AdamW beta1 of the embedding-type groups", seed="--adam-beta1")
    adam_beta2: float = opt(0.95, "AdamW beta2 of the embedding-type groups", seed="--adam-beta2")
    unembedding_beta2: float = opt(-1.0, "lm_head AdamW beta2 (-1: adam_beta2; the recipe uses 0.96)")
    embedding_beta2: float = opt(-1.0, "wte and value-embedding AdamW beta2 (-1: adam_beta2; the recipe uses 0.995)")
    muon_beta2: float = opt(0.9, "NorMuon second-moment decay")
    muon_ns_steps: int = opt(5, "Polar Express iterations")


@dataclass(frozen=True)
class LRSchedulerConfig:
    warmup_ratio: float = opt(0.0, "fraction of steps for LR warmup", seed="--warmup-ratio")
    warmup_steps: int = opt(-1, "absolute LR warmup steps; >= 0 overrides warmup_ratio")
    warmdown_ratio: float = opt(0.5, "fraction of steps for the final LR warmdown", seed="--warmdown-ratio")
    final_lr_frac: float = opt(0.0, "LR multiplier at the end of the warmdown", seed="--final-lr-frac")
    momentum_warmup_steps: int = opt(400, "steps of Muon momentum warmup")
    momentum_start: float = opt(0.85, "Muon momentum at step 0")
    momentum_peak: float = opt(0.97, "Muon momentum after warmup")
    momentum_final: float = opt(0.90, "Muon momentum at the end of the warmdown")
    muon_wd_schedule: str = opt("cosine", "Muon weight-decay schedule", choices=("cosine", "linear", "constant"))


@dataclass(frozen=True)
class DataConfig:
    dataset: str = opt("embedded", "corpus", choices=("embedded", "local", "climbmix", "fineweb_edu"))
    local_path: str = opt("", "folder of .txt/.jsonl/.parquet files (dataset = local)")
    data_dir: str = opt("", "parquet shard folder ('' = <cache>/data/<dataset>)")
    tokenizer_dir: str = opt("", "tokenizer folder ('' = <cache>/tokenizer/<dataset>-<vocab_size>)")
    vocab_size: int = opt(32768, "tokenizer vocab size including special tokens")
    tokenizer_max_chars: int = opt(2_000_000_000, "characters used to train the tokenizer")
    tokenizer_doc_cap: int = opt(10_000, "characters kept per document for tokenizer training")
    buffer_docs: int = opt(1000, "documents buffered for best-fit packing")
    num_shards: int = opt(-1, "training shards to download for web-scale sets (-1: all)")
    loader_threads: int = opt(4, "tokenizer threads of the data loader")


@dataclass(frozen=True)
class EvalConfig:
    eval_every: int = opt(250, "steps between val_bpb evaluations (-1: off)", seed="--eval-every")
    eval_tokens: int = opt(41_943_040, "validation tokens per val_bpb evaluation", seed="--eval-tokens")
    core_metric_every: int = opt(2000, "steps between CORE evaluations (-1: off)", seed="--core-metric-every")
    core_metric_max_per_task: int = opt(500, "examples per CORE task (-1: all)", seed="--core-metric-max-per-task")
    sample_every: int = opt(2000, "steps between generated samples (-1: off)", seed="--sample-every")
    eval_bundle_dir: str = opt("", "CORE bundle folder ('' = <cache>/eval_bundle)")
    core_crop_to_seq_len: bool = opt(False, "left-crop CORE prompts to the training context (saves memory; the "
                                     "published numbers score them whole up to the 10 x T RoPE table)")
    core_dtype: str = opt("auto", "CORE compute dtype (auto: bf16 on CUDA, fp32 on CPU, as the reference)",
                          choices=("auto", "bfloat16", "float32"))


@dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = opt(-1, "steps between checkpoints (-1: only at the end)", seed="--save-every")
    save_every_minutes: float = opt(-1.0, "also save when this many minutes passed since the last save (-1: off); "
                                    "bounds the work a fault costs in wall-clock time")
    resume_from_step: str = opt("-1", "step to resume from: a number, 'latest', 'auto' (latest if any, else fresh) "
                                "or -1 for none; a torchrun restart always resumes the latest",
                                seed="--resume-from-step", loose=True)
    model_tag: str = opt("", "run folder name ('' = d<depth>)", seed="--model-tag")
    keep_latest_k: int = opt(0, "checkpoints kept (0: all)")
    async_mode: str = opt("disabled", "checkpoint save mode", choices=("disabled", "async"))
    enabled: bool = opt(True, "write checkpoints at all")
    save_on_sigterm: bool = opt(True, "on SIGTERM (preemption) finish the step, save, exit 143")


@dataclass(frozen=True)
class MetricsConfig:
    run: str = opt("dummy", "Weights & Biases run name ('dummy' disables W&B)", seed="--run")
    log_every: int = opt(1, "steps between terminal/TensorBoard step lines")
    tensorboard: bool = opt(True, "write TensorBoard events to <run folder>/tb")
    wandb_project: str = opt("titanlite", "Weights & Biases project")
    peak_flops: float = opt(0.0, "peak FLOP/s per device that MFU divides by (0: GPU datasheet table, or the "
                            "CPU matmul peak cached per CPU/dtype/threads, measured when missing)")
    remeasure_peak: bool = opt(False, "measure the CPU matmul peak again and replace the cached value")


@dataclass(frozen=True)
class ParallelismConfig:
    dp_shard: int = opt(-1, "FSDP shard degree (-1: all remaining ranks)")
    dp_replicate: int = opt(1, "replicate degree (HSDP across nodes)")
    world_size: int = opt(-1, "world size assumed by the planner / dry run (-1: from torchrun)")


@dataclass(frozen=True)
class CompileConfig:
    enabled: str = opt("auto", "torch.compile (auto: on for CUDA; on CPU for one-process bf16 runs expected to "
                               "train 30+ min eagerly, where it pays back)", choices=("auto", "true", "false"),
                       loose=True)
    scope: str = opt("auto", "what compile covers: blocks (each block; FSDP's hooks stay outside the graphs), model "
                             "(the whole forward, embeddings and head included: more fusion, a longer compile, one "
                             "process only) or auto (model on one CPU process, blocks otherwise)",
                     choices=("auto", "blocks", "model"))


@dataclass(frozen=True)
class Float8Config:
    enabled: bool = opt(False, "float8 training of large linears via torchao (SM89+)", seed="--fp8")
    recipe: str = opt("tensorwise", "float8 scaling recipe", choices=("tensorwise", "rowwise"), seed="--fp8-recipe")
    emulate: bool = opt(False, "emulate float8 on hardware without it (tests only)")
    exclude_fqns: list[str] = opt([], "module name parts never converted to float8 (Linears whose dims are not "
                                      "multiples of 16, such as small gates, never are)")


@dataclass(frozen=True)
class ActivationCheckpointConfig:
    mode: str = opt("none", "activation checkpointing", choices=("none", "selective", "full"))
    selective_every: int = opt(2, "selective mode: checkpoint every Nth block")


@dataclass(frozen=True)
class DebugConfig:
    stop_after_steps: int = opt(-1, "stop the loop after this step as if interrupted (-1: off)")
    inject_nan_at_step: int = opt(-1, "make the loss NaN at this step to exercise the guard (-1: off)")


SECTIONS: dict[str, type] = {
    "job": JobSectionConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "optimizer": OptimizerConfig,
    "lr_scheduler": LRSchedulerConfig,
    "data": DataConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "metrics": MetricsConfig,
    "parallelism": ParallelismConfig,
    "compile": CompileConfig,
    "float8": Float8Config,
    "activation_checkpoint": ActivationCheckpointConfig,
    "debug": DebugConfig,
}


@dataclass(frozen=True)
class JobConfig:
    job: JobSectionConfig = field(default_factory=JobSectionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    float8: Float8Config = field(default_factory=Float8Config)
    activation_checkpoint: ActivationCheckpointConfig = field(default_factory=ActivationCheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
