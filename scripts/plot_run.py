"""Draw a run's loss and val_bpb curves to PNG from its TensorBoard events.

    python -m scripts.plot_run outputs/d4            # writes outputs/d4/curves.png
    python -m scripts.plot_run outputs/d4 --out a.png --x tokens
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from titanlite.errors import UserError


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tb_dir.is_dir() or not any(tb_dir.glob("events.out.tfevents.*")):
        raise UserError(f"no TensorBoard events in {tb_dir}; pass a run folder written with metrics.tensorboard=true")
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def plot_run(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = read_scalars(run_dir / "tb")
    panels = [("train/loss", "train loss (EMA)"), ("val/bpb", "validation bits per byte")]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 4))
    for ax, (tag, title) in zip(axes, panels):
        points = scalars.get(tag, [])
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None)
        else:
            ax.text(0.5, 0.5, f"no '{tag}' events", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="run folder (contains tb/)")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: <run_dir>/curves.png)")
    args = parser.parse_args(argv)
    out = plot_run(args.run_dir, args.out or args.run_dir / "curves.png")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from titanlite.cli import run_cli

    sys.exit(run_cli(main))
