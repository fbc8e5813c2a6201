"""--time-budget (issue 19): real epochs that do not fit are cut, loudly, so the pre-training keeps at least half of
the time left, and the plan is checkpointed before any step that an interruption could lose."""

import json

import pytest
import torch

from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.train.model_dir import ModelDir
from cryoforum_plugin.progress import Events
from cryoforum_plugin.train.pretrain import PRETRAIN_SHARE, plan_budget, plan_pretrain_steps
from cryoforum_plugin.train.trainer import TrainConfig, Trainer


def test_real_epochs_that_do_not_fit_are_cut_and_the_pretraining_keeps_its_share():
    # a 28-minute budget (the cpu preset), 2 min spent; 0.3 s per step, 5 s per validation, a row every 250 steps;
    # 100k training particles at batch 64: 1,563 steps per real epoch (7.9 min with its validation), so 5 epochs would take 39.5 min
    budget, spent, step, val, every, per_epoch = 28 * 60.0, 120.0, 0.3, 5.0, 250, 1563
    assert plan_pretrain_steps(budget, spent, step, val, 20, every, 5 * per_epoch, 5) == 20  # before: 20 steps
    plan = plan_budget(budget, spent, step, val, 20, every, per_epoch, 5)
    left, epoch_s = budget - spent, per_epoch * step + val
    assert plan.capped and plan.epochs_planned == 5 and plan.epochs == int(PRETRAIN_SHARE * left // epoch_s) == 1
    floor = 20 + int(PRETRAIN_SHARE * left // (step + val / every))  # at least half of the time left
    assert plan.pretrain_steps >= floor > 2000
    assert spent + (plan.pretrain_steps - 20) * (step + val / every) + plan.epochs * epoch_s <= budget  # it fits
    text = plan.message(28)
    assert text.startswith("WARNING:") and "0.300 s per step" in text and "7.9 min per real epoch" in text
    assert "1 of 5" in text and f"{plan.pretrain_steps} pre-training steps" in text and "--time-budget" in text
    # epochs that fit in half the time are all kept, and the pre-training gets the rest: no warning
    small = plan_budget(budget, spent, step, val, 20, every, 16, 5)
    assert not small.capped and small.epochs == 5 and not small.message(28).startswith("WARNING")
    assert small.pretrain_steps == plan_pretrain_steps(budget, spent, step, val, 20, every, 5 * 16, 5)
    # one epoch longer than half the time left: pre-training only; a budget already spent: nothing more
    assert plan_budget(budget, spent, step, val, 20, every, 10 * per_epoch, 5).epochs == 0
    spent_all = plan_budget(budget, budget + 1, step, val, 20, every, 16, 5)
    assert spent_all.epochs == 0 and spent_all.pretrain_steps == 20 and spent_all.capped


class Killed(Exception):
    """The process dies (the next poll after the plan's checkpoint)."""


class KillAfterThePlan(Events):
    def __init__(self):
        super().__init__()
        self.said, self.planned = [], False

    def message(self, text):
        self.said.append(text)
        self.planned |= "time budget" in text

    def check_abort(self):
        if self.planned:
            raise Killed()


def test_a_kill_right_after_the_plan_resumes_with_the_planned_steps_and_epochs(small_sim_set, tmp_path):
    def config():  # the user's options: far more epochs than the budget allows
        return TrainConfig(box=32, width=0.125, batch=32, lr=3e-3, head="quat", loss="single", dropout=0.0, l2=0.0,
                           val_fraction=0.2, test_fraction=0.3, seed=3, pretrain_log_every=10,
                           from_map=str(DEFAULT_MAP), epochs=100_000, pretrain_steps=10_000, time_budget=0.25)

    events = KillAfterThePlan()
    t = Trainer(small_sim_set, tmp_path / "m", config(), torch.device("cpu"), progress=False, events=events)
    with pytest.raises(Killed):
        t.train()
    warning = [m for m in events.said if m.startswith("WARNING:")]
    assert len(warning) == 1 and "of 100000 are kept" in warning[0] and "s per step" in warning[0], events.said
    model = ModelDir(tmp_path / "m")
    state = model.last_state(torch.device("cpu"))
    planned, stored = model.config(), TrainConfig.from_dict(state["config"])
    assert stored == planned and planned.epochs < 100_000 and 20 <= planned.pretrain_steps < 10_000
    assert state["pretrain_step"] == 20 and json.loads((tmp_path / "m" / "config.json").read_text())["config"][
        "pretrain_steps"] == planned.pretrain_steps
    assert state["scheduler"]["total_steps"] == planned.pretrain_steps + planned.epochs * t.steps_per_epoch
    # the run is restarted with the user's options: it resumes the plan, not the 10,000 steps and 100,000 epochs
    t2 = Trainer(small_sim_set, tmp_path / "m", config(), torch.device("cpu"), progress=False)
    assert t2.resume() and t2.pretrain_step == 20
    assert (t2.cfg.pretrain_steps, t2.cfg.epochs) == (planned.pretrain_steps, planned.epochs)
    assert t2.sched.total_steps == t2.total_steps == state["scheduler"]["total_steps"]
