"""A tune's outputs for people: report.md's text and the tune.png figure.

Both are rendered from the recipe.json record alone (`cnnjax.tune.recipe` writes them after every
round), so they can be redrawn from a finished or running tune directory without the recipe.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from cnnjax.train.logging import METRICS_FILE
from cnnjax.tune.diagnose import LR_FIELD, exponential_smoothing
from cnnjax.tune.metrics_file import read_checked_metrics
from cnnjax.utils.files import save_figure

REPORT_FILE = "report.md"
PLOT_FILE = "tune.png"
_OWNER = "tune"  # tune.png is drawn by the tuning command (cnnjax.tune.recipe)


def format_summary(record: dict) -> str:
    """A few lines for the terminal: status, best trial, its overrides."""
    lines = [f"Tune {record['status']} after {record['num_rounds']} round(s), "
             f"{record['num_trials']} trials: {record['reason']}"]
    best = record.get("best")
    if best:
        lines.append(f"Best {record['metric']} {best['value']:.4f} (round {best['round']}, "
                     f"trial {best['trial_id']}, step {best['step']}): "
                     + " ".join(f"--config.{k}={_cli(v)}" for k, v in best["overrides"].items()))
    return "\n".join(lines)


def has_plot(record: dict) -> bool:
    """Whether tune.png is drawn for `record`: once some trial has completed (before, it has no
    curve to show)."""
    return any(t["status"] == "completed" for r in record["rounds"] for t in r["trials"])


def format_report(record: dict) -> str:
    """report.md: the outcome, then every round's trials, diagnosis and decision."""
    metric = record["metric"]
    out = ["# Tuning report", "",
           f"**Status:** {record['status']} — {record['reason']}", "",
           f"{record['num_rounds']} round(s), {record['num_trials']} trials, "
           f"{record['trial_wall_time_s']:.0f} s of training; ranked by best eval {metric} "
           f"({record['mode']}).", ""]
    best = record.get("best")
    if best:
        out += ["## Best trial", "",
                f"Eval {metric} {best['value']:.4f} at step {best['step']} (round "
                f"{best['round']}, trial `{best['trial_id']}`, `{best['workdir']}`). "
                "Config overrides on top of the tune's base config (`tune.json`, with any "
                "`--config.*` given to the tune); the trial's whole resolved config is its "
                "workdir's `config.json`:", "", "```",
                " ".join(f"--config.{k}={_cli(v)}" for k, v in best["overrides"].items()),
                "```", ""]
        if record.get("diagnosis"):
            out += ["Diagnosis:", "", *_diagnosis_lines(record["diagnosis"]), ""]
    if has_plot(record):  # else no tune.png is drawn: the link would be broken
        out += [f"![learning curves and {metric} against the learning rate]({PLOT_FILE})", ""]
    for r in record["rounds"]:
        out += [f"## Round {r['index']}: {r['action']}", "", r["reason"], "",
                "Fixed: " + ", ".join(f"`{k}={_cli(v)}`" for k, v in r["fixed"].items()), "",
                f"| {r['field']} | status | best {metric} | at step | final | steps | wall s |",
                "|---|---|---|---|---|---|---|"]
        for t in r["trials"]:
            out.append(f"| {_cli(t['value'])} | {t['status']} | {_num(t['best'])} | "
                       f"{t['best_step'] if t['best_step'] is not None else '-'} | "
                       f"{_num(t['final'])} | {t['steps']} | {_num(t['wall_time_s'], 1)} |")
        out.append("")
        if r["best"]:
            value = _cli(r["best"]["overrides"].get(r["field"]))
            out += [f"Best of the round: {r['field']}={value} ({metric} "
                    f"{r['best']['value']:.4f}).", "",
                    *_diagnosis_lines(r["best"]["diagnosis"] or {"findings": []}), ""]
        if r["decision"]:
            d = r["decision"]
            out += [f"**Decision:** {d['action']} — {d['reason']}", ""]
    running = record.get("running_round")  # absent from records before it was kept
    if running:
        out += [f"## Round {running['index']}: {running['action']} (stopped before it finished)",
                "", running["reason"], "",
                f"Its sweep `{running['dir']}/` keeps the trials that finished; rerunning the "
                "command continues it.", ""]
    return "\n".join(out)


def _diagnosis_lines(diagnosis: dict) -> list[str]:
    """A diagnosis (`Diagnosis.to_dict`) as list items: each finding with its recommendations,
    then the notes naming checks the run's logs kept from running (a record from before notes
    has none)."""
    lines = []
    for f in diagnosis["findings"]:
        lines.append(f"- **{f['verdict']}**: {f['message']}")
        lines.extend(f"  - recommend `{r['field']}` "
                     + (f"x{r['value']:g}" if r["change"] == "multiply" else f"= {r['value']!r}")
                     + f" ({r['reason']})" for r in f["recommendations"])
    lines.extend(f"- note: {note}" for note in diagnosis.get("notes", ()))
    return lines


def plot_tune(record: dict, path: str, ema_weight: float = 0.6) -> str:
    """Writes `tune_figure(record)` to `path` (PNG, atomically) and returns `path`."""
    return save_figure(tune_figure(record, ema_weight), path)


def tune_figure(record: dict, ema_weight: float = 0.6) -> Any:
    """Three panels: best eval metric against the learning rate (all rounds; diverged trials as
    red crosses at the worst score: the bottom, or the top for a metric to minimize), then the
    eval-metric curves and the EMA-smoothed train-loss curves of every trial, coloured by round,
    the best trial in black. Uses the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = record["metric"]
    fig, (ax_lr, ax_eval, ax_loss) = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.85, max(1, len(record["rounds"]))))
    best = record.get("best") or {}
    done = [t for r in record["rounds"] for t in r["trials"] if t["status"] == "completed"]
    scores = [t["best"] for t in done if t["best"] is not None]
    # Diverged trials sit at the worst end of the axis: the lowest score, or the highest loss.
    worst = (max if record.get("mode") == "min" else min)(scores, default=0.0)
    for r, color in zip(record["rounds"], colors, strict=True):
        label = f"round {r['index']} ({r['action']})"
        for t in r["trials"]:
            lr = {**r["fixed"], r["field"]: t["value"]}.get(LR_FIELD)
            is_best = t["workdir"] == best.get("workdir")
            if lr is not None and t["status"] == "completed" and t["best"] is not None:
                ax_lr.scatter([lr], [t["best"]], color=color, zorder=3, label=label, s=25)
                label = None
                if is_best:  # a black ring around the best trial
                    ax_lr.scatter([lr], [t["best"]], facecolors="none", edgecolors="black",
                                  s=120, zorder=4, label="best")
            elif lr is not None and t["status"] == "diverged":
                ax_lr.scatter([lr], [worst], color="tab:red", marker="x", zorder=3)
            records = read_checked_metrics(os.path.join(t["workdir"], METRICS_FILE), _OWNER)
            evals = [x for x in records if x.get("split") == "eval" and metric in x]
            train = [x for x in records if x.get("split") == "train" and "loss" in x]
            style = {"color": "black" if is_best else color, "lw": 2.0 if is_best else 0.8,
                     "alpha": 1.0 if is_best else 0.7}
            if evals:
                ax_eval.plot([x["step"] for x in evals], [x[metric] for x in evals], **style)
            finite = [x for x in train if math.isfinite(x["loss"])]
            if finite:
                smooth = exponential_smoothing(np.array([x["loss"] for x in finite]), ema_weight)
                ax_loss.plot([x["step"] for x in finite], smooth, **style)
    ax_lr.set(xscale="log", xlabel=LR_FIELD, ylabel=f"best eval {metric}",
              title="metric vs learning rate (x: diverged)")
    ax_eval.set(xlabel="step", ylabel=f"eval {metric}", title="eval curves (black: best)")
    ax_loss.set(xlabel="step", ylabel="train loss (EMA)", yscale="log",
                title="train loss curves")
    for ax in (ax_lr, ax_eval, ax_loss):
        ax.grid(True, alpha=0.3)
    if ax_lr.get_legend_handles_labels()[0]:
        ax_lr.legend(fontsize=7)
    fig.suptitle(f"tuning: {record['num_trials']} trials in {record['num_rounds']} round(s), "
                 f"{record['status']}")
    fig.tight_layout()
    return fig


def _cli(value: Any) -> str:
    return repr(tuple(value)) if isinstance(value, list) else str(value)


def _num(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
