"""Sweeps (optuna through `python train.py -m`), the F/K ablation and the run comparison."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import optuna
import pytest
from conftest import run_cmd
from optuna.trial import TrialState

from sim.core.errors import ConfigError
from sim.evaluation import report
from sim.experiments import ablate, compare
from sim.experiments.sweeper import _objective_values

# Tiny LLM, a small synthetic split and one epoch: a trial takes seconds.
SMALL = ["llm=tiny", "training.progress_bar=false", "training.epochs=1",
         "data.train_kwargs.num_samples=128", "data.val_kwargs.num_samples=64"]
RUN_TREE = ("config_resolved.yaml", "checkpoints/best.pt", "checkpoints/last.pt", "metrics/train_metrics.jsonl",
            "metrics/val_metrics.jsonl", "logs/stdout.log", "export/labels.json", "export/sim_v0_infer.py")


def load_study(sweep_dir, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir}/optuna.db")


def assert_run_tree(run_dir) -> None:
    missing = [p for p in RUN_TREE if not (run_dir / p).is_file()]
    assert not missing, f"{run_dir} lacks {missing}"


def snapshot(run_dir) -> dict[str, tuple[int, bytes]]:
    return {p: ((run_dir / p).stat().st_mtime_ns, (run_dir / p).read_bytes()) for p in RUN_TREE}


@pytest.mark.slow
def test_optuna_sweep_completes_then_resumes_to_the_total(tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = ["train.py", "-m", "+sweeps=search", *SMALL, f"hydra.sweep.dir={sweep_dir}"]
    res = run_cmd(*cmd, "hydra.sweeper.n_trials=2")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]

    trials = load_study(sweep_dir, "search").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        run_dir = sweep_dir / str(t.number)
        assert_run_tree(run_dir)
        assert t.user_attrs["run_dir"] == str(run_dir)
        # The value the sweeper stored is the run's best-epoch val macro_f1 (sweeps/search.yaml).
        assert t.value == pytest.approx(report.load_run(run_dir).best["macro_f1"])
    kept = {n: snapshot(sweep_dir / str(n)) for n in (0, 1)}

    # A sweep killed mid-trial leaves that trial RUNNING in the study (and maybe its directory).
    interrupted = load_study(sweep_dir, "search").ask()
    (sweep_dir / str(interrupted.number) / "logs").mkdir(parents=True)

    res = run_cmd(*cmd, "hydra.sweeper.n_trials=3")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "2 of n_trials=3 finished, 1 to run" in res.stdout

    trials = load_study(sweep_dir, "search").get_trials()
    states = {t.number: t.state for t in trials}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.COMPLETE, 2: TrialState.RUNNING, 3: TrialState.COMPLETE}
    assert_run_tree(sweep_dir / "3")
    assert {n: snapshot(sweep_dir / str(n)) for n in (0, 1)} == kept, "a resumed sweep rewrote earlier trials"
    assert (sweep_dir / "2" / "logs").is_dir() and not (sweep_dir / "2" / "config_resolved.yaml").exists()
    records = [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines()]
    assert [(r["trial"], r["state"]) for r in records] == [(0, "COMPLETE"), (1, "COMPLETE"), (3, "COMPLETE")]
    results = (sweep_dir / "optimization_results.yaml").read_text()
    assert "best_params" in results and "n_complete: 3" in results


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # A grid over K in {1, 4} with F=2: the K=4 trial is a config that cannot work (K > F).
    res = run_cmd("train.py", "-m", "hydra/sweeper=sim_optuna", "hydra/sweeper/sampler=grid", "model.K=choice(1,4)",
                  "model.F=2", "objective=macro_f1", *SMALL, f"hydra.sweep.dir={sweep_dir}")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]

    trials = {t.params["model.K"]: t for t in load_study(sweep_dir, "sim").get_trials()}
    assert trials[4].state == TrialState.FAIL
    assert "model.K=4 > model.F=2" in trials[4].user_attrs["error"]
    assert trials[1].state == TrialState.COMPLETE
    assert_run_tree(sweep_dir / str(trials[1].number))
    assert "recorded as FAIL; the sweep goes on" in res.stdout
    records = {r["trial"]: r for r in map(json.loads, (sweep_dir / "trials.jsonl").read_text().splitlines())}
    assert records[trials[4].number]["state"] == "FAIL" and "K <= F" in records[trials[4].number]["error"]


def test_objective_values_refuse_nan_and_wrong_arity():
    assert _objective_values(0.5, 1) == ([0.5], None)
    assert _objective_values((0.5, 0.25), 2) == ([0.5, 0.25], None)
    values, why = _objective_values(math.nan, 1)
    assert values is None and "undefined" in why
    values, why = _objective_values(0.5, 2)
    assert values is None and "1 value(s) for 2 objective(s)" in why


@pytest.fixture(scope="module")
def ablation_dir(tmp_path_factory):
    """A 2x2 F/K grid, one seed (the spread over seeds is tested on its own below); (F=2, K=4) cannot
    work and is skipped."""
    out = tmp_path_factory.mktemp("ablation")
    status = ablate.main(["F=2,4", "K=1,4", "seeds=1", *SMALL, f"out={out}"])
    assert status == 0
    return out


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_ablation_writes_csv_table_and_heatmap_per_cell(ablation_dir):
    runs = read_csv(ablation_dir / "runs.csv")
    assert sorted((r["model.F"], r["model.K"], r["training.seed"]) for r in runs) == [
        ("2", "1", "42"), ("4", "1", "42"), ("4", "4", "42")]
    for r in runs:
        run_dir = ablation_dir / f"F{r['model.F']}_K{r['model.K']}" / f"seed{r['training.seed']}"
        assert_run_tree(run_dir)
        assert r["run_dir"] == str(run_dir)

    cells = {(r["model.F"], r["model.K"]): r for r in read_csv(ablation_dir / "summary.csv")}
    assert list(cells) == [("2", "1"), ("2", "4"), ("4", "1"), ("4", "4")]
    assert cells[("2", "4")]["runs"] == "0" and "K=4 > F=2" in cells[("2", "4")]["note"]
    for (F, K), cell in cells.items():
        if cell["runs"] == "0":
            continue
        best = report.load_run(ablation_dir / f"F{F}_K{K}" / "seed42").best
        for m in report.KEY_METRICS:
            assert float(cell[f"{m}_mean"]) == pytest.approx(best[m])

    table = (ablation_dir / "summary.md").read_text()
    assert "| model.F | model.K | runs | risk_high_recall | action_accuracy | macro_f1 |" in table
    assert "| 2 | 4 | skipped: K=4 > F=2 |" in table
    f4k4 = cells[("4", "4")]
    assert "| 4 | 4 | 1 | " + " | ".join(f"{float(f4k4[f'{m}_mean']):.3f}" for m in report.KEY_METRICS) + " |" in table
    for png in ("heatmap.png", "curves.png"):
        data = (ablation_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_summary_gives_mean_and_spread_over_seeds():
    def run(F, K, seed, f1):
        return report.Run(path=Path(f"F{F}_K{K}/seed{seed}"), config={"model.F": F, "model.K": K, "training.seed": seed},
                          val=[{"epoch": 1, "macro_f1": f1}], train=[], best_epoch=1, best={"macro_f1": f1})

    runs = [run(8, 2, 0, 0.5), run(8, 2, 1, 0.7), run(8, 2, 2, 0.9), run(4, 2, 0, 0.4)]
    report.assign_groups(runs, ["model.F", "model.K"])
    rows = report.summarize(runs, ["model.F", "model.K"], metrics=["macro_f1"], sort=True,
                            skipped=[report.Skipped((4, 8), "skipped: K=8 > F=4")])
    assert [(r["model.F"], r["model.K"], r["runs"]) for r in rows] == [(4, 2, 1), (4, 8, 0), (8, 2, 3)]
    f8 = rows[2]
    assert (f8["macro_f1_mean"], f8["macro_f1_min"], f8["macro_f1_max"]) == pytest.approx((0.7, 0.5, 0.9))
    assert f8["macro_f1_std"] == pytest.approx(0.2)  # sample standard deviation
    assert rows[0]["macro_f1_std"] is None  # one run has no spread
    table = report.markdown_table(rows, ["model.F", "model.K"], metrics=["macro_f1"])
    assert "| 8 | 2 | 3 | 0.700 ± 0.200 |" in table and "| 4 | 2 | 1 | 0.400 |" in table


def test_ablation_rerun_keeps_finished_runs(ablation_dir):
    lasts = sorted(ablation_dir.glob("F*_K*/seed*/checkpoints/last.pt"))
    assert len(lasts) == 3
    before = [p.stat().st_mtime_ns for p in lasts]
    summary = (ablation_dir / "summary.csv").read_text()
    assert ablate.main(["F=2,4", "K=1,4", "seeds=1", *SMALL, f"out={ablation_dir}"]) == 0
    assert [p.stat().st_mtime_ns for p in lasts] == before
    assert (ablation_dir / "summary.csv").read_text() == summary


def test_compare_reads_an_ablation_into_the_same_table(ablation_dir, tmp_path):
    assert compare.main([str(ablation_dir / "F2_K1"), str(ablation_dir / "F4_K1"), str(ablation_dir / "F4_K4"),
                         f"out={tmp_path}"]) == 0
    mine = {(r["model.F"], r["model.K"]): r for r in read_csv(tmp_path / "summary.csv")}
    theirs = {(r["model.F"], r["model.K"]): r for r in read_csv(ablation_dir / "summary.csv") if r["runs"] != "0"}
    assert mine.keys() == theirs.keys()
    for cell in mine:
        assert mine[cell]["macro_f1_mean"] == theirs[cell]["macro_f1_mean"]
    assert (tmp_path / "heatmap.png").is_file() and (tmp_path / "curves.png").is_file()
    assert len(read_csv(tmp_path / "runs.csv")) == 3


@pytest.mark.parametrize("argv, expected", [
    (["K=1,2"], "missing F="),
    (["F=4", "K=1,x"], "K=1,x: expected comma-separated integers"),
    (["F=4", "K=2", "model.K=2"], "the ablation sets model.K itself"),
    (["F=4", "K=2", "seeds=1,2"], "a count is one integer"),
])
def test_ablation_refuses_a_bad_command_line(argv, expected):
    with pytest.raises(ConfigError, match=expected):
        ablate.parse_args(argv)


def test_compare_refuses_a_directory_without_runs(tmp_path, capsys):
    assert compare.main([str(tmp_path)]) == 2
    assert "no run below it" in capsys.readouterr().err
