"""`gptnano compare`: budgets that become schedules (steps, validations, warmup, decay), seeds
and the statistics over them, runs that resume instead of training twice, and every mistake
one line before any training."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptnano import files, logs
from gptnano.compare import budgets, command, outputs, runs, stats
from gptnano.errors import UserError
from gptnano.models import GPT, RNN
from tests.helpers import cli_env, make_text, posix_only, terminal_signals

TINY = {  # two architectures small enough that a fit of a few dozen steps takes a second
    "gpt": {"class_path": "gptnano.models.GPT",
            "init_args": {"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}},
    "rnn": {"class_path": "gptnano.models.RNN",
            "init_args": {"block_size": 16, "n_layer": 1, "n_embd": 16, "n_hidden": 24}},
}


def write_configs(folder: Path) -> list[str]:
    (folder / "tiny.txt").write_text(make_text(), encoding="utf-8")
    names = []
    for name, net in TINY.items():
        config = {"model": {"net": net, "warmup_steps": 2},
                  "data": {"path": "tiny.txt", "batch_size": 4, "eval_batch_size": 256},
                  "trainer": {"enable_model_summary": False}}
        (folder / f"{name}.yaml").write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
        names.append(f"{name}.yaml")
    return names


# ----- budgets become schedules -----------------------------------------------------------
def test_budgets_are_read_with_their_units():
    parse = budgets.parse_budget
    assert (parse("2000steps").kind, parse("2000steps").amount) == ("steps", 2000)
    assert (parse("20Mtok").kind, parse("20Mtok").amount) == ("tokens", 20e6)
    assert (parse("5e13flop").kind, parse("5e13flop").amount) == ("flops", 5e13)
    assert (parse("5min").kind, parse("5min").amount) == ("seconds", 300)
    assert parse("1.5h").amount == 5400 and parse("300s").amount == 300 and parse("2kstep").amount == 2000
    assert parse("5min").machine_dependent and not parse("5e13flop").machine_dependent
    for bad in ("5", "5 minutes", "fast", "-3steps", "0tok", "2.5steps", ""):
        with pytest.raises(UserError, match="bad --budget"):
            parse(bad)


@pytest.mark.parametrize("target", [4, 37, 113.4, 2000, 2003, 4415.2, 98765.4])
def test_the_last_step_is_a_validation_and_the_steps_fit_the_budget(target):
    steps, every = budgets.validation_grid(target, 10)
    assert steps % every == 0  # the final validation loss is that of the finished schedule
    assert abs(steps - target) <= max(1, 0.002 * target)
    assert target <= 10 and every == 1 or 5 <= steps // every <= 20


def test_a_flop_budget_gives_steps_in_inverse_proportion_to_flops_per_token():
    gpt = GPT(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    rnn = RNN(vocab_size=65, block_size=64, n_layer=2, n_embd=64, n_hidden=80)
    budget = budgets.parse_budget("1e13flop")
    plans = [budgets.plan(budget, tokens_per_step=24 * 64, flops_per_token=net.flops_per_token(), warmup=100,
                          validations=10, label="x") for net in (gpt, rnn)]
    assert rnn.flops_per_token() < gpt.flops_per_token() / 2
    ratio = plans[1].steps / plans[0].steps
    assert ratio == pytest.approx(gpt.flops_per_token() / rnn.flops_per_token(), rel=0.005)
    assert all(p.flops == pytest.approx(1e13, rel=0.005) for p in plans)
    # Warmup keeps the config's, up to a tenth of the run; the decay ends at the last step (fit_argv).
    assert plans[0].warmup == 100 and budgets.plan(budgets.parse_budget("300steps"), tokens_per_step=1,
                                                   flops_per_token=1, warmup=100, validations=10, label="x").warmup == 30
    with pytest.raises(UserError, match="less than one optimizer step of x"):
        budgets.plan(budgets.parse_budget("1e6flop"), tokens_per_step=1536, flops_per_token=5e6, warmup=0,
                     validations=10, label="x")


def test_a_wall_time_budget_is_filled_by_steps_and_validations():
    probe = budgets.Probe(step_s=0.05, validation_s=1.5)
    plan = budgets.fit_to_time(budgets.parse_budget("5min"), probe, tokens_per_step=1536, flops_per_token=5e6,
                               warmup=100, validations=10)
    assert plan.predicted_s == pytest.approx(300, rel=0.01) and plan.steps % plan.val_every == 0
    assert plan.steps * 0.05 + plan.validations * 1.5 == pytest.approx(300, rel=0.01)
    slower = budgets.fit_to_time(budgets.parse_budget("5min"), probe, tokens_per_step=1536, flops_per_token=5e6,
                                 warmup=100, validations=10, slowdown=1.1)  # the runs done so far took 10 % longer
    assert slower.steps < plan.steps and slower.predicted_s == pytest.approx(300, rel=0.01)
    with pytest.raises(UserError, match="too short"):
        budgets.fit_to_time(budgets.parse_budget("10s"), probe, tokens_per_step=1, flops_per_token=1, warmup=0,
                            validations=10)


def test_an_entry_s_later_seeds_are_planned_from_its_first_seed_s_real_pace():
    """Before: each seed was planned from its own probe, which swung 35 % between seeds of one entry
    (378 to 744 steps for a 60 s budget), so seeds differed by their probes, not their seeds."""
    from types import SimpleNamespace

    from gptnano.compare.comparison import Comparison

    def run(label, done, train_s=None, slowdown=1.2):  # planned: 500 steps x 0.09 s + 5 validations x 1 s = 50 s
        curve = [[100 * i, 10.0 * i, 2.0] for i in range(1, 6)]
        record = {"plan": {"predicted_s": 50.0 * slowdown, "steps": 500},
                  "result": {"train_s": train_s, "steps": 500, "curve": curve},
                  "pace": {"probe": {"step_s": 0.09, "validation_s": 1.0}, "slowdown": slowdown}}
        return SimpleNamespace(point=SimpleNamespace(label=label), done=done, record=record)

    point = SimpleNamespace(label="gpt")
    assert Comparison.entry_pace(SimpleNamespace(runs=[run("gpt", False), run("rnn", True, 70.0)]), point) == (None, 1.0)
    probe, ratio = Comparison.entry_pace(SimpleNamespace(runs=[run("gpt", True, 75.0), run("gpt", True, 65.0, 1.0),
                                                               run("rnn", True, 500.0)]), point)
    assert probe == budgets.Probe(step_s=0.09, validation_s=1.0)
    assert ratio == pytest.approx(75.0 / 50.0)  # the (upper) median, against what the probe alone predicted
    # A run that planned itself again (TimeBudget) and trained 1000 steps and its 5 validations in 75 s, where
    # the probe prices those at 1000 x 0.09 + 5 x 1 = 95 s: 75 / 95, whatever its first plan. (Per step against
    # the first plan, 0.075 / 0.1 = 0.75, its validations' time spread over the first plan's 500 steps.)
    replanned = run("gpt", True, 75.0)
    replanned.record["result"]["steps"] = 1000
    assert Comparison.entry_pace(SimpleNamespace(runs=[replanned]), point)[1] == pytest.approx(75.0 / 95.0)
    del replanned.record["result"]["curve"]  # a record without its curve: per step, as before
    assert Comparison.entry_pace(SimpleNamespace(runs=[replanned]), point)[1] == pytest.approx(0.75)
    plan = budgets.fit_to_time(budgets.parse_budget("60s"), probe, tokens_per_step=1536, flops_per_token=5e6,
                               warmup=10, validations=4, slowdown=ratio)
    assert plan.predicted_s == pytest.approx(60, rel=0.1)
    # The correction for a new entry's first run: real over the probe alone, never over a plan that already
    # carried a correction (a run planned with 1.2 that trained its 60 s took 1.2x what its probe said).
    assert Comparison.slowdown(SimpleNamespace(runs=[run("rnn", True, 60.0), run("gpt", False)])) == pytest.approx(1.2)
    assert Comparison.slowdown(SimpleNamespace(runs=[])) == 1.0


def test_the_probe_times_real_steps():
    net = {"class_path": "gptnano.models.GPT", "init_args": {**TINY["gpt"]["init_args"], "vocab_size": 11}}
    settings = dict(optimizer="muon", learning_rate=4e-3, weight_decay=0.1, beta1=0.9, beta2=0.99, muon_lr=0.02,
                    muon_momentum=0.95, muon_weight_decay=0.0, muon_dtype="float32")
    probe = budgets.probe_run(net, settings, device="cpu", precision="32-true", batch_size=4, block_size=16,
                              eval_batch_size=8, eval_batches=3, seconds=0.2)
    assert 0 < probe.step_s < 1 and 0 < probe.validation_s < 10


# ----- seeds and statistics ---------------------------------------------------------------
def entry(losses: list[float]) -> dict:
    return {"final_val_loss": stats.spread(losses)}


def test_entries_are_told_apart_only_beyond_two_standard_errors():
    a, b, c = entry([1.50, 1.51, 1.52]), entry([1.505, 1.515, 1.525]), entry([1.60, 1.61, 1.62])
    assert a["final_val_loss"]["std"] == pytest.approx(0.01)
    assert stats.distinguishable(a, b)[0] is False  # 0.005 apart, 2 SE = 0.016
    assert stats.distinguishable(a, c)[0] is True
    ranked = stats.ranking({"c": c, "b": b, "a": a})
    assert [label for label, _, _ in ranked] == ["a", "b", "c"]
    assert "not distinguishable at 3 seeds" in ranked[1][2] and "SE)" in ranked[2][2]
    one = stats.ranking({"x": entry([1.5]), "y": entry([1.6])})
    assert "not distinguishable at 1 seed" in one[1][2]  # one seed has no spread to judge by


def test_two_seeds_draw_different_training_windows():
    from gptnano.data.windows import TrainWindows

    ids = torch.arange(5000)
    first = [TrainWindows(ids, 16, 4, seed, 0, lambda: 0).batch(0)[0] for seed in (0, 1)]
    assert not torch.equal(first[0], first[1])


def test_a_resumed_run_keeps_one_point_per_validation():
    # Validations every 10 steps; stopped at step 25 after its last checkpoint at step 20, the
    # resumed part retrains 21-25 and validates again from step 30.
    before = {"series": {"val/loss": [(100.0, 10, 2.0), (110.0, 20, 1.8)]}}
    after = {"series": {"val/loss": [(500.0, 30, 1.7), (510.0, 40, 1.6)]}}
    points = stats.curve([before, after], train_s=45.0, steps=40)
    assert [s for s, _, _ in points] == [10, 20, 30, 40] and points[-1][1] == 45.0
    assert all(b[1] > a[1] for a, b in zip(points, points[1:]))  # the time between stop and resume is left out
    stale = {"series": {"val/loss": [(100.0, 10, 2.0), (110.0, 20, 1.8), (120.0, 30, 9.9)]}}  # 30 was retrained
    assert [v for _, _, v in stats.curve([stale, after], 45.0, 40)] == [2.0, 1.8, 1.7, 1.6]


# ----- the command line -------------------------------------------------------------------
def test_fit_flags_pass_through_and_grids_form_their_product():
    own, fit = command.split_argv(["a.yaml", "--budget", "5min", "--model.dropout", "0.1", "b.yaml",
                                   "--grid=model.muon_lr=1,2", "--trainer.precision=32-true", "--model.x", "-1"])
    assert own == ["a.yaml", "--budget", "5min", "b.yaml", "--grid=model.muon_lr=1,2"]
    assert fit == ["--model.dropout", "0.1", "--trainer.precision=32-true", "--model.x", "-1"]
    grid = runs.parse_grid(["model.muon_lr=0.01,0.02", "model.init_args.warmup_steps=10,20"])
    points = runs.make_points(["configs/gpt.yaml"], grid)
    assert [p.label for p in points] == ["gpt-muon_lr=0.01,warmup_steps=10", "gpt-muon_lr=0.01,warmup_steps=20",
                                         "gpt-muon_lr=0.02,warmup_steps=10", "gpt-muon_lr=0.02,warmup_steps=20"]
    assert points[3].flags() == ["--model.muon_lr", "0.02", "--model.warmup_steps", "20"]


def one_line(ran) -> str:
    assert ran.returncode == 2, ran
    errors = ran.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("gptnano: error: "), ran.stderr
    return errors[0]


def test_mistakes_are_one_line_before_anything_runs(gptnano, tmp_path):
    configs = write_configs(tmp_path)
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n", encoding="utf-8")
    run = lambda *args: one_line(gptnano(["compare", *args], tmp_path))  # noqa: E731
    assert "bad --budget '5 minutes'" in run(*configs, "--budget", "5 minutes")
    assert "--trainer.max_steps is set by compare" in run(*configs, "--budget", "5steps", "--trainer.max_steps", "9")
    assert "--seed_everything is set by compare" in run(*configs, "--budget", "5steps", "--seed_everything=3")
    assert "--ckpt_path is set by compare" in run(*configs, "--budget", "5steps", "--ckpt_path", "last")
    assert "--grid data.seed: set by compare" in run(*configs, "--budget", "5steps", "--grid", "data.seed=1,2")
    assert "bad --grid" in run(*configs, "--budget", "5steps", "--grid", "model.muon_lr")
    assert "broken.yaml is not a readable YAML config" in run("broken.yaml", "--budget", "5steps")
    assert "config not found: nope.yaml" in run("nope.yaml", "--budget", "5steps")
    assert "--parallel 2 runs one run per GPU" in run(*configs, "--budget", "5steps", "--parallel", "2")
    assert "--seeds 0" in run(*configs, "--budget", "5steps", "--seeds", "0")
    assert not (tmp_path / "compare").exists()


def test_a_key_no_config_accepts_is_one_line_before_any_training(tmp_path):
    configs = write_configs(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "gptnano", "compare", *configs, "--budget", "4steps", "--grid",
                           "model.net.n_head=1,2"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "gptnano: error: rnn.yaml --grid model.net.n_head=1: Parser key \"model.net\": Problem with given class_path "
        "'gptnano.models.RNN': Option 'n_head' is not accepted"], proc.stderr
    assert not (tmp_path / "compare").exists()


def test_a_dry_run_shows_a_2x2_grid_and_flop_budgets_without_training(tmp_path):
    configs = write_configs(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "gptnano", "compare", *configs, "--budget", "2e8flop", "--seeds", "2",
                           "--grid", "model.learning_rate=1e-3,2e-3", "--grid", "model.min_lr=1e-5,1e-4", "--dry_run"],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()[2:] if line.startswith("|")]
    assert len(rows) == 8 and len({r[0] for r in rows}) == 8  # 2 configs x 2 x 2 grid points
    assert sum(r[0].startswith("gpt-") for r in rows) == 4
    by_arch = {r[0].split("-")[0]: (float(r[2]), int(r[4])) for r in rows}  # FLOPs per token, steps
    (gpt_fpt, gpt_steps), (rnn_fpt, rnn_steps) = by_arch["gpt"], by_arch["rnn"]
    assert gpt_steps * gpt_fpt == pytest.approx(rnn_steps * rnn_fpt, rel=0.01) and gpt_fpt != rnn_fpt
    assert not (tmp_path / "compare").exists()  # a dry run writes nothing


# ----- the real thing ---------------------------------------------------------------------
def start_compare(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gptnano", "compare", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=terminal_signals if os.name == "posix" else None)


def test_compare_writes_mean_and_spread_and_resumes_instead_of_training_twice(tmp_path):
    configs = write_configs(tmp_path)
    args = [*configs, "--budget", "40steps", "--seeds", "2", "--validations", "2", "--name", "t"]
    folder = tmp_path / "compare" / "t"
    # Killed (compare and its fit, at once) while the second run trains, after its checkpoint at the
    # validation halfway.
    proc = start_compare(args, tmp_path)
    second = folder / "checkpoints" / "rnn-s0" / "last.ckpt"  # seed by seed: gpt-s0, rnn-s0, gpt-s1, ...
    deadline = time.monotonic() + 300
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    first = folder / "checkpoints" / "gpt-s0" / "last.ckpt"
    first_written = first.stat().st_mtime_ns
    assert json.loads((folder / "runs" / "gpt-s0.json").read_text())["status"] == "done"
    assert json.loads((folder / "runs" / "rnn-s0.json").read_text())["status"] == "started"
    assert not (folder / "runs" / "gpt-s1.json").exists()

    again = start_compare(args, tmp_path)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert "run 2/4 rnn-s0 | resuming from step" in err and "run 1/4" not in err  # the finished run is not trained again
    assert first.stat().st_mtime_ns == first_written
    assert len(logs.versions(folder / "lightning_logs" / "rnn-s0")) == 2  # resumed: a second version of its logs
    assert [p.name for p in logs.versions(folder / "lightning_logs" / "gpt-s0")] == ["version_0"]

    report = json.loads((folder / "results.json").read_text())
    assert set(report["entries"]) == {"gpt", "rnn"} and len(report["runs"]) == 4 and "cpu" in report["machine"]
    for e in report["entries"].values():
        f = e["final_val_loss"]
        assert f["n"] == 2 and f["std"] > 0 and f["min"] <= f["mean"] <= f["max"] and e["steps"] == 40
    for run in report["runs"]:
        assert [p[0] for p in run["result"]["curve"]] == [20, 40]
        assert run["result"]["train_s"] > 0 and "cpu" in run["machine"]
    resumed = next(r for r in report["runs"] if r["run"] == "rnn-s0")
    assert resumed["resumed_at"] and 20 <= resumed["resumed_at"][0] <= 40
    md = (folder / "results.md").read_text()
    assert " ± " in md and "| 1 |" in md and "| 2 |" in md and md in out
    assert (folder / "results.png").read_bytes()[:4] == b"\x89PNG"
    # The seeds set seed_everything and data.seed together: different initialisation and windows.
    import yaml

    saved = [yaml.safe_load((folder / "lightning_logs" / f"gpt-s{s}" / "version_0" / "config.yaml").read_text())
             for s in (0, 1)]
    assert [(c["seed_everything"], c["data"]["seed"]) for c in saved] == [(0, 0), (1, 1)]

    # A command whose runs would differ (here: another dropout for every run) is refused before any training.
    changed = start_compare([*args, "--model.net.dropout", "0.1"], tmp_path)
    _, err = changed.communicate(timeout=300)
    assert changed.returncode == 2 and err.strip().splitlines() == [
        f"gptnano: error: {Path('compare', 't')} holds run gpt-s0 of another command (its configuration, budget, "
        f"seed or text differ): give another --name, or delete {Path('compare', 't')}"]
    assert first.stat().st_mtime_ns == first_written


def test_a_wall_time_run_plans_its_steps_again_from_its_own_pace(tmp_path):
    """Before: a wall-time run trained the steps compare's probe planned, and a probe 35 % off the run's
    real pace (seen on a shared 2-core CPU) gave it 33 s of a 60 s budget. Now each run gets TimeBudget on
    the training clock: it plans again from its own steps, its schedule decays over what it planned,
    and compare reads the steps it ended at from its checkpoint."""
    configs = write_configs(tmp_path)
    folder = tmp_path / "compare" / "t"
    proc = subprocess.run([sys.executable, "-m", "gptnano", "compare", configs[0], "--budget", "20s", "--seeds", "1",
                           "--validations", "2", "--name", "t", "--model.optimizer", "adamw", "--data.val_tokens",
                           "2048"], cwd=tmp_path,
                          env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((folder / "runs" / "gpt-s0.json").read_text())
    argv = record["argv"]
    assert argv[argv.index("--model.lr_decay_steps") + 1] == "null"  # a config's own would not fit the plan
    budget = [json.loads(a.split("=", 1)[1]) for a in argv if "TimeBudget" in a]
    assert budget == [{"class_path": "gptnano.train.budget.TimeBudget",
                       "init_args": {"minutes": 20 / 60, "validations": 2, "margin": 0.0, "clock": "training"}}]
    ckpt = torch.load(folder / "checkpoints" / "gpt-s0" / "last.ckpt", weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("TimeBudget"))
    steps = state["planned"]
    assert ckpt["global_step"] == steps == record["result"]["steps"] and state["trained_s"] > 0
    assert record["result"]["curve"][-1][0] == steps and steps % state["every"] == 0
    min_lr = ckpt["hyper_parameters"]["min_lr"]
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(min_lr)  # decayed over its plan
    report = json.loads((folder / "results.json").read_text())
    assert report["entries"]["gpt"]["steps"] == steps
    assert report["entries"]["gpt"]["tokens"] == steps * record["plan"]["tokens_per_step"]


def test_a_run_is_known_by_its_configuration_budget_seed_and_text():
    config = {"model": {"learning_rate": 1e-3, "lr_decay_steps": None}, "seed_everything": 1337, "run_name": "gpt",
              "trainer": {"max_steps": 1000, "enable_progress_bar": True}, "data": {"seed": 1337, "batch_size": 4}}
    budget = budgets.parse_budget("5e13flop")
    h = runs.config_hash(config, budget, 0, 10, "abc")
    # What compare sets for each run, and what measures nothing, is not part of it ...
    same = {**config, "seed_everything": 7, "run_name": "x", "trainer": {"max_steps": 5, "enable_progress_bar": False},
            "data": {"seed": 7, "batch_size": 4}}
    assert runs.config_hash(same, budget, 0, 10, "abc") == h
    # ... everything else is.
    assert runs.config_hash({**config, "model": {"learning_rate": 2e-3}}, budget, 0, 10, "abc") != h
    assert runs.config_hash(config, budgets.parse_budget("5e13tok"), 0, 10, "abc") != h
    assert runs.config_hash(config, budget, 1, 10, "abc") != h
    assert runs.config_hash(config, budget, 0, 5, "abc") != h
    assert runs.config_hash(config, budget, 0, 10, "abd") != h


def test_another_budget_in_the_same_folder_is_refused_at_once(gptnano, tmp_path):
    configs = write_configs(tmp_path)
    folder = tmp_path / "compare" / "t"
    folder.mkdir(parents=True)
    (folder / "compare.json").write_text(json.dumps({"budget": "40steps", "validations": 2}))
    error = one_line(gptnano(["compare", *configs, "--budget", "30steps", "--validations", "2", "--name", "t"],
                             tmp_path))
    assert error == (f"gptnano: error: {Path('compare', 't')} holds runs of another command (--budget 40steps, "
                     f"--validations 2): give another --name, or delete {Path('compare', 't')}")


def test_every_run_of_a_comparison_gets_the_planned_device():
    """Where the machine has an accelerator and no --trainer.accelerator is given, each fit would time
    it against the CPU on its own; compare hands every run the device it planned for instead."""
    assert runs.pinned_accelerator({}, "mps") == "mps"
    assert runs.pinned_accelerator({"accelerator": "auto"}, "cuda") == "cuda"
    assert runs.pinned_accelerator({"accelerator": "cpu"}, "cpu") is None  # the user's
    assert runs.pinned_accelerator({"accelerator": "mps"}, "mps") is None  # typed: it stands as typed
    assert runs.pinned_accelerator({}, "cpu") is None  # nothing to choose between


# ----- a failed run is a result (issue 27, item 2) ----------------------------------------
def results(folder: Path) -> tuple[dict, str]:
    return json.loads((folder / "results.json").read_text()), (folder / "results.md").read_text()


def test_a_diverging_grid_point_is_a_result_and_the_other_runs_go_on(tmp_path):
    """Before: the first diverging run stopped the whole comparison (exit 2), and a rerun trained
    it again, to diverge again."""
    configs = write_configs(tmp_path)
    args = [configs[0], "--budget", "20steps", "--seeds", "1", "--validations", "2", "--name", "t",
            "--grid", "model.learning_rate=1e30,3e-3"]
    folder, log = tmp_path / "compare" / "t", tmp_path / "compare" / "t" / "logs" / "gpt-learning_rate=1e30-s0.log"
    first = start_compare(args, tmp_path)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 1, err  # results written, with a failure
    assert re.search(r"failed 1/2 gpt-learning_rate=1e30-s0 \| diverged at step \d+", err), err
    assert "done 2/2 gpt-learning_rate=3e-3-s0" in err  # the other run went on
    report, md = results(folder)
    assert [r["entry"] for r in report["ranking"]] == ["gpt-learning_rate=3e-3"]  # the failed entry is not ranked
    failure = report["not_ranked"]["gpt-learning_rate=1e30"]["failures"][0]["failure"]
    assert re.fullmatch(r"diverged at step \d+", failure) and f"| s0: {failure} | 0/1 |" in md
    assert md.index("| 1 | gpt-learning_rate=3e-3 |") < md.index("## Failed runs")  # listed below the ranking
    assert json.loads((folder / "runs" / "gpt-learning_rate=1e30-s0.json").read_text())["status"] == "failed"

    again = start_compare(args, tmp_path)  # the same command keeps the failure: nothing is trained again
    _, err = again.communicate(timeout=600)
    assert again.returncode == 1 and "run 1/2" not in err and "1 done | 1 failed" in err, err
    assert log.read_text().count("$ gptnano fit") == 1

    retried = start_compare([*args, "--retry_failed"], tmp_path)
    _, err = retried.communicate(timeout=600)
    assert retried.returncode == 1 and "run 1/2 gpt-learning_rate=1e30-s0 | retrying" in err, err
    assert "run 2/2" not in err and log.read_text().count("$ gptnano fit") == 2


def test_a_failed_seed_keeps_its_entry_out_of_the_ranking_and_its_finished_seeds_are_shown():
    def finished(losses):
        return {"final_val_loss": stats.spread(losses), "seeds": list(range(len(losses)))}

    report = {"name": "x", "seeds": 3, "budget_text": "40steps", "budget": "40 optimizer steps per run",
              "texts": [{"file": "input.txt", "sha256": "86c4e6aa"}], "precision": "32-true", "machine_line": "cpu",
              "entries": {}, "not_ranked": {"gpt": {"seeds": 3, "finished": finished([1.5, 1.7]), "failures": [
                  {"run": "gpt-s2", "seed": 2, "failure": "diverged at step 7"}]}}}
    md = outputs.markdown(report)
    assert "No entry finished all its seeds." in md and "Text: input.txt (sha256 86c4e6aa)." in md
    assert "| gpt | s2: diverged at step 7 | 2/3 (0, 1) | 1.6000 ± 0.1414 |" in md
    assert runs.failure("training stopped: the loss became non-finite at step 12 (lower it)", "x", 2) == \
        "diverged at step 12"
    assert runs.failure("could not write ckpt: disk full", "x", 2) == "could not write ckpt: disk full"
    assert runs.failure(None, "RuntimeError: boom", 1) == "exit 1: RuntimeError: boom"
    assert [runs.stopped_by_signal(c) for c in (130, 143, 129, -9, -15, 2, 1, 0)] == [True] * 5 + [False] * 3


# ----- one comparison, one runner (item 3) ------------------------------------------------
@posix_only("SIGHUP")
def test_a_second_runner_is_refused_naming_the_first_which_a_hangup_stops_to_resume(tmp_path):
    """Before: the second launch trained the same run beside the first and died on "already holds a
    run" inside it."""
    configs = write_configs(tmp_path)
    args = [configs[0], "--budget", "5000steps", "--seeds", "1", "--validations", "1000", "--name", "t"]
    folder, log = tmp_path / "compare" / "t", tmp_path / "compare" / "t" / "logs" / "gpt-s0.log"
    first = start_compare(args, tmp_path)
    try:
        deadline = time.monotonic() + 300  # training, once it has checkpointed at its first validation
        while not (folder / "checkpoints" / "gpt-s0" / "last.ckpt").exists() and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.1)
        second = start_compare(args, tmp_path)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2 and re.fullmatch(
            rf"gptnano: error: compare{re.escape(os.sep)}t is being run by process {first.pid} \(started [^)]+\): "
            r"wait for it, or stop it", err.strip()), err
        assert log.read_text().count("$ gptnano fit") == 1  # nothing trained twice
        first.send_signal(signal.SIGHUP)  # the terminal closed: compare hands the hangup to its fit
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 129 and "stopped by SIGHUP during run 1/1 gpt-s0" in err, err
    record = json.loads((folder / "runs" / "gpt-s0.json").read_text())
    assert record["stops"] == [{"signal": "SIGHUP", "exit": 129}]  # the fit stopped on it, saving last.ckpt
    assert record["status"] == "started"  # interrupted, not failed: a rerun resumes it
    with files.lock(folder / "runner.lock", busy=lambda: "still held"):  # released with its holder
        pass


# ----- a config cannot cut a budget short (item 4) -----------------------------------------
def test_settings_that_would_end_a_run_early_are_turned_off_or_refused():
    assert runs.turned_off({"trainer": {"max_steps": 1000, "val_check_interval": 250, "max_epochs": -1,
                                        "limit_train_batches": 1.0, "logger": None}}) == {}
    found = runs.turned_off({"early_stopping": {"stopping_threshold": 1.5, "patience": 10},
                             "trainer": {"max_time": "00:00:05:00", "max_epochs": 3, "limit_train_batches": 1,
                                         "default_root_dir": "elsewhere",
                                         "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger"}}})
    assert found == {"early_stopping.stopping_threshold": 1.5, "trainer.max_time": "00:00:05:00",
                     "trainer.max_epochs": 3, "trainer.limit_train_batches": 1, "trainer.default_root_dir": "elsewhere",
                     "trainer.logger": "CSVLogger"}
    for config, said in [({"trainer": {"fast_dev_run": True}}, "trainer.fast_dev_run=True: it trains a few steps"),
                         ({"trainer": {"overfit_batches": 2}}, "trainer.overfit_batches=2"),
                         ({"trainer": {"limit_val_batches": 1}}, "trainer.limit_val_batches=1: each run's final loss"),
                         ({"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.EarlyStopping"}]}},
                          "trainer.callbacks has lightning.pytorch.callbacks.EarlyStopping: it can stop a run"),
                         ({"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.Timer",
                                                      "init_args": {"duration": "00:00:01:00"}}]}}, "its duration"),
                         ({"trainer": {"callbacks": [{"class_path": "gptnano.train.budget.TimeBudget",
                                                      "init_args": {"minutes": 5.0}}]}}, "use --budget")]:
        with pytest.raises(UserError, match=re.escape(said)):
            runs.turned_off(config)
    assert runs.turned_off({"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.Timer",
                                                       "init_args": {"duration": None}}]}}) == {}


def test_a_setting_compare_cannot_turn_off_is_one_line_before_any_training(gptnano, tmp_path):
    configs = write_configs(tmp_path)
    gpt = json.loads((tmp_path / configs[0]).read_text())
    gpt["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.EarlyStopping",
                                    "init_args": {"monitor": "val/loss"}}]
    (tmp_path / "stops.yaml").write_text(json.dumps(gpt))
    assert one_line(gptnano(["compare", "stops.yaml", "--budget", "20steps"], tmp_path)) == (
        "gptnano: error: stops.yaml: trainer.callbacks has lightning.pytorch.callbacks.EarlyStopping: it can stop a "
        "run before its budget; leave it out of a comparison")
    assert "gpt.yaml: trainer.fast_dev_run=True" in one_line(
        gptnano(["compare", configs[0], "--budget", "20steps", "--trainer.fast_dev_run", "true"], tmp_path))
    assert not (tmp_path / "compare").exists()


def test_a_config_s_early_stopping_cannot_cut_the_budget_short(tmp_path):
    """Before: the threshold stopped each run at its first validation and compare failed; each rerun
    advanced one validation."""
    configs = write_configs(tmp_path)
    gpt = json.loads((tmp_path / configs[0]).read_text())
    gpt["early_stopping"] = {"stopping_threshold": 100.0}  # every validation loss is below it
    gpt["trainer"]["max_epochs"] = 1  # and an epoch of this text is shorter than the budget
    (tmp_path / "early.yaml").write_text(json.dumps(gpt))
    proc = start_compare(["early.yaml", "--budget", "400steps", "--seeds", "1", "--validations", "2", "--name", "t"],
                         tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert ("turned off, so that every run trains for its whole budget: early_stopping.stopping_threshold, "
            "trainer.max_epochs (early.yaml)") in err
    report, _ = results(tmp_path / "compare" / "t")
    assert [p[0] for p in report["runs"][0]["result"]["curve"]] == [200, 400]


# ----- results that travel, and trends over a grid (items 5 and 6) ------------------------------
def test_results_name_no_folder_of_this_machine_and_draw_loss_against_size(tmp_path):
    """Before: results.md and results.json named the text, and the command, by absolute paths."""
    work, texts = tmp_path / "work", tmp_path / "texts"
    work.mkdir()
    configs = write_configs(work)
    texts.mkdir()
    (texts / "tiny.txt").write_text(make_text(), encoding="utf-8")
    sha = hashlib.sha256((texts / "tiny.txt").read_bytes()).hexdigest()
    proc = start_compare([str(work / configs[0]), "--budget", "20steps", "--seeds", "1", "--validations", "2",
                          "--name", "t", "--data.path", str(texts / "tiny.txt"), "--grid", "model.net.n_embd=8,16"],
                         work)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    folder = work / "compare" / "t"
    report, md = results(folder)
    for text in (md, (folder / "results.json").read_text()):
        assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text
    assert report["texts"] == [{"file": "tiny.txt", "sha256": sha}] and f"Text: tiny.txt (sha256 {sha})." in md
    assert report["command"][2:] == ["gpt.yaml", "--budget", "20steps", "--seeds", "1", "--validations", "2", "--name",
                                     "t", "--data.path", "tiny.txt", "--grid", "model.net.n_embd=8,16"]
    assert {r["facts"]["text"] for r in report["runs"]} == {"tiny.txt"}
    # An iso-budget curve: loss against parameters, one budget, smallest first.
    [curve] = report["iso_budget"]
    assert curve["config"] == "gpt" and [p["entry"] for p in curve["points"]] == ["gpt-n_embd=8", "gpt-n_embd=16"]
    assert curve["points"][0]["params"] < curve["points"][1]["params"]
    assert "## Loss against size at this budget" in md and "### gpt" in md and "training FLOPs |" in md
    assert (folder / "results_scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_a_curve_follows_the_sizes_of_each_config_at_each_other_grid_value():
    def entry(config, grid, params, loss):
        return {"config": config, "grid": grid, "params": params, "flops": 1e12, "final_val_loss": stats.spread([loss])}

    entries = {f"{c}-n_embd={n},lr={lr}": entry(c, {"model.net.n_embd": n, "model.learning_rate": lr},
                                                 (2 if c == "rnn" else 3) * int(n) ** 2, 2 - int(n) / 100)
               for c in ("gpt", "rnn") for n in ("16", "32", "8") for lr in ("1e-3", "2e-3")}
    assert stats.size_keys(entries) == ["model.net.n_embd"]
    curves = stats.iso_budget(entries)
    assert [(c["config"], c["fixed"]) for c in curves] == [(c, {"model.learning_rate": lr}) for c in ("gpt", "rnn")
                                                           for lr in ("1e-3", "2e-3")]
    assert [p["params"] for p in curves[0]["points"]] == [192, 768, 3072]
    assert stats.iso_budget({k: e for k, e in entries.items() if "n_embd=16" in k}) == []  # one size: no curve
    assert not stats.differ_in_flops(entries)
    rounded = {k: {**e, "flops": f} for (k, e), f in zip(entries.items(), [2.99e12, 3.0e12, 3.05e12] * 4)}
    assert not stats.differ_in_flops(rounded)  # a FLOP budget, rounded to whole steps: no FLOP axis
    assert stats.differ_in_flops({**rounded, "big": {**entries[next(iter(entries))], "flops": 6e12}})
    # RoPE drops the learned position table, so its entries are smaller, but a switch is not a size
    switch = {f"gpt-rope={r}": entry("gpt", {"model.net.rope": r}, 802_000 if r == "true" else 810_000, 1.7)
              for r in ("false", "true")}
    assert stats.size_keys(switch) == [] and stats.iso_budget(switch) == []


def test_a_path_is_shown_relative_to_the_working_folder_or_by_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inside = str(tmp_path / "configs" / "gpt.yaml")
    assert outputs.portable(inside) == os.path.join("configs", "gpt.yaml")
    assert outputs.portable("--data.path=/srv/corpora/shakespeare/input.txt") == "--data.path=input.txt"
    assert outputs.portable('{"save_dir": "/home/me/x/logs", "name": "a"}') == '{"save_dir": "logs", "name": "a"}'
    kept = "compare/t/logs/gpt-s0.log: 12.3k tok/s, val/loss 1/4 ../data/input.txt"
    assert outputs.portable(kept) == kept


def test_the_seed_band_ends_at_every_seed_s_final_validation():
    """Under a wall-time budget each run plans its own validations, so seeds may validate once more or
    less: the band is counted from the end, and its last point is the mean of the final losses."""
    xs, mean, low, high = outputs.band([[(1, 3.0), (2, 2.0), (3, 1.0)], [(1, 3.2), (3, 1.2)]])
    assert list(xs) == [1.5, 3.0] and list(mean) == pytest.approx([2.6, 1.1])
    assert list(low) == [2.0, 1.0] and list(high) == [3.2, 1.2]


def test_a_run_s_planned_steps_are_its_time_budget_s_when_it_has_one():
    """A wall-time run resumed said 'resuming from step 218 of 560', compare's first plan, while the run
    had planned 436 itself: the steps it plans are read from its checkpoint."""
    assert stats.planned_steps({"callbacks": {"TimeBudget{'minutes': 0.5}": {"planned": 436, "every": 109},
                                              "Timer": {}}}, 560) == 436
    assert stats.planned_steps({"callbacks": {"Timer": {}}}, 560) == 560  # steps, tokens, FLOPs budgets
    assert stats.planned_steps({"callbacks": {"TimeBudget": {"planned": None}}}, 560) == 560  # before its first plan
