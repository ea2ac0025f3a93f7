"""TimeBudget (gptnano/train/budget.py): a fit planned from its own pace to end within a budget,
its learning rate decaying over the planned steps, the last validation at the last step."""

import time

import pytest
import torch

from gptnano.errors import UserError
from gptnano.train import budget
from tests.helpers import TINY_GPT, make_text


def test_the_plan_fills_the_budget_with_whole_validation_intervals():
    # 100 s left at 0.1 s a step after 4 validations of 2.5 s: 900 more steps after step 30
    assert budget.plan(30, 0.1, 2.5, 100.0, 4) == (928, 232)  # floor(930 / 4) = 232, 4 x 232
    assert budget.plan(30, 0.1, 0.0, 100.0, 1) == (1030, 1030)
    # spent already: stop at the next validation point, never before the steps taken
    # later in a run only the validations still to come cost time: at step 500 of validations every 166,
    # three are done (166, 332, 498) and one is left, at 664 (counting all four would stop at 620)
    assert budget.plan(500, 0.1, 2.0, 20.0, 4) == (664, 166)
    # ... and one at ``step`` itself is still to come when the plan is made before it (the probe's)
    assert budget.plan(500, 0.1, 2.0, 20.0, 4, validated=False) == (664, 166)
    assert budget.plan(498, 0.1, 2.0, 20.0, 4, validated=False) == (660, 165)  # 498 = 3 x 166: not done yet
    # a spacing whose next validation would follow a few steps after ``step`` is passed over: at step 145 of
    # 0.1 s steps with 50 s left, every 151 fits (but validates again at 151, 6 steps on); 145 validates at 290
    assert budget.plan(145, 0.1, 1.0, 50.0, 4) == (580, 145)
    last, every = budget.plan(30, 0.1, 2.5, -5.0, 4)
    assert last >= 31 and last == 4 * every
    with pytest.raises(UserError, match="TimeBudget needs"):
        budget.TimeBudget(minutes=0)


def test_the_process_s_age_is_its_wall_time_since_launch():
    age = budget.seconds_since_launch()
    assert 0.0 < age < 24 * 3600
    time.sleep(0.2)
    assert budget.seconds_since_launch() - age >= 0.15


def test_a_planned_run_ends_at_its_plan_with_the_schedule_and_validations_on_it(tmp_path, monkeypatch):
    """The launch clock is moved so that the budget leaves room for about 40 steps: the run stops at
    its plan (not at max_steps), validates at the last step, and its learning rate reaches min_lr
    there; a resume keeps the plan."""
    from gptnano.cli.lightning import GPTNanoCLI

    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    plans, real_plan = [], budget.plan

    def fake_plan(step, step_s, validation_s, seconds_left, validations, validated=True):
        plans.append((step, validations))
        return real_plan(step, 1.0, 0.0, 40.0 - step, validations, validated=validated)  # a clock where a step takes 1 s

    monkeypatch.setattr(budget, "plan", fake_plan)
    args = ["fit", *TINY_GPT, "--data.path", "tiny.txt", "--trainer.max_steps", "100000", "--model.optimizer",
            "adamw", "--model.warmup_steps", "5", "--trainer.callbacks+=gptnano.train.budget.TimeBudget",
            "--trainer.callbacks.probe_steps", "10", "--trainer.callbacks.validations", "2",
            "--trainer.log_every_n_steps", "1"]
    cli = GPTNanoCLI(args=args)
    # planned at step 10; the step-20 validation finds the same plan and keeps it
    assert plans == [(10, 2), (20, 2)] and cli.trainer.global_step == 40 and cli.trainer.max_steps == 40
    ckpt = torch.load(tmp_path / "checkpoints" / "gpt" / "last.ckpt", weights_only=True)
    lr = ckpt["optimizer_states"][0]["param_groups"][0]["lr"]
    assert lr == pytest.approx(1e-4)  # min_lr at the planned end: the cosine decayed over 40 steps
    from gptnano.logs import read_run

    assert [s for _, s, _ in read_run(tmp_path / "lightning_logs" / "gpt")["series"]["val/loss"]] == [20, 40]
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("TimeBudget"))
    assert state == {"planned": 40, "every": 20}


def test_the_plan_is_made_once_more_from_the_steadier_pace_a_fifth_of_the_way_in(tmp_path, monkeypatch):
    """Before: planned once from the first 30 steps, which run slower than the rest, a 5-minute run
    ended after 4m05s. The re-plan moves the end (and the schedule, and the validations) once."""
    from gptnano.cli.lightning import GPTNanoCLI

    assert budget.replan_step(30, 2000, 500, 30) == 400  # a fifth of the way, before the first validation
    assert budget.replan_step(30, 2000, 100, 30) == 99
    assert budget.replan_step(30, 200, 50, 30) == 201  # too soon after the probe: never
    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    plans, real_plan = [], budget.plan

    def fake_plan(step, step_s, validation_s, seconds_left, validations, validated=True):
        plans.append(step)  # first from step 5: 100 steps; then at step 20 the pace says 60
        return real_plan(step, 1.0, 0.0, (100.0 if len(plans) == 1 else 60.0) - step, validations, validated=validated)

    monkeypatch.setattr(budget, "plan", fake_plan)
    args = ["fit", *TINY_GPT, "--data.path", "tiny.txt", "--trainer.max_steps", "100000", "--model.optimizer",
            "adamw", "--model.warmup_steps", "5", "--trainer.callbacks+=gptnano.train.budget.TimeBudget",
            "--trainer.callbacks.probe_steps", "5", "--trainer.callbacks.validations", "2"]
    cli = GPTNanoCLI(args=args)
    assert plans == [5, 20, 30] and cli.trainer.global_step == 60  # the step-30 validation keeps the plan
    ckpt = torch.load(tmp_path / "checkpoints" / "gpt" / "last.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-4)  # decayed over 60 steps
    from gptnano.logs import read_run

    assert [s for _, s, _ in read_run(tmp_path / "lightning_logs" / "gpt")["series"]["val/loss"]] == [30, 60]


def test_a_run_behind_its_plan_at_a_validation_is_planned_shorter(tmp_path, monkeypatch):
    """Before: a 5-minute run whose machine slowed down after its plan ended after 5m10s. Now each
    validation checks the pace since the last one against the time left, and ends the run sooner."""
    from gptnano.cli.lightning import GPTNanoCLI

    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    plans, real_plan = [], budget.plan

    def fake_plan(step, step_s, validation_s, seconds_left, validations, validated=True):
        plans.append(step)  # from step 5: 100 steps; at step 20: 60; then the real plan, out of time
        if len(plans) <= 2:
            return real_plan(step, 1.0, 0.0, (100.0 if len(plans) == 1 else 60.0) - step, validations, validated=validated)
        return real_plan(step, step_s, validation_s, seconds_left, validations, validated=validated)

    monkeypatch.setattr(budget, "plan", fake_plan)
    monkeypatch.setattr(budget, "seconds_since_launch", lambda: 10_000.0 if len(plans) >= 2 else 0.0)
    args = ["fit", *TINY_GPT, "--data.path", "tiny.txt", "--trainer.max_steps", "100000", "--model.optimizer",
            "adamw", "--model.warmup_steps", "5", "--trainer.callbacks+=gptnano.train.budget.TimeBudget",
            "--trainer.callbacks.probe_steps", "5", "--trainer.callbacks.validations", "2"]
    cli = GPTNanoCLI(args=args)
    # at the step-30 validation the time is up: the next validation point, 32 (= 2 x 16), ends it
    assert plans == [5, 20, 30] and cli.trainer.global_step == 32
    from gptnano.logs import read_run

    assert [s for _, s, _ in read_run(tmp_path / "lightning_logs" / "gpt")["series"]["val/loss"]] == [30, 32]


def test_the_training_clock_counts_training_only_and_carries_over_a_resume():
    """compare's wall-time budgets count Lightning's training time (Timer's "train"), not start-up:
    TimeBudget's training clock starts at on_train_start and a resumed run adds what it trained before."""
    with pytest.raises(UserError, match="clock is 'launch' or 'training'"):
        budget.TimeBudget(clock="wall")
    clock = budget.TimeBudget(clock="training")
    assert clock.elapsed() == 0.0  # before training: start-up is not counted
    clock.load_state_dict({"planned": None, "every": None, "trained_s": 12.5})  # saved before its first plan
    assert clock.elapsed() == 12.5
    from types import SimpleNamespace

    clock.on_train_start(SimpleNamespace(global_step=0), None)
    time.sleep(0.05)
    assert 12.5 + 0.04 < clock.elapsed() < 12.5 + 5
    assert clock.state_dict()["trained_s"] == pytest.approx(clock.elapsed(), abs=0.5)
    assert "trained_s" not in budget.TimeBudget().state_dict()  # the launch clock restarts with each process


def test_a_validation_inside_the_probe_is_not_counted_as_training(tmp_path, monkeypatch):
    """A run validated before its plan (compare's short runs validate every few steps) timed the
    validation as training: its steps looked slower and the plan too short."""
    from gptnano.cli.lightning import GPTNanoCLI
    from gptnano.train.module import LitLM

    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    paces, real_validation_step = [], LitLM.validation_step

    def slow_validation_step(self, *args, **kwargs):
        if not self.trainer.sanity_checking:
            time.sleep(2.0)  # one batch per validation: 2 s, against a few ms per tiny training step
        return real_validation_step(self, *args, **kwargs)

    def fake_plan(step, step_s, validation_s, seconds_left, validations, validated=True):
        paces.append(step_s)
        return 20, 10

    monkeypatch.setattr(LitLM, "validation_step", slow_validation_step)
    monkeypatch.setattr(budget, "plan", fake_plan)
    args = ["fit", *TINY_GPT, "--data.path", "tiny.txt", "--trainer.max_steps", "100000", "--model.optimizer",
            "adamw", "--trainer.val_check_interval", "5", "--trainer.limit_val_batches", "1",
            "--trainer.callbacks+=gptnano.train.budget.TimeBudget", "--trainer.callbacks.probe_steps", "10",
            "--trainer.callbacks.validations", "2", "--trainer.callbacks.clock", "training"]
    cli = GPTNanoCLI(args=args)
    assert cli.trainer.global_step == 20
    # steps 2 to 10 hold the step-5 validation: counted, it alone would make 2 s / 8 = 0.25 s a step
    assert paces[0] < 0.125


def test_a_run_ahead_of_its_plan_at_a_validation_is_planned_longer(tmp_path, monkeypatch):
    """Before: a plan only ever got shorter after the fifth of the way, and the first plan counts the
    sanity check's validations, seen 50 % dearer than the real ones: compare's 70 s runs trained 58-65 s.
    Now a validation that finds the run well ahead plans it longer, while a validation is left to
    correct it."""
    from gptnano.cli.lightning import GPTNanoCLI

    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    plans, real_plan = [], budget.plan

    def fake_plan(step, step_s, validation_s, seconds_left, validations, validated=True):
        plans.append(step)  # the probe plans 40 steps; every validation after finds room for 100
        return real_plan(step, 1.0, 0.0, 40.0 - step, validations, validated=validated) if len(plans) == 1 else (100, 50)

    monkeypatch.setattr(budget, "plan", fake_plan)
    args = ["fit", *TINY_GPT, "--data.path", "tiny.txt", "--trainer.max_steps", "100000", "--model.optimizer",
            "adamw", "--trainer.callbacks+=gptnano.train.budget.TimeBudget", "--trainer.callbacks.probe_steps", "10",
            "--trainer.callbacks.validations", "2"]
    cli = GPTNanoCLI(args=args)
    assert plans == [10, 20, 50] and cli.trainer.global_step == 100
    ckpt = torch.load(tmp_path / "checkpoints" / "gpt" / "last.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-4)  # decayed over 100
    from gptnano.logs import read_run

    assert [s for _, s, _ in read_run(tmp_path / "lightning_logs" / "gpt")["series"]["val/loss"]] == [20, 50, 100]


def test_a_run_resumed_before_its_plan_probes_again_from_where_it_goes_on(tmp_path, monkeypatch):
    """Before: the probe started only at step 2, so a run stopped (Ctrl-C, compare's SIGTERM) before its
    plan and resumed kept the steps it was launched with and never planned."""
    from gptnano.cli.lightning import GPTNanoCLI

    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    plans, real_plan = [], budget.plan

    def fake_plan(step, step_s, validation_s, seconds_left, validations, validated=True):
        plans.append(step)
        return real_plan(step, 1.0, 0.0, 40.0 - step, validations, validated=validated)

    monkeypatch.setattr(budget, "plan", fake_plan)
    args = ["fit", *TINY_GPT, "--data.path", "tiny.txt", "--model.optimizer", "adamw",
            "--trainer.callbacks+=gptnano.train.budget.TimeBudget", "--trainer.callbacks.probe_steps", "10",
            "--trainer.callbacks.validations", "2", "--trainer.callbacks.clock", "training"]
    GPTNanoCLI(args=[*args, "--trainer.max_steps", "5"])  # stopped before its plan
    assert plans == []
    cli = GPTNanoCLI(args=[*args, "--trainer.max_steps", "100000", "--ckpt_path", "last"])
    assert plans[0] == 15 and cli.trainer.global_step == 40  # probed from step 5 + 2 to 5 + 10, then planned
