"""Value checks that a type alone cannot express. Each failure is one line saying why and what to do."""

from __future__ import annotations

from titanlite.errors import UserError


class ConfigValueError(UserError):
    pass


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigValueError(message)


def _positive(name: str, value: int | float) -> None:
    _require(value > 0, f"{name} must be positive, got {value}")


def _positive_or_off(name: str, value: int | float) -> None:
    _require(value > 0 or value == -1, f"{name} must be positive or -1 (off), got {value}")


def _fraction(name: str, value: float) -> None:
    _require(0.0 <= value <= 1.0, f"{name} must be between 0 and 1, got {value}")


def validate(config) -> None:
    m, t, o, s = config.model, config.training, config.optimizer, config.lr_scheduler
    _require(m.depth >= 1, f"model.depth must be a positive integer, got {m.depth}")
    _positive("model.aspect_ratio", m.aspect_ratio)
    _require(m.head_dim >= 2 and m.head_dim % 2 == 0,
             f"model.head_dim must be a positive even number (rotary pairs channels), got {m.head_dim}")
    _require(m.max_seq_len >= 2, f"model.max_seq_len must be at least 2, got {m.max_seq_len}")
    pattern = m.window_pattern.upper()
    _require(bool(pattern) and set(pattern) <= {"S", "L"},
             f"model.window_pattern may contain only the letters S (short window) and L (full context), "
             f"got {m.window_pattern!r}")
    _positive("model.softcap", m.softcap)

    _positive("training.device_batch_size", t.device_batch_size)
    _positive_or_off("training.total_batch_size", t.total_batch_size)
    _positive_or_off("training.num_iterations", t.num_iterations)
    _positive_or_off("training.target_flops", t.target_flops)
    _positive_or_off("training.target_param_data_ratio", t.target_param_data_ratio)
    _positive("training.gc_every", t.gc_every)

    for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "weight_decay"):
        _require(getattr(o, name) >= 0, f"optimizer.{name} must be >= 0, got {getattr(o, name)}")
    for name in ("adam_beta1", "adam_beta2", "muon_beta2"):
        value = getattr(o, name)
        _require(0.0 <= value < 1.0, f"optimizer.{name} must be in [0, 1), got {value}")
    for name in ("unembedding_beta2", "embedding_beta2"):
        value = getattr(o, name)
        _require(value == -1 or 0.0 <= value < 1.0, f"optimizer.{name} must be in [0, 1) or -1, got {value}")
    _positive("optimizer.muon_ns_steps", o.muon_ns_steps)

    for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac", "momentum_start", "momentum_peak",
                 "momentum_final"):
        _fraction(f"lr_scheduler.{name}", getattr(s, name))
    _require(s.warmup_steps >= -1, f"lr_scheduler.warmup_steps must be >= 0 or -1 (use warmup_ratio), "
                                   f"got {s.warmup_steps}")
    _require(s.momentum_warmup_steps >= 0, "lr_scheduler.momentum_warmup_steps must be >= 0")

    d = config.data
    _require(d.vocab_size >= 512, f"data.vocab_size must be at least 512, got {d.vocab_size}")
    _require(d.dataset != "local" or bool(d.local_path) or bool(d.data_dir),
             "data.dataset = 'local' needs data.local_path (a folder of .txt/.jsonl/.parquet files) or "
             "data.data_dir (a folder of ready parquet shards, the last by name = validation)")
    _positive("data.buffer_docs", d.buffer_docs)
    _positive("data.loader_threads", d.loader_threads)
    _positive("data.tokenizer_max_chars", d.tokenizer_max_chars)
    _positive("data.tokenizer_doc_cap", d.tokenizer_doc_cap)

    e = config.eval
    for name in ("eval_every", "core_metric_every", "sample_every"):
        _positive_or_off(f"eval.{name}", getattr(e, name))
    _positive("eval.eval_tokens", e.eval_tokens)
    _positive_or_off("eval.core_metric_max_per_task", e.core_metric_max_per_task)

    c = config.checkpoint
    _positive_or_off("checkpoint.save_every", c.save_every)
    _positive_or_off("checkpoint.save_every_minutes", c.save_every_minutes)
    resume = c.resume_from_step.strip().lower()
    _require(resume in ("latest", "auto") or (resume.lstrip("-").isdigit() and int(resume) >= -1),
             f"checkpoint.resume_from_step must be a step number, 'latest', 'auto' or -1, got {c.resume_from_step!r}")
    _require(c.keep_latest_k >= 0, f"checkpoint.keep_latest_k must be >= 0 (0 keeps all), got {c.keep_latest_k}")
    _require("/" not in c.model_tag and c.model_tag not in (".", ".."),
             f"checkpoint.model_tag must be a plain folder name, got {c.model_tag!r}")

    _positive("metrics.log_every", config.metrics.log_every)
    _require(config.metrics.peak_flops >= 0,
             f"metrics.peak_flops must be >= 0 (0: measured/datasheet), got {config.metrics.peak_flops}")
    p = config.parallelism
    _positive_or_off("parallelism.dp_shard", p.dp_shard)
    _positive("parallelism.dp_replicate", p.dp_replicate)
    _positive_or_off("parallelism.world_size", p.world_size)
    _positive("activation_checkpoint.selective_every", config.activation_checkpoint.selective_every)
