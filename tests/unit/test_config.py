import io
import re
import subprocess
import sys
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the backport (a dependency there, see pyproject.toml)
    import tomli as tomllib

from scripts.base_train import SEED_FLAGS, translate_seed_args
from titanlite import train
from titanlite.cli import run_cli
from titanlite.config import build_config, config_to_toml, load_config

REPO = Path(__file__).resolve().parents[2]

# The seed's option table: flag -> (config key, seed default). Written out by hand from
# the seed (the user's description of the feature, its option table) so that a changed default fails here.
SEED_DEFAULTS = {
    "--run": ("metrics.run", "dummy"),
    "--device-type": ("training.device_type", ""),
    "--fp8": ("float8.enabled", False),
    "--fp8-recipe": ("float8.recipe", "tensorwise"),
    "--depth": ("model.depth", 20),
    "--aspect-ratio": ("model.aspect_ratio", 64),
    "--head-dim": ("model.head_dim", 128),
    "--max-seq-len": ("model.max_seq_len", 2048),
    "--window-pattern": ("model.window_pattern", "SSSL"),
    "--num-iterations": ("training.num_iterations", -1),
    "--target-flops": ("training.target_flops", -1.0),
    "--target-param-data-ratio": ("training.target_param_data_ratio", 10.5),
    "--device-batch-size": ("training.device_batch_size", 32),
    "--total-batch-size": ("training.total_batch_size", -1),
    "--embedding-lr": ("optimizer.embedding_lr", 0.3),
    "--unembedding-lr": ("optimizer.unembedding_lr", 0.004),
    "--matrix-lr": ("optimizer.matrix_lr", 0.02),
    "--scalar-lr": ("optimizer.scalar_lr", 0.5),
    "--weight-decay": ("optimizer.weight_decay", 0.2),
    "--adam-beta1": ("optimizer.adam_beta1", 0.8),
    "--adam-beta2": ("optimizer.adam_beta2", 0.95),
    "--warmup-ratio": ("lr_scheduler.warmup_ratio", 0.0),
    "--warmdown-ratio": ("lr_scheduler.warmdown_ratio", 0.5),
    "--final-lr-frac": ("lr_scheduler.final_lr_frac", 0.0),
    "--resume-from-step": ("checkpoint.resume_from_step", "-1"),
    "--eval-every": ("eval.eval_every", 250),
    "--eval-tokens": ("eval.eval_tokens", 40 * 2**20),
    "--core-metric-every": ("eval.core_metric_every", 2000),
    "--core-metric-max-per-task": ("eval.core_metric_max_per_task", 500),
    "--sample-every": ("eval.sample_every", 2000),
    "--save-every": ("checkpoint.save_every", -1),
    "--model-tag": ("checkpoint.model_tag", ""),
}

# A value for each seed flag that differs from its default, and what the config must then hold.
SEED_VALUES = {
    "--run": ("mine", "mine"), "--device-type": ("cpu", "cpu"), "--fp8": ("true", True),
    "--fp8-recipe": ("rowwise", "rowwise"), "--depth": ("12", 12), "--aspect-ratio": ("32", 32),
    "--head-dim": ("64", 64), "--max-seq-len": ("512", 512), "--window-pattern": ("L", "L"),
    "--num-iterations": ("100", 100), "--target-flops": ("1e18", 1e18),
    "--target-param-data-ratio": ("8", 8.0), "--device-batch-size": ("16", 16),
    "--total-batch-size": ("524288", 524288), "--embedding-lr": ("0.2", 0.2),
    "--unembedding-lr": ("0.008", 0.008), "--matrix-lr": ("0.03", 0.03), "--scalar-lr": ("0.4", 0.4),
    "--weight-decay": ("0.28", 0.28), "--adam-beta1": ("0.9", 0.9), "--adam-beta2": ("0.99", 0.99),
    "--warmup-ratio": ("0.1", 0.1), "--warmdown-ratio": ("0.65", 0.65), "--final-lr-frac": ("0.05", 0.05),
    "--resume-from-step": ("1000", "1000"), "--eval-every": ("100", 100), "--eval-tokens": ("524288", 524288),
    "--core-metric-every": ("-1", -1), "--core-metric-max-per-task": ("16", 16),
    "--sample-every": ("-1", -1), "--save-every": ("500", 500), "--model-tag": ("exp1", "exp1"),
}


def _get(config, dotted):
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def _run_main(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = run_cli(main, argv)
    return code, out.getvalue(), err.getvalue()


def test_every_seed_option_exists_with_its_seed_default():
    assert set(SEED_DEFAULTS) == set(SEED_FLAGS)
    config = load_config([])
    for flag, (key, default) in SEED_DEFAULTS.items():
        assert SEED_FLAGS[flag] == key
        assert _get(config, key) == default, flag


@pytest.mark.parametrize("flag", sorted(SEED_VALUES))
@pytest.mark.parametrize("style", ["equals", "space"])
def test_base_train_maps_each_seed_flag(flag, style):
    raw, expected = SEED_VALUES[flag]
    argv = [f"{flag}={raw}"] if style == "equals" else [flag, raw]
    config = load_config(translate_seed_args(argv))
    assert _get(config, SEED_FLAGS[flag]) == expected


def test_bare_fp8_flag_turns_float8_on():
    config = load_config(translate_seed_args(["--fp8", "--depth=4"]))
    assert config.float8.enabled is True and config.model.depth == 4


def test_precedence_defaults_toml_cli(tmp_path):
    toml = tmp_path / "job.toml"
    toml.write_text("[model]\ndepth = 8\nhead_dim = 64\n[training]\nnum_iterations = 7\n"
                    "[float8]\nexclude_fqns = ['a', 'b']\n")
    config = load_config(["--job.config_file", str(toml), "--model.depth=6", "--float8.exclude_fqns", "x,y"])
    assert config.model.depth == 6                 # CLI beats TOML
    assert config.model.head_dim == 64             # TOML beats default
    assert config.training.num_iterations == 7
    assert config.model.aspect_ratio == 64         # default
    assert config.float8.exclude_fqns == ["x", "y"]  # comma string == TOML list
    assert load_config(["--float8.exclude_fqns=['p', 'q']"]).float8.exclude_fqns == ["p", "q"]
    assert load_config(["--job.dry_run=false"]).job.dry_run is False
    assert load_config(["--job.dry_run"]).job.dry_run is True


def test_written_config_loads_back_identical(tmp_path):
    config = load_config(["--job.config_file", "debug_cpu.toml", "--model.depth=3",
                          "--float8.exclude_fqns=a,b", "--checkpoint.resume_from_step=latest",
                          "--job.description=quote \" and ünïcode"])
    text = config_to_toml(config)
    assert build_config(tomllib.loads(text), []) == config
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert load_config(["--job.config_file", str(path)]).model == config.model


def test_bare_config_name_resolves_to_shipped_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(["--job.config_file", "gpt2_d26.toml"]).model.depth == 26
    (tmp_path / "gpt2_d26.toml").write_text("[model]\ndepth = 3\n")
    assert load_config(["--job.config_file", "gpt2_d26.toml"]).model.depth == 3  # the local file wins


def test_shipped_configs_are_valid():
    for path in sorted((REPO / "train_configs").glob("*.toml")):
        load_config(["--job.config_file", str(path)])
    names = {p.name for p in (REPO / "train_configs").glob("*.toml")}
    assert {"debug_cpu.toml", "d12.toml", "d20.toml", "gpt2_d26.toml", "speedrun_d24.toml"} <= names


@pytest.mark.parametrize("argv, message", [
    (["--modle.depth=3"], "unknown config section 'modle' (from the command line). Did you mean 'model'?"),
    (["--model.dept=3"], "unknown config key 'model.dept' (from the command line). Did you mean 'model.depth'?"),
    (["--model.device_batch_size=3"], "Did you mean 'training.device_batch_size'?"),
    (["--model.depth=abc"], "model.depth expects an integer, got 'abc' (from the command line)"),
    (["--float8.enabled=maybe"], "float8.enabled expects a boolean (true/false), got 'maybe'"),
    (["--model.depth=-3"], "model.depth must be a positive integer, got -3"),
    (["--model.window_pattern=SSXL"], "model.window_pattern may contain only the letters S"),
    (["--training.dtype=fp16"], "training.dtype must be one of 'auto', 'bfloat16', 'float32', got 'fp16'"),
    (["--checkpoint.resume_from_step=soon"], "checkpoint.resume_from_step must be a step number, 'latest'"),
    (["--job.config_file=nope.toml"], "config file 'nope.toml' not found"),
])
def test_config_errors_are_one_line_with_exit_code_2(argv, message):
    code, _, err = _run_main(train.main, argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in err


def test_toml_errors_name_the_file(tmp_path):
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text("[training]\ndevice_batch = 4\n")
    code, _, err = _run_main(train.main, ["--job.config_file", str(bad_key)])
    assert code == 2 and f"unknown config key 'training.device_batch' (in {bad_key})" in err
    assert "Did you mean 'training.device_batch_size'?" in err
    bad_type = tmp_path / "type.toml"
    bad_type.write_text("[model]\ndepth = \"twelve\"\n")
    code, _, err = _run_main(train.main, ["--job.config_file", str(bad_type)])
    assert code == 2 and "model.depth expects an integer, got 'twelve'" in err
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    code, _, err = _run_main(train.main, ["--job.config_file", str(broken)])
    assert code == 2 and "is not valid TOML" in err


# The help's layout: "  --section.key=default" on one line, its description on the next, indented 6.
HELP_ENTRY = re.compile(r"^  (--[a-z_0-9]+\.[a-z_0-9]+)=(.*)\n      (.+)$", re.MULTILINE)


def _help_entries(text):
    return {flag: (default, doc) for flag, default, doc in HELP_ENTRY.findall(text)}


def _as_help_value(value):
    """A default as a TOML value, written out by hand: how --help shows it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def test_help_lists_every_key_with_default_and_doc():
    code, out, _ = _run_main(train.main, ["--help"])
    assert code == 0
    assert out.startswith("usage: python -m titanlite.train [--job.config_file FILE] [--section.key=value ...]")
    for section in ("[job]", "[model]", "[training]", "[optimizer]", "[lr_scheduler]", "[data]", "[eval]",
                    "[checkpoint]", "[metrics]", "[float8]"):
        assert f"\n{section}\n" in out, section
    entries = _help_entries(out)
    # Options, defaults and descriptions written out by hand (the seed's documented options, docs/recipe.md §12,
    # and the recipe's choices): a dropped, renamed or mis-rendered option fails here.
    expected = {
        "--model.depth": ("20", ["transformer layers", "scaling dial", "[seed: --depth]"]),
        "--model.aspect_ratio": ("64", ["[seed: --aspect-ratio]"]),
        "--model.head_dim": ("128", ["head dim", "[seed: --head-dim]"]),
        "--model.max_seq_len": ("2048", ["[seed: --max-seq-len]"]),
        "--model.window_pattern": ('"SSSL"', ["[seed: --window-pattern]"]),
        "--training.device_batch_size": ("32", ["per device", "[seed: --device-batch-size]"]),
        "--training.total_batch_size": ("-1", ["auto", "[seed: --total-batch-size]"]),
        "--training.target_param_data_ratio": ("10.5", ["[seed: --target-param-data-ratio]"]),
        "--training.target_flops": ("-1.0", ["[seed: --target-flops]"]),
        "--training.dtype": ('"auto"', ["(one of: auto, bfloat16, float32)"]),
        "--training.device_type": ('""', ["(one of: '', auto, cuda, cpu, mps)", "[seed: --device-type]"]),
        "--optimizer.unembedding_lr": ("0.004", ["lm_head", "[seed: --unembedding-lr]"]),
        "--optimizer.weight_decay": ("0.2", ["Muon", "[seed: --weight-decay]"]),
        "--lr_scheduler.warmdown_ratio": ("0.5", ["warmdown", "[seed: --warmdown-ratio]"]),
        "--eval.eval_tokens": ("41943040", ["[seed: --eval-tokens]"]),
        "--checkpoint.resume_from_step": ('"-1"', ["'latest'", "[seed: --resume-from-step]"]),
        "--float8.enabled": ("false", ["float8", "[seed: --fp8]"]),
        "--float8.recipe": ('"tensorwise"', ["(one of: tensorwise, rowwise)", "[seed: --fp8-recipe]"]),
        "--metrics.run": ('"dummy"', ["[seed: --run]"]),
    }
    for flag, (default, phrases) in expected.items():
        assert flag in entries, f"{flag} missing from --help"
        shown, doc = entries[flag]
        assert shown == default, (flag, shown)
        for phrase in phrases:
            assert phrase in doc, (flag, phrase, doc)
    # every seed flag of the hand-written table above: its option, its default as --help renders it, its tag
    for flag, (key, default) in SEED_DEFAULTS.items():
        shown, doc = entries[f"--{key}"]
        assert shown == _as_help_value(default), (flag, shown)
        assert doc.endswith(f"[seed: {flag}]"), (flag, doc)
    # every option line has the layout above, with a description under it
    option_lines = [line for line in out.splitlines() if line.startswith("  --")]
    assert len(option_lines) == len(entries) and all(doc.strip() for _, doc in entries.values())


def test_base_train_help_lists_seed_flags():
    from scripts import base_train
    code, out, _ = _run_main(base_train.main, ["--help"])
    assert code == 0
    for flag, key in SEED_FLAGS.items():
        assert flag in out and key in out


def test_base_train_rejects_unknown_flag():
    from scripts import base_train
    code, _, err = _run_main(base_train.main, ["--depht=3"])
    assert code == 2 and "unknown option '--depht=3'" in err


def test_wheel_ships_train_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("titanlite-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for config in ("debug_cpu.toml", "d12.toml", "d20.toml", "gpt2_d26.toml", "speedrun_d24.toml"):
        assert f"titanlite/train_configs/{config}" in names
