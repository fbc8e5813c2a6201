"""The model directory has one reader/writer and TrainConfig's defaults are plugin.yaml's."""

import dataclasses
import json

import numpy as np
import pytest

from cryoforum_plugin import manifest
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.train.model_dir import ModelDir
from cryoforum_plugin.train.config import TrainConfig


def test_train_config_defaults_are_plugin_yaml_defaults():
    declared = manifest.defaults("train")
    for field in dataclasses.fields(TrainConfig):
        assert field.name in declared, f"{field.name} is not declared in plugin.yaml's train job"
        assert field.default == declared[field.name], field.name


def test_model_dir_round_trip_and_legacy_option_name(tmp_path):
    cfg = TrainConfig(box=32, width=0.125, loss="single")
    m = ModelDir(tmp_path / "m")
    m.write_untrained(cfg)
    pre, net, state = m.load()
    assert not net.training and state["config"]["loss"] == "single" and m.trace_scale(state) == 1.0
    m.write_split({"train": np.array([0, 2]), "val": np.array([1])}, np.array([10, 11, 12], dtype=np.uint64))
    assert m.split_uids("val").tolist() == [11] and m.split_uids("train").tolist() == [10, 12]
    legacy = dict(cfg.to_dict())
    legacy["training"] = legacy.pop("loss")  # configurations written before the option was renamed
    m.write_meta({"config": legacy})
    assert m.config() == cfg
    with pytest.raises(CryoforumError, match="no part 'nope'"):
        m.split_uids("nope")
    with pytest.raises(CryoforumError, match="best.pt"):
        ModelDir(tmp_path / "empty").load()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["config"]["training"] == "single"


def test_presets_fill_the_options_left_at_their_defaults():
    from cryoforum_plugin.pipeline import options as pipeline_options
    from cryoforum_plugin.train.config import PRESETS

    cpu = TrainConfig.from_args(pipeline_options.options(preset="cpu", epochs=7))
    assert cpu.pretrain_steps == PRESETS["cpu"]["pretrain_steps"] > 0 and cpu.box == 64 and cpu.epochs == 7
    assert cpu.time_budget == PRESETS["cpu"]["time_budget"] > 0
    # the user's own step count is run as given: the preset's time budget does not resize it
    steps = TrainConfig.from_args(pipeline_options.options(preset="cpu", pretrain_steps=500))
    assert steps.pretrain_steps == 500 and steps.time_budget == 0 and steps.box == 64
    both = TrainConfig.from_args(pipeline_options.options(preset="cpu", pretrain_steps=500, time_budget=5.0))
    assert both.pretrain_steps == 500 and both.time_budget == 5.0
    # the paper = the declared defaults
    assert TrainConfig.from_args(pipeline_options.options(preset="paper")) == TrainConfig()
    assert TrainConfig.from_args(pipeline_options.options(preset="auto", device="cpu")) == TrainConfig.from_args(
        pipeline_options.options(preset="cpu"))
    with pytest.raises(CryoforumError, match="preset"):
        TrainConfig.from_args({"preset": "fast"})


def test_given_means_not_none_and_every_preset_option_is_left_unset_by_the_front_ends():
    from cryoforum_plugin.train.config import PRESETS

    assert {f.name for f in dataclasses.fields(TrainConfig)} == manifest.train_options()
    for name, preset in PRESETS.items():
        assert set(preset) <= manifest.preset_options(), name  # a preset sets only options the front ends leave None
    # a value equal to plugin.yaml's default is still the user's: kept over the preset's
    cpu = TrainConfig.from_args({"preset": "cpu", "head": "qcqp", "epochs": 50, "l2_head": True, "box": None})
    assert (cpu.head, cpu.epochs, cpu.l2_head, cpu.box) == ("qcqp", 50, True, PRESETS["cpu"]["box"])
    assert TrainConfig.from_args({"epochs": None, "head": "grid"}) == TrainConfig(head="grid")  # no preset
