"""Sweeps (optuna through `python train.py -m`), the F/K ablation and the run comparison."""

from __future__ import annotations

import csv
import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from conftest import ROOT, run_cmd
from optuna.trial import TrialState

from sim.core.cli import comma_lists, compose
from sim.core.errors import ConfigError
from sim.evaluation import report
from sim.experiments import ablate
from sim.experiments.sweeper import _objective_values

# Tiny LLM, a small synthetic split and one epoch: a trial takes seconds.
SMALL = [
    "llm=tiny",
    "training.progress_bar=false",
    "training.epochs=1",
    "data.train_kwargs.num_samples=128",
    "data.val_kwargs.num_samples=64",
]
RUN_TREE = (
    "config_resolved.yaml",
    "checkpoints/best.pt",
    "checkpoints/last.pt",
    "metrics/train_metrics.jsonl",
    "metrics/val_metrics.jsonl",
    "logs/stdout.log",
    "export/labels.json",
    "export/sim_v0_infer.py",
)


def load_study(sweep_dir, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir}/optuna.db")


def assert_run_tree(run_dir) -> None:
    missing = [p for p in RUN_TREE if not (run_dir / p).is_file()]
    assert not missing, f"{run_dir} lacks {missing}"


def snapshot(run_dir) -> dict[str, tuple[int, bytes]]:
    return {p: ((run_dir / p).stat().st_mtime_ns, (run_dir / p).read_bytes()) for p in RUN_TREE}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start a command in the background, its output to `log` (a pipe nobody reads could fill and stall it)."""
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail if `proc` ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}:\n{log.read_text()[-3000:]}")
        try:
            proc.wait(timeout=0.2)  # the poll interval doubles as a check that the process is alive
        except subprocess.TimeoutExpired:
            continue
        if not condition():
            pytest.fail(f"the process ended (status {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_optuna_sweep_killed_mid_trial_resumes_to_the_total(tmp_path):
    assert int(optuna.__version__.split(".")[0]) >= 4
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "+sweeps=search",
        *SMALL,
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweeper.n_trials=3",
    ]
    log = tmp_path / "first_launch.log"
    proc = start(cmd, log)
    # Killed once trial 1 is training: trial 0 is finished, trial 1 RUNNING in the study.
    wait_for(lambda: (sweep_dir / "1" / "config_resolved.yaml").is_file(), proc, log, 300, "trial 1 to start")
    proc.kill()
    proc.wait()
    trials = load_study(sweep_dir, "search").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert_run_tree(sweep_dir / "0")
    kept = snapshot(sweep_dir / "0")

    res = run_cmd(*cmd[1:])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "1 of n_trials=3 finished, 2 to run" in res.stdout

    trials = load_study(sweep_dir, "search").get_trials()
    states = {t.number: t.state for t in trials}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.RUNNING, 2: TrialState.COMPLETE, 3: TrialState.COMPLETE}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            run_dir = sweep_dir / str(t.number)
            assert_run_tree(run_dir)
            assert t.user_attrs["run_dir"] == str(run_dir)
            # The value the sweeper stored is the run's best-epoch val macro_f1 (sweeps/search.yaml).
            assert t.value == pytest.approx(report.load_run(run_dir).best["macro_f1"])
    assert snapshot(sweep_dir / "0") == kept, "a resumed sweep rewrote an earlier trial"
    # The killed trial's directory is left as the kill left it.
    assert (sweep_dir / "1" / "config_resolved.yaml").is_file()
    records = [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines()]
    assert [(r["trial"], r["state"]) for r in records] == [(0, "COMPLETE"), (2, "COMPLETE"), (3, "COMPLETE")]
    results = (sweep_dir / "optimization_results.yaml").read_text()
    assert "best_params" in results and "n_complete: 3" in results


# A planted bad region: lr=1e-12 leaves the heads where they started, so its epoch-1 val loss is
# above that of lr=3e-3; the median pruner (compared from the 2nd trial on) prunes it.
GOOD_LR, BAD_LR = 3e-3, 1e-12
PRUNING = [
    "hydra/sweeper=sim_optuna",
    "hydra/sweeper/pruner=median",
    "hydra.sweeper.pruner.n_startup_trials=1",
    f"optim.lr=choice({GOOD_LR},{BAD_LR})",
    "checkpoint.monitor=loss",
    "hydra.sweeper.direction=minimize",
    "hydra.sweeper.n_trials=2",
    *SMALL,
    "training.epochs=2",
    "data.batch_size=32",
]


@pytest.fixture(scope="module")
def pruned_sweep(tmp_path_factory):
    """A finished 2-trial study: the good lr (complete), then the bad one (pruned after epoch 1)."""
    sweep_dir = tmp_path_factory.mktemp("pruned") / "sweep"
    sweep_dir.mkdir()
    # The trials' order is fixed by enqueueing them in the study the sweep then continues.
    study = optuna.create_study(study_name="sim", storage=f"sqlite:///{sweep_dir}/optuna.db", direction="minimize")
    study.enqueue_trial({"optim.lr": GOOD_LR})
    study.enqueue_trial({"optim.lr": BAD_LR})
    res = run_cmd("train.py", "-m", *PRUNING, f"hydra.sweep.dir={sweep_dir}")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return sweep_dir, res


def test_a_trial_in_a_bad_region_is_pruned_with_its_run_tree(pruned_sweep):
    sweep_dir, _res = pruned_sweep
    good, bad = load_study(sweep_dir, "sim").get_trials()
    assert (good.params["optim.lr"], good.state) == (GOOD_LR, TrialState.COMPLETE)
    assert (bad.params["optim.lr"], bad.state) == (BAD_LR, TrialState.PRUNED)
    assert sorted(good.intermediate_values) == [1, 2] and sorted(bad.intermediate_values) == [1]

    # The pruned run stopped after epoch 1 of 2 and kept what it had written.
    run_dir = sweep_dir / str(bad.number)
    assert_run_tree(run_dir)
    val = report.load_run(run_dir).val
    assert [m["epoch"] for m in val] == [1]
    assert bad.intermediate_values[1] == pytest.approx(val[0]["loss"])
    records = {r["trial"]: r for r in map(json.loads, (sweep_dir / "trials.jsonl").read_text().splitlines())}
    assert records[bad.number]["state"] == "PRUNED" and records[bad.number]["pruned_at_epoch"] == 1
    assert records[good.number]["state"] == "COMPLETE"
    assert "n_pruned: 1" in (sweep_dir / "optimization_results.yaml").read_text()


def test_a_resumed_sweep_does_not_rerun_a_pruned_trial(pruned_sweep):
    sweep_dir, _ = pruned_sweep
    kept = snapshot(sweep_dir / "1")
    res = run_cmd("train.py", "-m", *PRUNING, f"hydra.sweep.dir={sweep_dir}")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "2 of n_trials=2 finished, 0 to run" in res.stdout
    assert [t.state for t in load_study(sweep_dir, "sim").get_trials()] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert snapshot(sweep_dir / "1") == kept


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_optuna_dashboard_serves_the_sweeps_study(pruned_sweep, tmp_path):
    sweep_dir, _ = pruned_sweep
    dashboard = Path(sys.executable).with_name("optuna-dashboard")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "dashboard.log"
    proc = start([str(dashboard), f"sqlite:///{sweep_dir}/optuna.db", "--host", "127.0.0.1", "--port", str(port)], log)
    try:

        def up() -> bool:
            try:
                get_json(f"{base}/api/meta")
            except OSError:
                return False
            return True

        wait_for(up, proc, log, 60, f"optuna-dashboard to answer on {base}")
        studies = get_json(f"{base}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["sim"]
        detail = get_json(f"{base}/api/studies/{studies[0]['study_id']}")
        assert sorted((t["number"], t["state"]) for t in detail["trials"]) == [(0, "Complete"), (1, "Pruned")]
        assert {t["number"]: len(t["intermediate_values"]) for t in detail["trials"]} == {0: 2, 1: 1}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # A grid over K in {1, 4} with F=2: the K=4 trial is a config that cannot work (K > F).
    res = run_cmd(
        "train.py",
        "-m",
        "hydra/sweeper=sim_optuna",
        "hydra/sweeper/sampler=grid",
        "model.K=choice(1,4)",
        "model.F=2",
        "objective=macro_f1",
        *SMALL,
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]

    trials = {t.params["model.K"]: t for t in load_study(sweep_dir, "sim").get_trials()}
    assert trials[4].state == TrialState.FAIL
    assert "model.K=4 > model.F=2" in trials[4].user_attrs["error"]
    assert trials[1].state == TrialState.COMPLETE
    assert_run_tree(sweep_dir / str(trials[1].number))
    assert "recorded as FAIL; the sweep goes on" in res.stdout
    records = {r["trial"]: r for r in map(json.loads, (sweep_dir / "trials.jsonl").read_text().splitlines())}
    assert records[trials[4].number]["state"] == "FAIL" and "K <= F" in records[trials[4].number]["error"]


def compose_sweeper(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    built = instantiate(cfg.hydra.sweeper)
    return cfg.hydra.sweeper, getattr(built, "sweeper", built)  # the optuna sweeper's implementation, or the sweeper


def test_hydra_sweeper_optuna_keeps_the_plugin_keys_and_defaults():
    conf, sweeper = compose_sweeper("hydra/sweeper=optuna")
    assert set(conf) >= {
        "sampler",
        "direction",
        "storage",
        "study_name",
        "n_trials",
        "n_jobs",
        "max_failure_rate",
        "search_space",
        "params",
        "custom_search_space",
        "pruner",
    }
    assert (conf.storage, conf.study_name, conf.n_trials, conf.n_jobs, conf.max_failure_rate) == (
        None,
        None,
        20,
        2,
        0.0,
    )
    assert sweeper._directions() == ["minimize"]
    assert isinstance(sweeper.sampler, optuna.samplers.TPESampler)
    assert isinstance(sweeper.pruner, optuna.pruners.NopPruner)
    _, sim = compose_sweeper("+sweeps=search", "hydra.sweep.dir=x")
    assert (sim.storage, sim.study_name, sim._directions()) == ("sqlite:///x/optuna.db", "search", ["maximize"])


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml")))
def test_every_sweeps_file_composes_and_builds_its_sweeper(name):
    conf, sweeper = compose_sweeper(f"+sweeps={name}", "hydra.sweep.dir=x")
    assert conf._target_.startswith("hydra_plugins.sim_")
    if hasattr(sweeper, "_search_space"):
        assert sweeper._search_space([])[0], f"sweeps/{name}.yaml searches nothing"
    else:
        assert sweeper.params, f"sweeps/{name}.yaml sweeps nothing"
    if name == "ablate_fk":
        assert sweeper.skip_if_greater == {"model.K": "model.F"}
    if name == "variants":  # every preset it names is an option of conf/variant
        presets = sweeper.params["+variant"].split(",")
        assert presets and all((ROOT / "conf" / "variant" / f"{p}.yaml").is_file() for p in presets)


def test_search_space_syntax_maps_to_optuna_4_distributions():
    _, sweeper = compose_sweeper("+sweeps=search")  # hydra.sweeper.params, as in sweeps/search.yaml
    dists, fixed = sweeper._search_space(
        [
            "model.head_hidden=range(64,512,64)",
            "model.telemetry_hidden=interval(8, 64)",
            "model.K=choice(1,2)",
            "training.epochs=3",
        ]
    )
    Float, Int = optuna.distributions.FloatDistribution, optuna.distributions.IntDistribution
    assert dists["optim.lr"] == Float(1e-4, 3e-3, log=True)  # tag(log, interval(1e-4, 3e-3))
    assert dists["model.loss_weights.risk"] == Float(0.5, 2.0)  # interval(0.5, 2.0)
    assert dists["model.head_hidden"] == Int(64, 512, step=64)  # range(64,512,64)
    assert dists["model.telemetry_hidden"] == Float(8, 64)  # the command line wins; interval() is always float
    assert dists["model.K"] == optuna.distributions.CategoricalDistribution([1, 2])
    assert fixed == {"training.epochs": "3"} and "training.epochs" not in dists


@pytest.mark.parametrize(
    "overrides, pruner",
    [
        ((), optuna.pruners.NopPruner),
        (("hydra.sweeper.pruner=median",), optuna.pruners.MedianPruner),
        (("hydra/sweeper/pruner=hyperband", "hydra.sweeper.pruner.reduction_factor=2"), optuna.pruners.HyperbandPruner),
    ],
)
def test_pruner_is_chosen_by_name_or_config_group(overrides, pruner):
    _, sweeper = compose_sweeper("hydra/sweeper=sim_optuna", *overrides)
    assert type(sweeper.pruner) is pruner


def test_an_unknown_pruner_or_pruning_several_objectives_is_refused(tmp_path):
    with pytest.raises(Exception, match=r"hydra\.sweeper\.pruner=bogus: expected one of none, median, hyperband"):
        compose_sweeper("hydra/sweeper=sim_optuna", "hydra.sweeper.pruner=bogus")
    res = run_cmd(
        "train.py", "-m", "+sweeps=pareto", "hydra.sweeper.pruner=median", *SMALL, f"hydra.sweep.dir={tmp_path}"
    )
    assert res.returncode != 0
    assert "optuna prunes single-objective studies only" in res.stderr


def test_objective_values_refuse_nan_and_wrong_arity():
    assert _objective_values(0.5, 1) == ([0.5], None)
    assert _objective_values((0.5, 0.25), 2) == ([0.5, 0.25], None)
    values, why = _objective_values(math.nan, 1)
    assert values is None and "undefined" in why
    values, why = _objective_values(0.5, 2)
    assert values is None and "1 value(s) for 2 objective(s)" in why


@pytest.fixture(scope="module")
def ablation_dir(tmp_path_factory):
    """A 2x2 F/K grid, one seed (the spread over seeds is tested on its own below), run by Hydra's
    basic launcher; (F=2, K=4) cannot work and is skipped."""
    out = tmp_path_factory.mktemp("ablation")
    res = run_cmd("-m", "sim", "ablate", "F=2,4", "K=1,4", "seeds=1", *SMALL, f"out={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_the_ablation_is_a_multirun_of_sweeps_ablate_fk(ablation_dir):
    multirun = (ablation_dir / "multirun.yaml").read_text()
    assert "sim_grid_sweeper.SimGridSweeper" in multirun and "core_plugins.basic_launcher.BasicLauncher" in multirun
    jobs = [json.loads(line) for line in (ablation_dir / "jobs.jsonl").read_text().splitlines()]
    assert sorted((j["params"]["model.F"], j["params"]["model.K"], j["state"]) for j in jobs) == [
        (2, 1, "COMPLETE"),
        (2, 4, "SKIPPED"),
        (4, 1, "COMPLETE"),
        (4, 4, "COMPLETE"),
    ]
    assert not (ablation_dir / "F2_K4").exists(), "a skipped cell was launched"


def test_a_failed_grid_job_is_recorded_while_the_others_run(tmp_path):
    # Without skip_if_greater, the K=3 > F=2 cell is launched and fails.
    res = run_cmd(
        "train.py", "-m", "hydra/sweeper=sim_grid", "model.F=2", "model.K=1,3", *SMALL, f"hydra.sweep.dir={tmp_path}"
    )
    assert res.returncode == 1
    assert "1 of 2 jobs failed" in res.stderr
    jobs = {j["params"]["model.K"]: j for j in map(json.loads, (tmp_path / "jobs.jsonl").read_text().splitlines())}
    assert jobs[1]["state"] == "COMPLETE" and jobs[3]["state"] == "FAIL" and "K <= F" in jobs[3]["error"]
    assert_run_tree(Path(jobs[1]["run_dir"]))
    res = run_cmd("-m", "sim", "compare", str(tmp_path), f"out={tmp_path / 'cmp'}")
    assert res.returncode == 0, res.stderr[-3000:]
    cells = {r["model.K"]: r for r in read_csv(tmp_path / "cmp" / "summary.csv")}
    assert (cells["1"]["runs"], cells["3"]["runs"], cells["3"]["failed"]) == ("1", "0", "1")


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_ablation_writes_csv_table_and_heatmap_per_cell(ablation_dir):
    runs = read_csv(ablation_dir / "runs.csv")
    assert sorted((r["model.F"], r["model.K"], r["training.seed"]) for r in runs) == [
        ("2", "1", "42"),
        ("4", "1", "42"),
        ("4", "4", "42"),
    ]
    for r in runs:
        run_dir = ablation_dir / f"F{r['model.F']}_K{r['model.K']}" / f"seed{r['training.seed']}"
        assert_run_tree(run_dir)
        assert r["run_dir"] == str(run_dir)

    cells = {(r["model.F"], r["model.K"]): r for r in read_csv(ablation_dir / "summary.csv")}
    assert list(cells) == [("2", "1"), ("2", "4"), ("4", "1"), ("4", "4")]
    assert cells[("2", "4")]["runs"] == "0" and "model.K=4 > model.F=2" in cells[("2", "4")]["note"]
    for (F, K), cell in cells.items():
        if cell["runs"] == "0":
            continue
        best = report.load_run(ablation_dir / f"F{F}_K{K}" / "seed42").best
        for m in report.KEY_METRICS:
            assert float(cell[f"{m}_mean"]) == pytest.approx(best[m])

    table = (ablation_dir / "summary.md").read_text()
    assert "| model.F | model.K | runs | risk_high_recall | action_accuracy | macro_f1 |" in table
    assert "| 2 | 4 | skipped: model.K=4 > model.F=2 |" in table
    f4k4 = cells[("4", "4")]
    assert "| 4 | 4 | 1 | " + " | ".join(f"{float(f4k4[f'{m}_mean']):.3f}" for m in report.KEY_METRICS) + " |" in table
    for png in ("heatmap.png", "curves.png"):
        data = (ablation_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_summary_gives_mean_and_spread_over_seeds():
    def run(F, K, seed, f1):
        return report.Run(
            path=Path(f"F{F}_K{K}/seed{seed}"),
            config={"model.F": F, "model.K": K, "training.seed": seed},
            val=[{"epoch": 1, "macro_f1": f1}],
            train=[],
            best_epoch=1,
            best={"macro_f1": f1},
        )

    runs = [run(8, 2, 0, 0.5), run(8, 2, 1, 0.7), run(8, 2, 2, 0.9), run(4, 2, 0, 0.4)]
    report.assign_groups(runs, ["model.F", "model.K"])
    rows = report.summarize(
        runs,
        ["model.F", "model.K"],
        metrics=["macro_f1"],
        sort=True,
        skipped=[report.Skipped((4, 8), "skipped: K=8 > F=4")],
    )
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
    res = run_cmd("-m", "sim", "ablate", "F=2,4", "K=1,4", "seeds=1", *SMALL, f"out={ablation_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in lasts] == before
    assert (ablation_dir / "summary.csv").read_text() == summary


def test_compare_reads_an_ablation_into_the_same_table(ablation_dir, tmp_path):
    # Several bare directories on the command line are the `dirs` list.
    cells = [str(ablation_dir / c) for c in ("F2_K1", "F4_K1", "F4_K4")]
    res = run_cmd("-m", "sim", "compare", *cells, f"out={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    mine = {(r["model.F"], r["model.K"]): r for r in read_csv(tmp_path / "summary.csv")}
    theirs = {(r["model.F"], r["model.K"]): r for r in read_csv(ablation_dir / "summary.csv") if r["runs"] != "0"}
    assert mine.keys() == theirs.keys()
    for cell in mine:
        assert mine[cell]["macro_f1_mean"] == theirs[cell]["macro_f1_mean"]
    assert (tmp_path / "heatmap.png").is_file() and (tmp_path / "curves.png").is_file()
    assert len(read_csv(tmp_path / "runs.csv")) == 3


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["K=1,2"], "F must be set"),
        (["F=4", "K=1,x"], r"K=\[1, 'x'\]: expected comma-separated integers"),
        (["F=4", "K=2", "model.K=2"], "the ablation sets model.K itself"),
        (["F=4", "K=2", "seeds=0"], "expected a count"),
        (["F=4,0", "K=2"], "expected positive integers"),
    ],
)
def test_ablation_refuses_a_bad_command_line(argv, expected):
    argv = comma_lists(argv, ["F", "K"])  # what `python -m sim ablate` does before Hydra reads the line
    with pytest.raises(ConfigError, match=expected):
        ablate.make_plan(compose("ablate", argv), argv)


def test_ablation_plan_hands_train_overrides_to_every_cell():
    argv = comma_lists(["F=4,8", "K=1,2", "seeds=2", "llm=tiny", "optim.lr=0.01", "out=x"], ["F", "K"])
    cfg = compose("ablate", argv)
    plan = ablate.make_plan(cfg, argv)
    s = int(cfg.training.seed)  # seeds=N counts from the config's seed
    assert (plan.Fs, plan.Ks, plan.seeds, str(plan.out)) == ([4, 8], [1, 2], [s, s + 1], "x")
    assert plan.overrides == ["llm=tiny", "optim.lr=0.01"]
    assert "model.F=4,8" in ablate.command(plan) and f"training.seed={s},{s + 1}" in ablate.command(plan)


def test_compare_and_ablate_refuse_in_one_line(tmp_path):
    res = run_cmd("-m", "sim", "compare", str(tmp_path))
    assert res.returncode == 1 and "no run below it" in res.stderr
    res = run_cmd("-m", "sim", "ablate", "K=1,2")
    assert res.returncode == 1 and "F must be set" in res.stderr


def test_the_variants_sweep_reports_a_row_per_variant_with_its_cost(tmp_path):
    """sweeps/variants.yaml, cut down: two presets of conf/variant, one seed; compare groups by the preset."""
    res = run_cmd(
        "train.py", "-m", "+sweeps=variants", "+variant=v0,queries", "training.seed=0", *SMALL,
        f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = [json.loads(line) for line in (tmp_path / "jobs.jsonl").read_text().splitlines()]
    assert [j["params"]["variant"] for j in jobs] == ["v0", "queries"]
    assert (tmp_path / "queries" / "seed0" / "checkpoints" / "best.pt").is_file()
    res = run_cmd("-m", "sim", "compare", str(tmp_path), f"out={tmp_path / 'cmp'}")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["variant"]: r for r in read_csv(tmp_path / "cmp" / "summary.csv")}
    assert rows.keys() == {"v0", "queries"}
    # 4 query tokens instead of 1: 3 x d more trainable parameters, and the speed of each is reported.
    extra = float(rows["queries"]["trainable_params_mean"]) - float(rows["v0"]["trainable_params_mean"])
    assert extra == 3 * 128  # the tiny LLM's width
    assert all(float(r["samples_per_s_mean"]) > 0 for r in rows.values())
    summary = (tmp_path / "cmp" / "summary.md").read_text()
    assert "| variant | runs |" in summary and "| train samples/s | trainable params |" in summary
