"""Tables and plots that compare runs: shared by `python -m sim ablate` and `python -m sim compare`.

A run is any directory holding the contract's `metrics/val_metrics.jsonl`; its config comes from
`config_resolved.yaml` beside it. Each run is scored at its best epoch, chosen the way the trainer
chose best.pt (checkpoint.monitor, .mode, .tie_breaker and .min_metrics of that run). Runs that
differ only in `training.seed` form one group (an ablation cell, or one sweep trial), reported as the
mean and spread over its runs.

Outputs of `write_report(out, ...)`:
    runs.csv      one row per run: group keys, seed, best epoch, key metrics at the best epoch
    summary.csv   one row per group: runs, and mean / std / min / max of each key metric
    summary.md    the same as a markdown table (mean ± std over seeds)
    curves.png    val metrics per epoch, one line per run, one colour per group
    heatmap.png   mean of each key metric over two numeric group keys (e.g. model.F x model.K)
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from sim.core.labels import KEY_METRICS
from sim.core.run import read_jsonl
from sim.evaluation.selection import BestEpochRule

CURVE_METRICS: tuple[str, ...] = ("loss", *KEY_METRICS)
SEED_KEY = "training.seed"
# Keys that differ between runs without being an experimental choice.
IGNORED_PREFIXES = ("_run.", "training.resume", "training.progress_bar")


@dataclass
class Run:
    """One run directory, read back: flattened config, per-epoch metrics, best epoch."""

    path: Path
    config: dict[str, Any]
    val: list[dict[str, Any]]
    train: list[dict[str, Any]]
    best_epoch: int | None = None
    best: dict[str, Any] | None = None
    group: tuple[Any, ...] = field(default_factory=tuple)

    @property
    def seed(self) -> Any:
        return self.config.get(SEED_KEY)


@dataclass
class Skipped:
    """A grid cell that was not run (e.g. K > F), shown in the table with the reason."""

    group: tuple[Any, ...]
    reason: str


def _natural(path: Path) -> list[Any]:
    """Sort key that puts run 2 before run 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories in `paths`: each path is a run itself or is searched for runs below it.

    Raises:
        FileNotFoundError: a path does not exist or holds no run.
    """
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such directory")
        if (p / "metrics" / "val_metrics.jsonl").is_file():
            found[p] = None
            continue
        below = sorted((f.parent.parent for f in p.rglob("metrics/val_metrics.jsonl")), key=_natural)
        if not below:
            raise FileNotFoundError(f"{p}: no run below it (a run directory holds metrics/val_metrics.jsonl)")
        found.update(dict.fromkeys(below))
    return list(found)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become tuples so values can be compared and grouped."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list):
        return {prefix[:-1]: tuple(json.dumps(x) if isinstance(x, (dict, list)) else x for x in tree)}
    return {prefix[:-1]: tree}


def best_epoch(val: list[dict[str, Any]], config: dict[str, Any]) -> tuple[int | None, dict[str, Any] | None]:
    """The epoch best.pt holds: the first with the highest rank under the run's checkpoint settings."""
    if not val:
        return None, None
    floors = {
        k.removeprefix("checkpoint.min_metrics."): v
        for k, v in config.items()
        if k.startswith("checkpoint.min_metrics.")
    }
    rule = BestEpochRule(
        config.get("checkpoint.monitor", "risk_high_recall"),
        config.get("checkpoint.mode", "auto"),
        config.get("checkpoint.tie_breaker", "macro_f1"),
        floors,
    )
    best = max(val, key=rule.key)  # max() keeps the first of equals, as the trainer does
    return int(best.get("epoch", val.index(best) + 1)), best


def load_run(path: str | Path) -> Run:
    """Read a run directory back (config_resolved.yaml may be missing: the config is then empty)."""
    path = Path(path)
    cfg_file = path / "config_resolved.yaml"
    config = flatten(OmegaConf.to_container(OmegaConf.load(cfg_file))) if cfg_file.is_file() else {}
    val = read_jsonl(path / "metrics" / "val_metrics.jsonl", strict=True)
    train = read_jsonl(path / "metrics" / "train_metrics.jsonl", strict=True)
    epoch, best = best_epoch(val, config)
    return Run(path=path, config=config, val=val, train=train, best_epoch=epoch, best=best)


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values differ between runs, except the seed and bookkeeping keys.

    Keys that only some runs have (options added to the code between runs) are not a choice made for
    the experiment and are left out. Keys that always vary together (model.F and
    data.dataset_kwargs.F, which follows it) are one choice: only the shortest name is kept, a model.*
    key first.
    """
    if len(runs) < 2:
        return []
    keys = sorted(set.intersection(*(set(r.config) for r in runs)))
    varying = [
        k
        for k in keys
        if k != SEED_KEY and not k.startswith(IGNORED_PREFIXES) and len({repr(r.config.get(k)) for r in runs}) > 1
    ]
    kept: dict[tuple[str, ...], str] = {}
    for k in sorted(varying, key=lambda k: (not k.startswith("model."), len(k), k)):
        kept.setdefault(tuple(repr(r.config.get(k)) for r in runs), k)
    return sorted(kept.values(), key=varying.index)


def assign_groups(runs: Sequence[Run], keys: Sequence[str]) -> None:
    for r in runs:
        r.group = tuple(r.config.get(k) for k in keys)


# What a run cost, from its train metrics (mean over its epochs): speed, and how much of the model trained.
COST_METRICS: tuple[str, ...] = ("samples_per_s", "trainable_params")
COST_HEADERS = {"samples_per_s": "train samples/s", "trainable_params": "trainable params"}


def _metric(run: Run, name: str) -> float | None:
    if name in COST_METRICS:
        values = [float(r[name]) for r in run.train if r.get(name) is not None]
        return statistics.fmean(values) if values else None
    v = (run.best or {}).get(name)
    return None if v is None else float(v)


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def summarize(
    runs: Sequence[Run],
    keys: Sequence[str],
    metrics: Sequence[str] = KEY_METRICS,
    failed: Sequence[tuple[tuple[Any, ...], str]] = (),
    skipped: Sequence[Skipped] = (),
    sort: bool = False,
) -> list[dict[str, Any]]:
    """One row per group: in first-seen order, or sorted by the group's values (`sort`).

    Args:
        runs: finished runs with `group` set (see assign_groups).
        keys: names of the group's values.
        failed: (group, error) of runs that did not finish, counted per group.
        skipped: cells that were not run, listed with their reason.
        sort: order rows by group values (numbers numerically), as a grid reads.

    Returns:
        Rows {key: value, ..., "runs", "failed", "note", "<metric>_mean|_std|_min|_max|_n"}.
    """
    groups: dict[tuple[Any, ...], list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    n_failed: dict[tuple[Any, ...], int] = {}
    for g, _ in failed:
        n_failed[g] = n_failed.get(g, 0) + 1
        groups.setdefault(g, [])
    notes = {s.group: s.reason for s in skipped}
    for s in skipped:
        groups.setdefault(s.group, [])
    order = sorted(groups, key=lambda g: [_natural_value(v) for v in g]) if sort else list(groups)
    rows = []
    for g in order:
        members = groups[g]
        row: dict[str, Any] = dict(zip(keys, g, strict=True))
        row.update(runs=len(members), failed=n_failed.get(g, 0), note=notes.get(g, ""))
        for m in (*metrics, *COST_METRICS):
            values = [v for r in members if (v := _metric(r, m)) is not None]
            row.update({f"{m}_{s}": v for s, v in _stats(values).items()})
            row[f"{m}_n"] = len(values)
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, tuple):
        return "[" + ", ".join(map(_fmt, v)) + "]"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str] = KEY_METRICS) -> str:
    """Markdown: group keys, number of runs, then mean ± std of each metric (n/a where undefined)."""
    costs = [m for m in COST_METRICS if any(row.get(f"{m}_mean") is not None for row in rows)]
    head = [*keys, "runs", *metrics, *(COST_HEADERS[c] for c in costs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        cells = [_fmt(row.get(k)) for k in keys]
        if row.get("note") and not row["runs"]:
            cells += [row["note"]] + ["-"] * (len(metrics) + len(costs))
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells.append(str(row["runs"]) + (f" ({row['failed']} failed)" if row.get("failed") else ""))
        for m in metrics:
            mean, std, n = row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_n"]
            if mean is None:
                cells.append("n/a")
            else:
                cell = f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")
                if n < row["runs"]:
                    cell += f" (n={n})"  # some runs left the metric undefined
                cells.append(cell)
        for c in costs:
            mean = row.get(f"{c}_mean")
            cells.append("n/a" if mean is None else f"{mean:,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_value(v: Any) -> Any:
    return "" if v is None else (_fmt(v) if isinstance(v, tuple) else v)


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for row in rows:
            w.writerow([_csv_value(row.get(c)) for c in columns])


def run_rows(
    runs: Sequence[Run], keys: Sequence[str], metrics: Sequence[str] = ("loss", *KEY_METRICS, *COST_METRICS)
) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "run_dir": str(r.path),
            **dict(zip(keys, r.group, strict=True)),
            SEED_KEY: r.seed,
            "epochs": len(r.val),
            "best_epoch": r.best_epoch,
        }
        row.update({m: _metric(r, m) for m in metrics})
        rows.append(row)
    return rows


def _figure(width: float, height: float) -> Figure:
    # The object API on an Agg canvas: no window, no change to the importing program's backend.
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def group_label(keys: Sequence[str], group: tuple[Any, ...]) -> str:
    return " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in zip(keys, group, strict=True)) or "all runs"


def plot_curves(runs: Sequence[Run], keys: Sequence[str], path: Path, metrics: Sequence[str] = CURVE_METRICS) -> Path:
    """Val metrics per epoch: one panel per metric, one line per run, one colour per group."""
    fig = _figure(5.0 * len(metrics), 4.2)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    groups = list(dict.fromkeys(r.group for r in runs))
    cmap = colormaps["tab10" if len(groups) <= 10 else "viridis"]
    for ax, m in zip(axes, metrics, strict=True):
        labelled: set[tuple[Any, ...]] = set()
        for r in runs:
            gi = groups.index(r.group)
            color = cmap(gi % 10) if len(groups) <= 10 else cmap(gi / max(1, len(groups) - 1))
            xs = [int(e.get("epoch", i + 1)) for i, e in enumerate(r.val)]
            ys = [math.nan if e.get(m) is None else float(e[m]) for e in r.val]
            ax.plot(
                xs,
                ys,
                marker="o",
                markersize=3,
                color=color,
                alpha=0.85,
                label=None if r.group in labelled else group_label(keys, r.group),
            )
            labelled.add(r.group)
        ax.set_title(f"val {m}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if len(groups) <= 24:
        axes[-1].legend(fontsize=7, loc="best")
    fig.savefig(path)
    return path


def plot_heatmap(
    rows: Sequence[dict[str, Any]], row_key: str, col_key: str, path: Path, metrics: Sequence[str] = KEY_METRICS
) -> Path:
    """Mean of each metric on a row_key x col_key grid, annotated with mean ± std; empty cells grey."""
    import numpy as np

    rvals = sorted({r[row_key] for r in rows}, key=_natural_value)
    cvals = sorted({r[col_key] for r in rows}, key=_natural_value)
    fig = _figure(1.2 + 1.1 * len(cvals) * len(metrics) + 1.2 * len(metrics), 1.2 + 0.75 * len(rvals) + 0.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    by_cell = {(r[row_key], r[col_key]): r for r in rows}
    for ax, m in zip(axes, metrics, strict=True):
        grid = np.full((len(rvals), len(cvals)), np.nan)
        for i, rv in enumerate(rvals):
            for j, cv in enumerate(cvals):
                row = by_cell.get((rv, cv))
                if row is not None and row[f"{m}_mean"] is not None:
                    grid[i, j] = row[f"{m}_mean"]
        ax.set_facecolor("0.85")  # cells without a value (skipped, failed, undefined) show grey
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        for i, rv in enumerate(rvals):
            for j, cv in enumerate(cvals):
                row = by_cell.get((rv, cv))
                if row is None or np.isnan(grid[i, j]):
                    text = "skipped" if row is not None and row.get("note") else "n/a"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8, color="0.3")
                    continue
                std = row[f"{m}_std"]
                text = f"{grid[i, j]:.3f}" + (f"\n±{std:.3f}" if std is not None else "")
                ax.text(
                    j, i, text, ha="center", va="center", fontsize=8, color="white" if grid[i, j] < 0.6 else "black"
                )
        ax.set_xticks(range(len(cvals)), [_fmt(v) for v in cvals])
        ax.set_yticks(range(len(rvals)), [_fmt(v) for v in rvals])
        ax.set_xlabel(col_key)
        ax.set_ylabel(row_key)
        ax.set_title(m)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(path)
    return path


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _natural_value(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v))


def heatmap_axes(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> tuple[str, str] | None:
    """The two grouping keys a heatmap can use: exactly two keys, both numeric in every row."""
    if len(keys) != 2:
        return None
    numeric = all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows for k in keys)
    return (keys[0], keys[1]) if numeric else None


def write_report(
    out: str | Path,
    runs: Sequence[Run],
    keys: Sequence[str],
    *,
    title: str,
    failed: Sequence[tuple[tuple[Any, ...], str]] = (),
    skipped: Sequence[Skipped] = (),
    heatmap: tuple[str, str] | None = None,
    sort: bool = False,
) -> dict[str, Path]:
    """Write runs.csv, summary.csv, summary.md, curves.png and (with two numeric keys) heatmap.png.

    Args:
        out: output directory (created).
        runs: finished runs; their `group` is set here from `keys`.
        keys: config keys that define a group (seeds of one group are averaged).
        title: first line of summary.md.
        failed / skipped: see summarize().
        heatmap: (row key, column key) of the heatmap; default: `keys` when they are two numeric keys.
        sort: order the table by group values (a grid) instead of by first run.

    Returns:
        {"runs_csv", "summary_csv", "summary_md", "curves", "heatmap"?: path}.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    assign_groups(runs, keys)
    rows = summarize(runs, keys, failed=failed, skipped=skipped, sort=sort)
    paths = write_tables(out, runs, rows, keys)
    paths["summary_md"] = out / "summary.md"
    paths["summary_md"].write_text(summary_markdown(title, runs, rows, keys, failed, skipped), encoding="utf-8")
    if runs:
        paths["curves"] = plot_curves(runs, keys, out / "curves.png")
    axes = heatmap or heatmap_axes(rows, keys)
    if axes is not None and runs:
        paths["heatmap"] = plot_heatmap(rows, axes[0], axes[1], out / "heatmap.png")
    return paths


def write_tables(
    out: Path, runs: Sequence[Run], rows: Sequence[dict[str, Any]], keys: Sequence[str]
) -> dict[str, Path]:
    """runs.csv (one row per run) and summary.csv (one row per group, `rows` of summarize)."""
    paths = {"runs_csv": out / "runs.csv", "summary_csv": out / "summary.csv"}
    write_csv(
        paths["runs_csv"],
        run_rows(runs, keys),
        ["run_dir", *keys, SEED_KEY, "epochs", "best_epoch", "loss", *KEY_METRICS, *COST_METRICS],
    )
    stats = [f"{m}_{s}" for m in (*KEY_METRICS, *COST_METRICS) for s in ("mean", "std", "min", "max", "n")]
    write_csv(paths["summary_csv"], rows, [*keys, "runs", "failed", "note", *stats])
    return paths


def summary_markdown(
    title: str,
    runs: Sequence[Run],
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    failed: Sequence[tuple[tuple[Any, ...], str]] = (),
    skipped: Sequence[Skipped] = (),
) -> str:
    """summary.md: what was compared and how, the table, then the failed runs and skipped cells."""
    monitors = sorted({str(r.config.get("checkpoint.monitor", "risk_high_recall")) for r in runs})
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    text = [
        f"# {title}",
        "",
        f"{_count(len(runs), 'finished run')} in {_count(len(rows), 'group')}"
        + (f", {_count(len(failed), 'failed run')}" if failed else "")
        + (f", {_count(len(skipped), 'cell')} skipped" if skipped else "")
        + f". Val metrics at each run's best epoch (checkpoint.monitor: {', '.join(monitors) or 'n/a'}); "
        + f"mean ± std over the runs of each group ({SEED_KEY}: {', '.join(map(str, seeds)) or 'n/a'}).",
        "",
        markdown_table(rows, keys),
    ]
    if failed:
        text += ["## Failed runs", "", *(f"- {group_label(keys, g)}: {err}" for g, err in failed), ""]
    if skipped:
        text += ["## Skipped cells", "", *(f"- {group_label(keys, s.group)}: {s.reason}" for s in skipped), ""]
    return "\n".join(text)
