"""Compare finished runs: a summary table and plots, no notebook needed.

    python -m sim compare outputs/sweeps/search                 # a sweep: one row per trial
    python -m sim compare outputs/ablations/2025-01-01_12-00-00 # an ablation: mean ± std per cell
    python -m sim compare outputs/2025-01-01/10-00-00 outputs/2025-01-01/11-30-00 out=cmp
    python -m sim compare outputs/sweeps/search by=model.K      # group by chosen config keys

Each DIR is a run directory (it holds metrics/val_metrics.jsonl) or is searched for runs below it.
Runs are grouped by the config keys in which they differ (or by `by=key1,key2`), seeds averaged.
Writes runs.csv, summary.csv, summary.md, curves.png (val metrics per epoch, one line per run) and,
when the groups are two numeric keys (e.g. model.F and model.K), heatmap.png. The default `out` is
`DIR/compare` for one DIR, else `outputs/compare/<date>_<time>`.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from pathlib import Path

from sim.core.errors import DataError
from sim.evaluation import report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    opts = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in ("out", "by") and "=" in a}
    dirs = [a for a in args if a.split("=", 1)[0] not in opts]
    if not dirs or any(a in ("-h", "--help") for a in args):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        runs = [report.load_run(p) for p in report.find_runs(dirs)]
    except (FileNotFoundError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if opts.get("by"):
        keys = [k.strip() for k in opts["by"].split(",") if k.strip()]
        known = set().union(*(r.config for r in runs))
        unknown = [k for k in keys if k not in known]
        if unknown:
            print(f"error: by={opts['by']}: {', '.join(unknown)} is not a key of the runs' config_resolved.yaml "
                  f"(e.g. {', '.join(report.varying_keys(runs)[:6]) or 'model.K'})", file=sys.stderr)
            return 2
    else:
        keys = report.varying_keys(runs)
    if opts.get("out"):
        out = Path(opts["out"])
    elif len(dirs) == 1 and not (Path(dirs[0]) / "metrics" / "val_metrics.jsonl").is_file():
        out = Path(dirs[0]) / "compare"
    else:
        out = Path("outputs/compare") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    paths = report.write_report(out, runs, keys, title=f"Comparison of {len(runs)} runs")
    print(paths["summary_md"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
