"""F/K ablation: the `sweeps/ablate_fk.yaml` multirun over a chosen grid, then its report.

    python -m sim ablate F=4,8,16 K=1,2,4,8 seeds=3 [out=DIR] [any train.py override ...]
    python -m sim ablate F=4,8 K=1,2,4 seeds=2 llm=tiny training.epochs=5
    python -m sim ablate F=4,8 K=1,2 seeds=3 hydra/launcher=slurm    # the cells as Slurm jobs

F is model.F (frames per sample; the synthetic data follows it), K is model.K (visual tokens).
`seeds=N` runs training.seed = s, s+1, ..., s+N-1 from the config's training.seed s; `seeds=[1,7]`
names them. This runs

    python train.py -m +sweeps=ablate_fk hydra.sweep.dir=DIR model.F=... model.K=... training.seed=... [overrides]

so the configured Hydra launcher runs the cells (one after another by default, in parallel on
Slurm). Cells with K > F cannot work and are skipped and reported. Each run writes the full run tree
to `<out>/F{F}_K{K}/seed{seed}`; the default `out` is `outputs/ablations/<date>_<time>`. Running the
same command with the same `out` again keeps finished runs and resumes unfinished ones from their last.pt.

Writes in `out` (through sim.experiments.compare): runs.csv, summary.csv, summary.md (mean ± std over seeds of
risk_high_recall, action_accuracy and macro_f1 at each run's best epoch), heatmap.png (F x K) and
curves.png. Exit status 1 if a run failed (the report is written anyway), 2 for a bad command line.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sim.core.cli import compose
from sim.core.errors import ConfigError
from sim.evaluation import report
from sim.experiments.compare import write_comparison
from sim.experiments.grid_sweeper import read_record

log = logging.getLogger("sim.experiments.ablate")

ROOT = Path(__file__).resolve().parents[2]
TRAIN_PY = ROOT / "train.py"
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
            raise ConfigError(
                f"seeds={seeds_text}: a count is one integer (seeds=3); name seeds as a list: seeds=[0,7]"
            )
        seeds = counts[0]
    out = (
        Path(own["out"]) if own.get("out") else Path("outputs/ablations") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    )
    return Plan(_ints("F", own["F"]), _ints("K", own["K"]), seeds, out, overrides)


def command(plan: Plan, seeds: list[int]) -> list[str]:
    """The multirun that trains the grid: train.py with sweeps/ablate_fk.yaml and the plan's values."""
    return [
        sys.executable,
        str(TRAIN_PY),
        "-m",
        "+sweeps=ablate_fk",
        f"hydra.sweep.dir={plan.out}",
        f"{GRID_KEYS[0]}={','.join(map(str, plan.Fs))}",
        f"{GRID_KEYS[1]}={','.join(map(str, plan.Ks))}",
        f"{report.SEED_KEY}={','.join(map(str, seeds))}",
        *plan.overrides,
    ]


def run_ablation(plan: Plan) -> int:
    """Run the grid as a Hydra multirun in a child process; returns its exit status.

    Raises:
        ConfigError: an override that does not compose (checked before anything runs).
    """
    base = compose("train", plan.overrides)
    seeds = plan.seeds if isinstance(plan.seeds, list) else [int(base.training.seed) + i for i in range(plan.seeds)]
    cmd = command(plan, seeds)
    log.info("ablation: F=%s K=%s seeds=%s into %s\n    %s", plan.Fs, plan.Ks, seeds, plan.out, " ".join(cmd[1:]))
    # A child process: Hydra's multirun owns its process (logging, working directory, launcher plugins).
    return subprocess.run(cmd, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        plan = parse_args(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        print(f"error: {exc}\n\n{__doc__}", file=sys.stderr)
        return 2
    try:
        status = run_ablation(plan)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not read_record(plan.out):
        print(
            f"error: the multirun stopped (exit status {status}) before it ran any cell; see its output above",
            file=sys.stderr,
        )
        return 1
    paths = write_comparison([plan.out], plan.out, list(GRID_KEYS), title="F/K ablation", heatmap=GRID_KEYS)
    print(paths["summary_md"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    failed = sum(job["state"] == "FAIL" for job in read_record(plan.out))
    if failed or status != 0:
        print(f"error: {failed} run(s) failed; see summary.md and each run's logs/stdout.log", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
