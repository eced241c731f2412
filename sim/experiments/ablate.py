"""F/K ablation: the `sweeps/ablate_fk.yaml` multirun over a chosen grid, then its report.

    python -m sim ablate F=4,8,16 K=1,2,4,8 seeds=3 [out=DIR] [any train.py override ...]
    python -m sim ablate F=4,8 K=1,2,4 seeds=2 llm=tiny training.epochs=5
    python -m sim ablate F=4,8 K=1,2 seeds=3 hydra/launcher=slurm    # the cells as Slurm jobs

A Hydra main (conf/ablate.yaml, which extends conf/train.yaml). F is model.F (frames per sample; the
synthetic data follows it), K is model.K (visual tokens). `seeds=N` runs training.seed = s, s+1, ...,
s+N-1 from the config's training.seed s; `seeds=[1,7]` names them. This runs

    python train.py -m +sweeps=ablate_fk hydra.sweep.dir=DIR model.F=... model.K=... training.seed=... [overrides]

so the configured Hydra launcher runs the cells (one after another by default, in parallel on
Slurm). Cells with K > F cannot work and are skipped and reported. Each run writes the full run tree
to `<out>/F{F}_K{K}/seed{seed}`; the default `out` is `outputs/ablations/<date>_<time>`. Running the
same command with the same `out` again keeps finished runs and resumes unfinished ones from their last.pt.

Writes in `out` (through sim.experiments.compare): runs.csv, summary.csv, summary.md (mean ± std over seeds of
risk_high_recall, action_accuracy and macro_f1 at each run's best epoch), heatmap.png (F x K) and
curves.png. A bad command line, or a run that failed (the report is written anyway), ends with one
`error:` line and exit status 1.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from sim.core.cli import CONF_DIR, comma_lists, command_line, fail_cleanly
from sim.core.config import select_required
from sim.core.errors import ConfigError, SweepFailed
from sim.evaluation import report
from sim.experiments.compare import write_comparison
from sim.experiments.grid_sweeper import read_record

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
TRAIN_PY = ROOT / "train.py"
OWN_KEYS = ("F", "K", "seeds", "out")
GRID_KEYS = ("model.F", "model.K")


@dataclass
class Plan:
    Fs: list[int]
    Ks: list[int]
    seeds: list[int]
    out: Path
    overrides: list[str]


def _ints(key: str, value: Any) -> list[int]:
    items = value if isinstance(value, list) else [value]
    try:
        values = [int(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value}: expected comma-separated integers, e.g. {key}=1,2,4") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{key}={value}: expected positive integers, e.g. {key}=1,2,4")
    return list(dict.fromkeys(values))


def make_plan(cfg: DictConfig, overrides: list[str]) -> Plan:
    """The ablation conf/ablate.yaml composed into (with `overrides`, the command line, whose train.py
    overrides go to every cell).

    Raises:
        ConfigError: a missing or malformed F/K/seeds, or an override the ablation sets itself.
    """
    own = {k: _plain(select_required(cfg, k)) for k in OWN_KEYS}
    train_overrides = [a for a in overrides if a.partition("=")[0].lstrip("+~") not in OWN_KEYS]
    for arg in train_overrides:
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in (*GRID_KEYS, report.SEED_KEY):
            raise ConfigError(f"{arg}: the ablation sets {key} itself; use F=..., K=... and seeds=... instead")
    if isinstance(own["seeds"], list):
        seeds = _ints("seeds", own["seeds"])
    elif isinstance(own["seeds"], int) and own["seeds"] >= 1:
        seeds = [int(cfg.training.seed) + i for i in range(own["seeds"])]
    else:
        raise ConfigError(f"seeds={own['seeds']}: expected a count (seeds=3) or a list of integers (seeds=[0,7])")
    out = Path(own["out"]) if own["out"] else Path("outputs/ablations") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Plan(_ints("F", own["F"]), _ints("K", own["K"]), seeds, out, train_overrides)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def command(plan: Plan) -> list[str]:
    """The multirun that trains the grid: train.py with sweeps/ablate_fk.yaml and the plan's values."""
    return [
        sys.executable,
        str(TRAIN_PY),
        "-m",
        "+sweeps=ablate_fk",
        f"hydra.sweep.dir={plan.out}",
        f"{GRID_KEYS[0]}={','.join(map(str, plan.Fs))}",
        f"{GRID_KEYS[1]}={','.join(map(str, plan.Ks))}",
        f"{report.SEED_KEY}={','.join(map(str, plan.seeds))}",
        *plan.overrides,
    ]


def run_ablation(plan: Plan) -> dict[str, Path]:
    """Run the grid as a Hydra multirun in a child process, then write its report; returns the paths written.

    Raises:
        SweepFailed: the multirun ran no cell, or some runs failed (after the report is written).
    """
    cmd = command(plan)
    log.info("ablation: F=%s K=%s seeds=%s into %s\n    %s", plan.Fs, plan.Ks, plan.seeds, plan.out, " ".join(cmd[1:]))
    # A child process: Hydra's multirun owns its process (logging, working directory, launcher plugins).
    status = subprocess.run(cmd, check=False).returncode
    if not read_record(plan.out):
        raise SweepFailed(f"the multirun stopped (exit status {status}) before it ran any cell; see its output above")
    paths = write_comparison([plan.out], plan.out, list(GRID_KEYS), title="F/K ablation", heatmap=GRID_KEYS)
    print(paths["summary_md"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    failed = sum(job["state"] == "FAIL" for job in read_record(plan.out))
    if failed or status != 0:
        raise SweepFailed(f"{failed} run(s) failed; see {paths['summary_md']} and each run's logs/stdout.log")
    return paths


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="ablate")
def main(cfg: DictConfig) -> None:
    with fail_cleanly():
        run_ablation(make_plan(cfg, command_line()))


def cli() -> None:
    """`python -m sim ablate F=4,8 K=1,2 ...`: the plain comma lists of F and K are lists, not sweeps."""
    sys.argv[1:] = comma_lists(sys.argv[1:], ["F", "K"])
    main()


if __name__ == "__main__":
    cli()
