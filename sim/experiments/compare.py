"""Compare finished runs: a summary table and plots, no notebook needed.

    python -m sim compare outputs/sweeps/search                 # a sweep: one row per trial
    python -m sim compare outputs/ablations/2025-01-01_12-00-00 # an ablation: mean ± std per cell
    python -m sim compare outputs/2025-01-01/10-00-00 outputs/2025-01-01/11-30-00 out=cmp
    python -m sim compare outputs/sweeps/search by=model.K      # group by chosen config keys

A Hydra main (conf/compare.yaml); the bare directories on the command line are its `dirs`. Each DIR is
a run directory (it holds metrics/val_metrics.jsonl) or is searched for runs below it. Runs are
grouped by the config keys in which they differ (or by `by=key1,key2`), seeds averaged. Writes
runs.csv, summary.csv, summary.md, curves.png (val metrics per epoch, one line per run) and, when the
groups are two numeric keys (e.g. model.F and model.K), heatmap.png. The default `out` is
`DIR/compare` for one DIR, else `outputs/compare/<date>_<time>`. A DIR that is a
`hydra/sweeper=sim_grid` multirun (it holds jobs.jsonl) also lists its skipped cells and failed jobs,
and its table is a grid.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from sim.core.cli import CONF_DIR, bare_args_as_list, comma_lists, fail_cleanly
from sim.core.config import select_required
from sim.core.errors import ConfigError, DataError
from sim.evaluation import report
from sim.experiments.grid_sweeper import read_record

Failed = list[tuple[tuple[Any, ...], str]]  # (group, error) per failed job, as report.write_report takes them


def grid_outcomes(dirs: Sequence[str | Path], keys: Sequence[str]) -> tuple[Failed, list[report.Skipped], set[str]]:
    """(failed jobs, skipped cells, run directories of failed jobs) recorded by sim_grid sweeps in `dirs`."""
    failed: Failed = []
    skipped: dict[tuple[Any, ...], report.Skipped] = {}
    failed_dirs: set[str] = set()
    for d in dirs:
        for job in read_record(d):
            params = job.get("params") or {}
            group = tuple(params.get(k) for k in keys)
            if job["state"] == "SKIPPED":
                skipped.setdefault(group, report.Skipped(group, f"skipped: {job['reason']}"))
            elif job["state"] == "FAIL":
                seed = params.get(report.SEED_KEY)
                failed.append((group, (f"seed {seed}: " if seed is not None else "") + str(job.get("error"))))
                if job.get("run_dir"):
                    failed_dirs.add(str(Path(job["run_dir"]).resolve()))
    return failed, list(skipped.values()), failed_dirs


def write_comparison(
    dirs: Sequence[str | Path],
    out: str | Path,
    keys: Sequence[str] | None = None,
    *,
    title: str | None = None,
    heatmap: tuple[str, str] | None = None,
) -> dict[str, Path]:
    """Find the runs in `dirs`, group them by `keys` (default: the keys a grid swept, else those in which
    the runs differ) and write the report into `out` (see sim.evaluation.report.write_report).

    Raises:
        DataError: a DIR holds no run (and records no grid cell), or a metrics file is malformed.
    """
    is_grid = any(read_record(d) for d in dirs)
    try:
        paths = report.find_runs(dirs)
    except FileNotFoundError as exc:
        if not is_grid:
            raise DataError(str(exc)) from None
        paths = []  # a grid whose every job failed or was skipped still gets its table
    runs = [report.load_run(p) for p in paths]
    # A grid's swept values as it recorded them: a swept config group (`+variant=a,b`) is no config key.
    swept_by_dir = {
        str(Path(job["run_dir"]).resolve()): job.get("params") or {}
        for d in dirs
        for job in read_record(d)
        if job.get("run_dir")
    }
    for run in runs:
        for key, value in swept_by_dir.get(str(run.path.resolve()), {}).items():
            run.config.setdefault(key, value)
    if keys is None:
        # A grid's groups are its swept keys, whichever cells finished; seeds are averaged within a group.
        swept = dict.fromkeys(k for d in dirs for job in read_record(d) for k in job.get("params") or {})
        keys = [k for k in swept if k != report.SEED_KEY] or report.varying_keys(runs)
    failed, skipped, failed_dirs = grid_outcomes(dirs, keys)
    # A job that failed mid-training may have left metric lines: it is reported as failed, not as a run.
    runs = [r for r in runs if str(r.path.resolve()) not in failed_dirs]
    return report.write_report(
        out,
        runs,
        keys,
        title=title or f"Comparison of {len(runs)} runs",
        failed=failed,
        skipped=skipped,
        heatmap=heatmap,
        sort=is_grid,
    )


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _group_keys(dirs: list[str], by: Any) -> list[str] | None:
    """`by` as a list of config keys the runs have (None: let the runs decide).

    Raises:
        ConfigError: a key no run's config_resolved.yaml holds.
    """
    if by is None:
        return None
    keys = [str(k).strip() for k in (by if isinstance(by, list) else str(by).split(",")) if str(k).strip()]
    try:
        runs = [report.load_run(p) for p in report.find_runs(dirs)]
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from None
    known = set().union(*(r.config for r in runs))
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ConfigError(
            f"by={','.join(keys)}: {', '.join(unknown)} is not a key of the runs' config_resolved.yaml "
            f"(e.g. {', '.join(report.varying_keys(runs)[:6]) or 'model.K'})"
        )
    return keys


def compare(cfg: DictConfig) -> dict[str, Path]:
    """Write the report conf/compare.yaml describes; returns the paths written.

    Raises:
        ConfigError: no dirs, or a `by` key the runs do not have.
        DataError: a DIR without runs, or a malformed metrics file.
    """
    raw = _plain(select_required(cfg, "dirs"))
    dirs = [str(d) for d in (raw if isinstance(raw, list) else [raw])]
    if not dirs:
        raise ConfigError("no directory to compare: python -m sim compare DIR [DIR ...]")
    keys = _group_keys(dirs, _plain(cfg.by))
    if cfg.out:
        out = Path(cfg.out)
    elif len(dirs) == 1 and not (Path(dirs[0]) / "metrics" / "val_metrics.jsonl").is_file():
        out = Path(dirs[0]) / "compare"
    else:
        out = Path("outputs/compare") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return write_comparison(dirs, out, keys, title=cfg.title)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="compare")
def main(cfg: DictConfig) -> None:
    with fail_cleanly():
        paths = compare(cfg)
    print(paths["summary_md"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def cli() -> None:
    """`python -m sim compare DIR [DIR ...] [by=a,b]`: the bare directories become `dirs`."""
    sys.argv[1:] = comma_lists(bare_args_as_list(sys.argv[1:], "dirs"), ["by"])
    main()


if __name__ == "__main__":
    cli()
