"""`megatron-sapo compare`: runs side by side, grouped by what differs between them except the seed.

Input: a sweep folder (its sweep.json names the cells and their groups) or training output_dirs (grouped by their
config.yaml with the seed keys, output_dir and tracking left out). Per group, over its seeds: the mean and the spread
(min-max band; +- the sample standard deviation in the table) of the reward and eval pass@1 curves, and the stability
indicators of analysis/stability.py. Written to the report folder: report.md (the table), summary.json (every number
per run and per group), curves.png (reward, pass@1), stability.png (grad norm, largest ratio, entropy estimate,
response length), and logged to MLflow as a run of the sweep's experiment (its store; for plain run folders only when
a tracking URI is given) with the same files as artifacts and the group numbers as metrics.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..atomic import write_atomic
from ..config import flatten
from ..loop.recorder import METRICS_FILE, read_history
from ..sweeps.spec import DEFAULT_SEED_KEYS, MANIFEST
from .stability import StabilityConfig, smooth, stability

REPORT = "report.md"
SUMMARY = "summary.json"
CURVES = "curves.png"
STABILITY = "stability.png"
NOT_GROUPING = ("output_dir", "tracking.", *DEFAULT_SEED_KEYS)


@dataclass
class Run:
    name: str
    group: str
    seed: int | None
    path: Path
    history: dict[str, list[tuple[int, float]]]

    @property
    def last_step(self) -> int:
        return max((s for curve in self.history.values() for s, _ in curve[-1:]), default=0)

    @property
    def seconds(self) -> float:
        """Training seconds: the steps' and evaluations' own times (start-ups and resumes not counted)."""
        return sum(v for key in ("time/step_s", "time/eval_s") for _, v in self.history.get(key, []))


def find_runs(paths: list[str | Path]) -> tuple[list[Run], dict]:
    """The runs of the given sweep folders and run folders, and the first sweep's manifest ({} without one)."""
    runs, manifest, plain = [], {}, []
    for path in map(Path, paths):
        if (path / MANIFEST).is_file():
            sweep = json.loads((path / MANIFEST).read_text())
            manifest = manifest or sweep
            for cell in sweep["cells"]:
                out = path / cell["output_dir"]
                if (out / METRICS_FILE).is_file():
                    runs.append(Run(cell["name"], cell["group"], cell["seed"], out, read_history(out)))
        elif (path / METRICS_FILE).is_file():
            plain.append(path)
        else:
            raise ValueError(f"{path} is neither a sweep folder ({MANIFEST}) nor a training run's output_dir "
                             f"({METRICS_FILE})")
    runs += _group_plain_runs(plain)
    if not runs:
        raise ValueError(f"no run in {', '.join(map(str, paths))} has logged a step yet")
    names = [r.name for r in runs]
    for run in runs:  # run folders named alike (two sweeps' cells, or .../a/seed1 and .../b/seed1): by their path
        if names.count(run.name) > 1:
            run.name = str(run.path)
    return runs, manifest


def _group_plain_runs(paths: list[Path]) -> list[Run]:
    """Group run folders by their configs without the seed, output and tracking keys; a group is named by the keys
    in which the groups differ."""
    if not paths:
        return []
    configs = []
    for path in paths:
        config = path / "config.yaml"
        flat = flatten(yaml.safe_load(config.read_text())) if config.is_file() else {}
        configs.append(flat)
    keys = sorted({k for c in configs for k in c if not k.startswith(NOT_GROUPING)})
    differing = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    runs = []
    for path, flat in zip(paths, configs):
        group = ",".join(f"{k}={flat.get(k)}" for k in differing) or "all"
        seed = flat.get("policy.seed")
        runs.append(Run(path.name, group, seed if isinstance(seed, int) else None, path, read_history(path)))
    return runs


def _stats(values: list[float]) -> dict[str, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def _final(curve, k: int = 1) -> float | None:
    return statistics.fmean(v for _, v in curve[-k:]) if curve else None


def summarize_runs(runs: list[Run], cfg: StabilityConfig) -> dict:
    """Per run and per group: pass@1 (final, best), final reward, stability indicators, seconds."""
    per_run, groups = {}, {}
    for run in runs:
        passes = run.history.get("eval/pass_at_1", [])
        per_run[run.name] = {
            "group": run.group, "seed": run.seed, "path": str(run.path), "last_step": run.last_step,
            "seconds": run.seconds, "final_pass_at_1": _final(passes),
            "best_pass_at_1": max((v for _, v in passes), default=None),
            "final_reward": _final(run.history.get("reward/mean", []), cfg.window),
            **stability(run.history, cfg)}
        groups.setdefault(run.group, []).append(run.name)
    summary = {}
    for group, names in groups.items():
        rows = [per_run[n] for n in names]
        collapsed = [r for r in rows if r["collapsed"]]
        summary[group] = {
            "runs": names, "seeds": len(names), "last_step": _stats([r["last_step"] for r in rows]),
            **{key: _stats([r[key] for r in rows]) for key in
               ("final_pass_at_1", "best_pass_at_1", "final_reward", "seconds", "grad_norm_spikes",
                "ratio_blowups", "mismatch_blowups", "entropy_first", "entropy_last")},
            "ratio_max": max((r["ratio_max"] for r in rows if r["ratio_max"] is not None), default=None),
            "collapses": len(collapsed), "collapse_steps": sorted(r["collapse_step"] for r in collapsed)}
    return {"thresholds": vars(cfg), "groups": summary, "runs": per_run}


def _pm(stat: dict, digits: int = 3) -> str:
    if not stat["n"]:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" if stat["n"] > 1 else f"{stat['mean']:.{digits}f}"


def report_table(summary: dict) -> str:
    """The markdown table: one row per group (means over its seeds, +- their standard deviation)."""
    cfg = summary["thresholds"]
    head = ("| group | seeds | steps | final pass@1 | best pass@1 | final reward | collapses | steps to collapse "
            f"| grad-norm spikes | steps with ratio > {cfg['ratio_limit']:g} (max ratio) "
            f"| steps with mismatch > {cfg['mismatch_limit']:g} | entropy first -> last | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for group, g in summary["groups"].items():
        entropy = (f"{g['entropy_first']['mean']:.2f} -> {g['entropy_last']['mean']:.2f}"
                   if g["entropy_first"]["n"] else "-")
        ratio = _pm(g["ratio_blowups"], 1) + (f" ({g['ratio_max']:.3g})" if g["ratio_max"] is not None else "")
        low, high = g["last_step"]["min"], g["last_step"]["max"]
        steps = f"{low:.0f}" if low == high else f"{low:.0f}-{high:.0f}"  # some runs not at their end yet
        lines.append(
            f"| {group} | {g['seeds']} | {steps} | {_pm(g['final_pass_at_1'])} | "
            f"{_pm(g['best_pass_at_1'])} | {_pm(g['final_reward'])} | {g['collapses']}/{g['seeds']} | "
            f"{', '.join(map(str, g['collapse_steps'])) or '-'} | {_pm(g['grad_norm_spikes'], 1)} | {ratio} | "
            f"{_pm(g['mismatch_blowups'], 1)} | {entropy} | {g['seconds']['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def _band(runs: list[Run], key: str, window: int):
    """Steps logged by every run of the group, and the mean, min and max over runs (each smoothed first)."""
    curves = [dict(smooth(r.history[key], window)) for r in runs if r.history.get(key)]
    if not curves:
        return None
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    values = [[c[s] for c in curves] for s in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def _draw(runs: list[Run], panels: list[tuple[str, str, int, bool]], path: Path, title: str) -> Path:
    from ..plots import figure_class

    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    figure = figure_class()(figsize=(6.5 * ncols, 4.0 * nrows), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (key, label, window, log_y) in zip(axes, panels):
        for i, (group, members) in enumerate(groups.items()):
            band = _band(members, key, window)
            if band is None:
                continue
            steps, mean, low, high = band
            ax.plot(steps, mean, color=f"C{i % 10}", linewidth=1.4, label=f"{group} (n={len(members)})")
            if len(members) > 1:
                ax.fill_between(steps, low, high, color=f"C{i % 10}", alpha=0.15, linewidth=0)
        ax.set_title(label + (f" (trailing mean of {window})" if window > 1 else ""), fontsize="medium")
        ax.set_xlabel("step")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.suptitle(title + ": mean over seeds, band min-max")
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    return write_atomic(path, image.getvalue())


def compare(paths: list[str | Path], out_dir: str | Path | None = None, *, cfg: StabilityConfig = StabilityConfig(),
            tracking_uri: str | None = None, mlflow: bool = True, say=print) -> dict:
    """Write the report of the runs in `paths` to `out_dir` (default: <sweep>/report for one sweep folder) and log
    it to MLflow; returns the summary."""
    runs, manifest = find_runs(paths)
    first = Path(paths[0])
    if out_dir is None:
        if not manifest:
            raise ValueError("give the report folder (--out) when comparing run folders")
        out_dir = first / "report"
    out_dir = Path(out_dir)
    title = manifest.get("name") or ", ".join(sorted({r.group for r in runs}))
    summary = summarize_runs(runs, cfg)
    table = report_table(summary)
    files = [write_atomic(out_dir / REPORT, f"# {title}\n\n{table}"),
             write_atomic(out_dir / SUMMARY, json.dumps(summary, indent=1, default=str) + "\n")]
    try:
        files.append(_draw(runs, [("reward/mean", "reward/mean", cfg.window, False),
                                  ("eval/pass_at_1", "eval pass@1", 1, False)], out_dir / CURVES, title))
        files.append(_draw(runs, [("train/grad_norm", "grad norm", cfg.window, True),
                                  ("ratio/max", "largest token ratio", cfg.window, True),
                                  ("entropy/sampled_nll", "entropy estimate (sampled-token NLL)", cfg.window, False),
                                  ("response/length_mean", "response length", cfg.window, False)],
                           out_dir / STABILITY, title))
    except ImportError as err:  # matplotlib is optional
        say(f"no figures: {err}")
    say(table)
    say(f"report: {out_dir / REPORT}")
    uri = tracking_uri or (_cells_tracking_uri(runs) or os.environ.get("MLFLOW_TRACKING_URI") if manifest else None)
    if mlflow and uri:
        _log_to_mlflow(summary, files, out_dir, uri, manifest.get("name") or "megatron_sapo_compare", say)
    return summary


def _cells_tracking_uri(runs: list[Run]) -> str | None:
    """The tracking store the sweep's cells used (their saved config; None: $MLFLOW_TRACKING_URI or none)."""
    config = runs[0].path / "config.yaml"
    if not config.is_file():
        return None
    return (yaml.safe_load(config.read_text()).get("tracking") or {}).get("tracking_uri")


def _log_to_mlflow(summary: dict, files: list[Path], out_dir: Path, uri: str, experiment: str, say) -> None:
    from ..tracking import Tracker, TrackingConfig, find_run_id

    tracker = Tracker(TrackingConfig(tracking_uri=uri, experiment=experiment, run_name=f"{experiment}/compare",
                                     tags={"kind": "compare"}), out_dir, run_id=find_run_id(out_dir))
    tracker.log_params({f"stability.{k}": v for k, v in summary["thresholds"].items()})
    metrics = {}
    for group, g in summary["groups"].items():
        for key in ("final_pass_at_1", "best_pass_at_1", "final_reward"):
            metrics[f"{group}/{key}_mean"] = g[key]["mean"]
            metrics[f"{group}/{key}_std"] = g[key]["std"]
        metrics[f"{group}/collapses"] = g["collapses"]
        metrics[f"{group}/seeds"] = g["seeds"]
    tracker.log_metrics(metrics, 0)
    for path in files:
        tracker.log_artifact(path, "compare")
    tracker.close("FINISHED")
    say(f"logged to MLflow at {uri}, experiment {experiment}, run {tracker.run_id}")
