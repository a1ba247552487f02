"""The loss curve of a run: train and eval loss from `metrics.jsonl`, drawn to `loss.png` in the run directory.

`qlora train` draws it when training ends and `qlora eval` redraws it; matplotlib's Agg backend needs no display.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .run_dir import RunDir, read_jsonl


def loss_points(run: RunDir) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) points (step, loss) logged in the run's metrics.jsonl."""
    train, evals = [], []
    for record in read_jsonl(run.metrics):
        step = int(record.get("step", 0))
        if isinstance(record.get("eval_loss"), (int, float)):
            evals.append((step, float(record["eval_loss"])))
        elif isinstance(record.get("loss"), (int, float)):
            train.append((step, float(record["loss"])))
    return train, evals


def save_loss_plot(run: RunDir) -> Path | None:
    """Draw train and eval loss against the optimizer step to `run.loss_plot`; None when nothing was logged."""
    train, evals = loss_points(run)
    if not train and not evals:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # a bare Figure on the Agg canvas: no pyplot state, no display

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.5)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", color="tab:orange", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title(f"Loss: {run.path.name}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    target = run.loss_plot
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".png", dir=target.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target
