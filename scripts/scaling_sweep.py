"""Scaling laws as a command: an isoFLOP sweep over depths and FLOPs budgets, then the fit and the dial's verdict.

    python -m scripts.scaling_sweep --job.config_file train_configs/sweep_cpu.toml --depths 2,3,4,5 \\
        --flops 3e11,1e12,3e12
    python -m scripts.scaling_sweep --job.config_file d12.toml --depths 4,6,8,10 --flops 1e15,3e15,1e16 \\
        --launch torchrun --nproc-per-node 8
    python -m scripts.scaling_sweep ... --launch print      # one command per run, for a scheduler's array
    python -m scripts.scaling_sweep --out outputs/sweep_sweep_cpu --collect

One run per (budget, depth) through the normal trainer, with training.target_flops = the budget and
num_iterations / target_param_data_ratio off, each in its own run folder <sweep>/C<budget>-d<depth>. Run again
to resume: finished runs are skipped, an interrupted run resumes from its latest checkpoint, a failed run
(recorded with its one-line error) is retried only with --retry-failed. Then, from whatever run folders exist:
per budget a parabola of final val_bpb in log(params) gives N_opt and D_opt; across budgets N_opt ∝ C^a and
D_opt ∝ C^b; and for each budget the depth that the config's target_param_data_ratio would train, with how far
the fit puts it from the optimum. Tables on the terminal, <sweep>/sweep.json, <sweep>/sweep.png.
Every option that is not a sweep flag is a config override (--section.key=value) for every run.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from titanlite.config import config_from_toml_text, config_to_toml, load_config
from titanlite.errors import UserError
from titanlite.sweep.collect import collect
from titanlite.sweep.launch import (LocalRunner, check_launcher, check_user_overrides, format_command,
                                    held_by_another, record_failure, run_overrides, train_command,
                                    wait_for_lock)
from titanlite.sweep.runs import FAILED, FINISHED, parse_budgets, parse_depths, read_run, run_name
from titanlite.sweep.settings import SETTINGS_FILE, check_same_settings

INTERRUPTED_EXIT_CODE = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 130}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.scaling_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--depths", help="comma-separated depths, e.g. 4,6,8,10")
    parser.add_argument("--flops", help="comma-separated FLOPs budgets, e.g. 1e15,3e15,1e16")
    parser.add_argument("--launch", default="local", help="local (one run after another, default), torchrun, "
                                                          "or print (the command of every run still to do)")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes per run for torchrun/print")
    parser.add_argument("--out", type=Path, help="sweep folder (default <job.dump_folder>/sweep_<config name>)")
    parser.add_argument("--collect", action="store_true", help="only collect, fit and plot the run folders there")
    parser.add_argument("--retry-failed", action="store_true", help="run the runs that failed before again")
    parser.add_argument("--near-bpb", type=float, default=0.01,
                        help="the dial counts as near the optimum when its fitted val_bpb is within this")
    return parser


def _config_argv(passthrough: list[str]) -> tuple[list[str], object]:
    """The trainer arguments every run gets (the config file by its resolved path) and the config they give."""
    config = load_config(passthrough)
    argv, skip = [], False
    for i, token in enumerate(passthrough):
        if skip:
            skip = False
            continue
        key = token[2:].partition("=")[0].replace("-", "_") if token.startswith("--") else ""
        if key == "job.config_file":
            skip = "=" not in token
            continue
        argv.append(token)
    if config.job.config_file:
        argv = [f"--job.config_file={Path(config.job.config_file).resolve()}", *argv]
    return argv, config


def _sweep_dir(args, config) -> Path:
    if args.out is not None:
        return args.out.resolve()
    stem = Path(config.job.config_file).stem if config.job.config_file else "default"
    return (Path(config.job.dump_folder) / f"sweep_{stem}").resolve()


def run_all(args, argv: list[str], sweep_dir: Path, depths: list[int], budgets: list[float]) -> int:
    planned = [read_run(sweep_dir / run_name(b, d), b, d) for b in budgets for d in depths]
    failed_before = {r.name for r in planned if r.status == FAILED and not args.retry_failed}
    todo = [r for r in planned if r.status != FINISHED and r.name not in failed_before]
    if args.launch == "print":
        for r in todo:
            print(format_command(train_command("print", args.nproc_per_node,
                                               argv + run_overrides(sweep_dir, r, r.checkpoint_step is not None),
                                               python="python")))
        return 0
    print(f"sweep {sweep_dir}: {len(planned)} runs, {len(planned) - len(todo) - len(failed_before)} finished, "
          f"{len(failed_before)} failed before (kept; --retry-failed runs them again), {len(todo)} to run")
    with LocalRunner() as runner:
        for i, planned_run in enumerate(todo, 1):
            if runner.stop_signal is not None:  # asked to stop between runs: start nothing more
                print(f"stopped by signal {runner.stop_signal} before {planned_run.name}; run the same command "
                      f"again to go on", flush=True)
                return INTERRUPTED_EXIT_CODE.get(runner.stop_signal, 128 + signal.SIGTERM)
            folder = sweep_dir / planned_run.name
            tag = f"[{i}/{len(todo)}] {planned_run.name}"
            held = wait_for_lock(folder, print)
            if held:
                print(f"{tag}: skipped, {held}")
                continue
            r = read_run(folder, planned_run.budget, planned_run.depth)  # an earlier sweep's run may have ended
            if r.status == FINISHED:
                print(f"{tag}: finished meanwhile")
                continue
            resume = r.checkpoint_step is not None
            command = train_command(args.launch, args.nproc_per_node, argv + run_overrides(sweep_dir, r, resume))
            print(f"{tag}: {f'resuming from step {r.checkpoint_step}' if resume else 'starting'} "
                  f"(log: {folder}/train.log)", flush=True)
            outcome = runner.run(command, folder)
            if outcome.interrupted:
                print(f"{tag}: stopped after {outcome.seconds:.0f} s ({outcome.error}); run the same command "
                      f"again to resume", flush=True)
                return INTERRUPTED_EXIT_CODE.get(runner.stop_signal, 128 + signal.SIGTERM)
            if outcome.exit_code:
                busy = held_by_another(folder, outcome.pid)
                if busy:  # another sweep took this run between our lock check and our trainer's start
                    print(f"{tag}: skipped, {busy}", flush=True)
                    continue
                record_failure(folder, outcome, command)
                print(f"{tag}: FAILED after {outcome.seconds:.0f} s: {outcome.error}", flush=True)
                continue
            done = read_run(folder, r.budget, r.depth)
            print(f"{tag}: {done.status} in {outcome.seconds:.0f} s: val_bpb {done.val_bpb:.4f}, {done.steps} steps, "
                  f"{done.tokens:,} tokens" if done.status == FINISHED else f"{tag}: ended without a summary",
                  flush=True)
    return 0


def main(argv: list[str]) -> int:
    args, passthrough = build_parser().parse_known_args(argv)
    check_user_overrides(passthrough)
    check_launcher(args.launch, args.nproc_per_node)
    if args.collect and not passthrough:
        if args.out is None:
            raise UserError("--collect needs the sweep folder (--out DIR) or the sweep's --job.config_file")
        sweep_dir = args.out.resolve()
        stored = sweep_dir / SETTINGS_FILE
        if not stored.is_file():
            raise UserError(f"{sweep_dir} has no {SETTINGS_FILE}: it is not a sweep folder (or was not started "
                            f"by this command); pass the sweep's --job.config_file too")
        config = config_from_toml_text(stored.read_text())
        collect(sweep_dir, config, config.job.config_file, print, args.near_bpb)
        return 0
    trainer_argv, config = _config_argv(passthrough)
    sweep_dir = _sweep_dir(args, config)
    if args.collect:
        collect(sweep_dir, config, config.job.config_file, print, args.near_bpb)
        return 0
    if not args.depths or not args.flops:
        raise UserError("a sweep needs --depths and --flops (e.g. --depths 4,6,8,10 --flops 1e15,3e15,1e16), "
                        "or --collect to read the run folders that exist")
    depths, budgets = parse_depths(args.depths), parse_budgets(args.flops)
    if config.eval.eval_every <= 0:
        raise UserError("eval.eval_every <= 0: the sweep needs each run's final val_bpb; set eval.eval_every > 0 "
                        "(a value above the runs' step counts evaluates only at step 0 and at the end)")
    check_same_settings(sweep_dir, config_to_toml(config))
    code = run_all(args, trainer_argv, sweep_dir, depths, budgets)
    if code == 0 and args.launch != "print":
        collect(sweep_dir, config, config.job.config_file, print, args.near_bpb)
    return code


if __name__ == "__main__":
    from titanlite.cli import run_cli

    sys.exit(run_cli(main))
