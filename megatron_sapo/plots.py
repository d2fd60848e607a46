"""Training curves as a PNG, from a run's metric history (`loop.recorder.read_history`, read from its metrics.jsonl):
what a person looks at first to see whether a SAPO run learns (reward, eval pass@1), whether its soft gate is
cutting updates off (gate weights, clip fraction), how long the responses get, and whether optimisation is sane.

matplotlib is an optional extra (`pip install megatron-sapo[plot]`): a training job does not need it. It is imported
only when a figure is drawn, and figures are built without pyplot (a plain Figure renders through the Agg canvas), so
nothing here depends on a display or changes matplotlib's global backend.
"""

from __future__ import annotations

import io
from pathlib import Path

from .atomic import write_atomic

History = dict[str, list[tuple[int, float]]]

# (title, metrics on the left axis, metrics on a right axis); a panel whose metrics are all absent is left out.
# reward/mean is drawn with a band of +-reward/std.
PANELS = (
    ("reward", ("reward/mean",), ()),
    ("eval pass@1", ("eval/pass_at_1",), ()),
    ("soft gate", ("gate/weight_mean", "gate/weight_min", "gate/weight_below_half_frac", "clip/frac"), ()),
    ("response length (tokens)", ("response/length_mean", "response/length_max"), ()),
    ("loss and grad norm", ("train/loss",), ("train/grad_norm",)),
    ("seconds per step", ("time/rollout_s", "time/train_s", "time/sync_s", "time/step_s"), ()),
)
OVERVIEW = "training_curves.png"


def figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install megatron-sapo[plot]") from error
    return Figure


def plot_history(history: History, out_dir: str | Path) -> list[Path]:
    """Draws the overview figure `training_curves.png` in `out_dir` (written to a temporary file, then renamed, so
    a reader never sees half a PNG) and returns the paths written."""
    present = {key: points for key, points in history.items() if points}
    if not present:
        raise ValueError("the metric history is empty: nothing to plot")
    panels = [p for p in PANELS if any(key in present for key in p[1] + p[2])]
    if not panels:
        known = sorted(key for _, left, right in PANELS for key in left + right)
        raise ValueError(f"none of the plotted metrics {known} is in the history, which has {sorted(present)}")

    ncols = 1 if len(panels) == 1 else 2
    nrows = -(-len(panels) // ncols)
    figure = figure_class()(figsize=(6.5 * ncols, 3.4 * nrows), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (title, left, right) in zip(axes, panels):
        _draw_panel(ax, title, left, right, present)
    for ax in axes[len(panels):]:
        ax.remove()

    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=110)
    return [write_atomic(Path(out_dir) / OVERVIEW, image.getvalue())]


def _draw_panel(ax, title: str, left: tuple[str, ...], right: tuple[str, ...], history: History) -> None:
    lines = []
    for key in left:
        if key in history:
            steps, values = zip(*history[key])
            lines += ax.plot(steps, values, label=key, linewidth=1.2)
            if key == "reward/mean" and "reward/std" in history:
                std = dict(history["reward/std"])
                band = [(s, v, std[s]) for s, v in history[key] if s in std]
                if band:
                    s, v, d = zip(*band)
                    ax.fill_between(s, [a - b for a, b in zip(v, d)], [a + b for a, b in zip(v, d)],
                                    color=lines[-1].get_color(), alpha=0.2, linewidth=0, label="± reward/std")
    if any(key in history for key in right):
        twin = ax.twinx()
        for key in right:
            if key in history:
                steps, values = zip(*history[key])
                lines += twin.plot(steps, values, label=key, linewidth=1.2, linestyle="--", color=f"C{len(lines)}")
        twin.set_ylabel(", ".join(key for key in right if key in history))
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(handles=lines + list(ax.collections), fontsize="small", loc="best")  # both axes' lines, the band
