"""F/K ablation: train every (F, K) cell over several seeds and write a table and a heatmap.

    python -m sim ablate F=4,8,16 K=1,2,4,8 seeds=3 [out=DIR] [any train.py override ...]
    python -m sim ablate F=4,8 K=1,2,4 seeds=2 llm=tiny training.epochs=5

F is model.F (frames per sample; the synthetic data follows it), K is model.K (visual tokens).
`seeds=N` runs training.seed = s, s+1, ..., s+N-1 from the config's training.seed s; `seeds=[1,7]`
names them. Cells with K > F cannot work and are skipped and reported. Each run writes the full run
tree to `<out>/F{F}_K{K}/seed{seed}`; the default `out` is `outputs/ablations/<date>_<time>`.
Running the same command with the same `out` again keeps finished runs and resumes unfinished ones
from their last.pt.

Writes in `out`: runs.csv, summary.csv, summary.md (mean ± std over seeds of risk_high_recall,
action_accuracy and macro_f1 at each run's best epoch), heatmap.png (F x K) and curves.png.
Exit status 1 if a run failed (the report is written anyway), 2 for a bad command line.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sim.core.errors import ConfigError
from sim.core.run import read_jsonl
from sim.evaluation import report

log = logging.getLogger("sim.experiments.ablate")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
OWN_KEYS = ("F", "K", "seeds", "out")
GRID_KEYS = ("model.F", "model.K")


@dataclass
class Plan:
    Fs: list[int]
    Ks: list[int]
    seeds: list[int] | int
    out: Path
    overrides: list[str]


def _ints(key: str, text: str) -> list[int]:
    items = [t.strip() for t in text.strip("[]").split(",") if t.strip()]
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise ConfigError(f"{key}={text}: expected comma-separated integers, e.g. {key}=1,2,4") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{key}={text}: expected positive integers, e.g. {key}=1,2,4")
    return list(dict.fromkeys(values))


def parse_args(argv: list[str]) -> Plan:
    """Split the command line into the ablation's own keys and train.py overrides.

    Raises:
        ConfigError: a missing or malformed F/K/seeds, or an override the ablation sets itself.
    """
    own: dict[str, str] = {}
    overrides: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in OWN_KEYS:
            own[key] = value
        else:
            overrides.append(arg)
    for key in ("F", "K"):
        if key not in own:
            raise ConfigError(f"missing {key}=...: e.g. python -m sim ablate F=4,8,16 K=1,2,4,8 seeds=3")
    for arg in overrides:
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in (*GRID_KEYS, report.SEED_KEY):
            raise ConfigError(f"{arg}: the ablation sets {key} itself; use F=..., K=... and seeds=... instead")
    seeds_text = own.get("seeds", "1")
    seeds: list[int] | int
    if seeds_text.startswith("["):
        try:
            seeds = list(dict.fromkeys(int(v) for v in seeds_text.strip("[]").split(",") if v.strip()))
        except ValueError:
            seeds = []
        if not seeds:
            raise ConfigError(f"seeds={seeds_text}: expected a count (seeds=3) or a list of integers (seeds=[0,7])")
    else:
        counts = _ints("seeds", seeds_text)
        if len(counts) != 1:
            raise ConfigError(f"seeds={seeds_text}: a count is one integer (seeds=3); name seeds as a list: seeds=[0,7]")
        seeds = counts[0]
    out = Path(own["out"]) if own.get("out") else Path("outputs/ablations") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Plan(_ints("F", own["F"]), _ints("K", own["K"]), seeds, out, overrides)


def compose(overrides: list[str]) -> DictConfig:
    """The train config as `python train.py <overrides>` would compose it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    if not (CONF_DIR / "train.yaml").is_file():
        raise ConfigError(f"{CONF_DIR / 'train.yaml'} not found: sim.experiments.ablate composes the project's conf/ directory")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def _finished(run_dir: Path, epochs: int) -> bool:
    return len(read_jsonl(run_dir / "metrics" / "val_metrics.jsonl", strict=True)) >= epochs


def _prepare_resume(run_dir: Path) -> str | None:
    """training.resume for a run directory: auto if it holds a last.pt to continue from.

    Metric lines of an attempt that died before its first checkpoint would be appended to; they are
    removed (the directory is this ablation's own).
    """
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return "auto"
    for name in ("train_metrics.jsonl", "val_metrics.jsonl"):
        (run_dir / "metrics" / name).unlink(missing_ok=True)
    return None


def run_ablation(plan: Plan) -> tuple[list[report.Run], list[tuple[tuple[Any, ...], str]], list[report.Skipped]]:
    """Train the grid (in this process) and return (finished runs, failed runs, skipped cells)."""
    from sim.training.train import train

    base = compose(plan.overrides)  # a bad override fails here, before any training
    seeds = plan.seeds if isinstance(plan.seeds, list) else [int(base.training.seed) + i for i in range(plan.seeds)]
    user_keys = {o.split("=", 1)[0].lstrip("+~") for o in plan.overrides}
    quiet = [] if "training.progress_bar" in user_keys else ["training.progress_bar=false"]
    cells = [(F, K) for F in plan.Fs for K in plan.Ks]
    skipped = [report.Skipped((F, K), f"skipped: K={K} > F={F}") for F, K in cells if K > F]
    for s in skipped:
        log.warning("F=%d K=%d %s (K visual tokens are segment means of F frames)", *s.group, s.reason)
    todo = [(F, K, seed) for F, K in cells if K <= F for seed in seeds]
    log.info("ablation: %d run(s) (%d cell(s) x %d seed(s)), %d cell(s) skipped, into %s",
             len(todo), len(todo) // max(1, len(seeds)), len(seeds), len(skipped), plan.out)

    runs: list[report.Run] = []
    failed: list[tuple[tuple[Any, ...], str]] = []
    for i, (F, K, seed) in enumerate(todo, 1):
        run_dir = plan.out / f"F{F}_K{K}" / f"seed{seed}"
        cell = [f"model.F={F}", f"model.K={K}", f"{report.SEED_KEY}={seed}"]
        log.info("[%d/%d] F=%d K=%d seed=%d -> %s", i, len(todo), F, K, seed, run_dir)
        try:
            if run_dir.exists() and _finished(run_dir, int(base.training.epochs)):
                log.info("already finished: kept")
            else:
                resume = _prepare_resume(run_dir) if run_dir.exists() else None
                extra = [f"training.resume={resume}"] if resume and "training.resume" not in user_keys else []
                train(compose([*quiet, *plan.overrides, *cell, *extra]), run_dir=run_dir)
            runs.append(report.load_run(run_dir))
        except Exception as exc:  # one failed run is reported; the grid goes on
            log.error("F=%d K=%d seed=%d failed: %s: %s", F, K, seed, type(exc).__name__, exc)
            failed.append(((F, K), f"seed {seed}: {type(exc).__name__}: {exc}"))
    return runs, failed, skipped


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        plan = parse_args(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        print(f"error: {exc}\n\n{__doc__}", file=sys.stderr)
        return 2
    try:
        runs, failed, skipped = run_ablation(plan)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = report.write_report(plan.out, runs, list(GRID_KEYS), title="F/K ablation", failed=failed,
                                skipped=skipped, heatmap=GRID_KEYS if runs else None, sort=True)
    print(paths["summary_md"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if failed:
        print(f"error: {len(failed)} run(s) failed; see summary.md and each run's logs/stdout.log", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
