"""The training-curve figure: a valid PNG from a synthetic history with every plotted metric, panels left out for
absent metrics, and clear errors for a history with nothing to plot or an install without matplotlib."""

import math
import struct
import sys

import pytest

from megatron_sapo.plots import PANELS, plot_history

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_history(steps: int = 40) -> dict[str, list[tuple[int, float]]]:
    curves = {
        "reward/mean": lambda s: 0.2 + 0.6 * (1 - math.exp(-s / 15)),
        "reward/std": lambda s: 0.3 * math.exp(-s / 30),
        "gate/weight_mean": lambda s: 0.9 - 0.002 * s,
        "gate/weight_min": lambda s: 0.4 + 0.1 * math.sin(s),
        "gate/weight_below_half_frac": lambda s: 0.02,
        "clip/frac": lambda s: 0.01,
        "response/length_mean": lambda s: 4 + s / 20,
        "response/length_max": lambda s: 8.0,
        "train/loss": lambda s: -0.1 * math.exp(-s / 10),
        "train/grad_norm": lambda s: 1 / (1 + s),
        "time/step_s": lambda s: 0.1,
        "kl/k3": lambda s: 0.001 * s,  # not plotted
    }
    history = {key: [(s, f(s)) for s in range(steps)] for key, f in curves.items()}
    history["eval/pass_at_1"] = [(s, 0.1 + s / 100) for s in range(0, steps, 10)]
    history["train/loss"][5] = (5, float("nan"))  # a NaN step leaves a gap, not an error
    return history


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_all_panels(tmp_path):
    (path,) = plot_history(synthetic_history(), tmp_path / "plots")
    assert path == tmp_path / "plots" / "training_curves.png"
    width, height = png_size(path)
    assert width > height > 0  # two columns, three rows of panels
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["training_curves.png"]  # no temporary file left


def test_missing_metrics_leave_their_panels_out(tmp_path):
    only_reward = {k: v for k, v in synthetic_history().items() if k.startswith("reward/")}
    (path,) = plot_history(only_reward, tmp_path)
    full_width, full_height = png_size(plot_history(synthetic_history(), tmp_path / "full")[0])
    width, height = png_size(path)
    assert width < full_width and height < full_height  # one panel instead of a 2 x 3 grid
    (path,) = plot_history({"train/grad_norm": [(0, 1.0), (1, 0.5)]}, tmp_path / "right_axis_only")
    assert png_size(path)[0] > 0


def test_nothing_to_plot_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_history({}, tmp_path)
    with pytest.raises(ValueError, match="empty"):
        plot_history({"reward/mean": []}, tmp_path)
    with pytest.raises(ValueError, match=r"none of the plotted metrics .* has \['kl/k3'\]"):
        plot_history({"kl/k3": [(0, 0.1)]}, tmp_path)
    assert not list(tmp_path.iterdir())


def test_panels_use_the_trainer_metric_names():
    trainer_metrics = {
        "reward/mean", "reward/std", "eval/pass_at_1", "eval/reward_mean", "response/length_mean",
        "response/length_max", "response/truncated_frac", "gate/weight_mean", "gate/weight_min",
        "gate/weight_below_half_frac", "ratio/mean", "ratio/max", "clip/frac", "kl/k3", "train/loss",
        "train/grad_norm", "train/lr", "train/skipped_updates", "time/rollout_s", "time/train_s", "time/sync_s",
        "time/step_s", "throughput/tokens_per_s",
    }
    assert {key for _, left, right in PANELS for key in left + right} <= trainer_metrics


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what an install without the extra looks like
    with pytest.raises(ImportError, match=r"pip install megatron-sapo\[plot\]"):
        plot_history({"reward/mean": [(0, 1.0)]}, tmp_path)
