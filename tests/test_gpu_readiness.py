"""What a GPU run needs from the training and prediction code, checked on the CPU: a checkpoint resumes whatever
device its tensors are mapped to (the generators' states stay CPU ByteTensors), --precision (one resolution, stored
with the model, used by prediction unless overridden), no wait for the device inside a training step (metrics read
once per log row; a non-finite loss skipped on the device and reported at the row), cuDNN/TF32 settings on CUDA
only, and persistent loader processes."""

import json
import os

import numpy as np
import pytest
import torch

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.loader import ImageSource
from cryoforum_plugin.nn import precision
from cryoforum_plugin.train.config import TrainConfig
from cryoforum_plugin.train.model_dir import RNG_STATES, ModelDir
from cryoforum_plugin.train.step_metrics import StepMetrics
from cryoforum_plugin.train.trainer import Trainer

TINY = dict(box=32, width=0.125, batch=32, epochs=1, lr=1e-3, seed=2)


def trainer(ps, out, **options) -> Trainer:
    return Trainer(ps, out, TrainConfig(**{**TINY, **options}), torch.device("cpu"), progress=False)


@pytest.fixture(scope="module")
def trained(small_sim_set, tmp_path_factory):
    """A 1-epoch model trained with --precision fp32, pre-training 2 steps first (so last.pt has every generator)."""
    from cryoforum_plugin.data import DEFAULT_MAP

    out = tmp_path_factory.mktemp("gpu_ready") / "m"
    trainer(small_sim_set, out, precision="fp32", pretrain_steps=2, pretrain_log_every=2,
            from_map=str(DEFAULT_MAP)).train()
    return out


def test_restored_generator_states_are_cpu_byte_tensors_whatever_the_device(trained):
    """last.pt loaded for another device (here 'meta', as for 'cuda' on a GPU): the model's tensors go there, the
    generators' states stay CPU ByteTensors (torch.Generator.set_state and torch.set_rng_state take no other)."""
    saved = torch.load(trained / "last.pt", map_location="cpu", weights_only=False)
    assert {"gen", "torch_rng", "sim_gen"} <= set(saved)
    state = ModelDir(trained).last_state(torch.device("meta"))
    for key in RNG_STATES:
        if key in saved:
            assert state[key].device.type == "cpu" and state[key].dtype == torch.uint8, key
            assert torch.equal(state[key], saved[key]), key
    assert all(v.device.type == "meta" for v in state["model"].values())
    assert state["epoch"] == saved["epoch"] == 1 and "scaler" in state
    torch.Generator().set_state(state["gen"])  # what resume does with them
    torch.Generator().set_state(state["sim_gen"])


def test_precision_resolution_for_each_case(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision.resolve("auto", cpu) == (None, False)
    assert precision.resolve("fp32", cpu) == (None, False)
    assert precision.resolve("bf16", cpu) == (torch.bfloat16, False)
    assert precision.resolve("fp16", cpu) == (torch.float16, True)
    asked = []

    def bf16(native: bool):
        def supported(including_emulation=True):
            asked.append(including_emulation)
            return native or including_emulation  # an older GPU only emulates bfloat16
        return supported

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16(True))
    assert precision.resolve("auto", cuda) == (torch.bfloat16, False)
    assert precision.resolve("bf16", cuda) == (torch.bfloat16, False)
    assert precision.resolve("fp16", cuda) == (torch.float16, True)
    assert precision.resolve("fp32", cuda) == (None, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16(False))
    assert precision.resolve("auto", cuda) == (torch.float16, True)  # float16 with a GradScaler
    with pytest.raises(CryoforumError, match="--precision bf16") as err:
        precision.resolve("bf16", cuda)
    assert "fp32" in err.value.fix
    assert asked and not any(asked)  # native support, not emulation
    with pytest.raises(CryoforumError, match="auto, bf16, fp16 or fp32"):
        precision.resolve("half", cpu)


def test_precision_is_stored_with_the_model_and_used_by_prediction(trained, small_sim_set, monkeypatch):
    from cryoforum_plugin.infer import predict as predict_module

    assert json.loads((trained / "config.json").read_text())["config"]["precision"] == "fp32"
    assert ModelDir(trained).config().precision == "fp32"
    assert ModelDir(trained).best_state()["config"]["precision"] == "fp32"
    seen = []
    real = predict_module.numeric.resolve
    monkeypatch.setattr(predict_module.numeric, "resolve", lambda p, d: seen.append(p) or real(p, d))
    subset = small_sim_set.subset(np.arange(40))
    a = predict_module.predict(subset, trained, progress=False)
    b = predict_module.predict(subset, trained, progress=False, precision="bf16")
    assert seen == ["fp32", "bf16"]  # the model's, then the override
    assert np.isfinite(b.quat).all() and not np.array_equal(a.quat, b.quat)  # bfloat16 ran


def test_precision_option_reaches_every_front_end():
    from cryoforum_plugin.cli import build_parser
    from cryoforum_plugin.pipeline import options as pipeline_options
    from relion_external.cryoforum_relion import parse

    cli = build_parser()
    assert cli.parse_args(["train", "--particles", "p.star", "--precision", "fp16"]).precision == "fp16"
    assert cli.parse_args(["predict", "--model", "m", "--particles", "p.star"]).precision is None  # the model's
    assert cli.parse_args(["predict", "--model", "m", "--particles", "p.star", "--precision", "fp32"]).precision == "fp32"
    for argv in (["run", "--train", "p.star", "--precision", "fp16"],
                 ["cryosparc", "--project", "P1", "--workspace", "W1", "--train", "J1:particles", "--precision", "fp16"]):
        opts = pipeline_options.options_from(cli.parse_args(argv))
        assert TrainConfig.from_args(opts).precision == "fp16", argv[0]
    relion = parse(["--o", "External/job001/", "--precision", "FP16"])[0]  # 'Additional arguments' of the form
    assert TrainConfig.from_args(pipeline_options.options_from(relion)).precision == "fp16"
    assert TrainConfig.from_args(pipeline_options.options()).precision == "auto"
    with pytest.raises(SystemExit):
        cli.parse_args(["train", "--particles", "p.star", "--precision", "half"])


@pytest.mark.parametrize("name", ["bf16", "fp16"])
@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # float16's first steps skip the optimiser
def test_reduced_precision_trains_on_the_cpu(small_sim_set, tmp_path, name):
    """The autocast paths (bf16; fp16 with dynamic loss scaling, whose first steps overflow and are skipped while
    the scale comes down) run through real epochs: finite, weights moved."""
    t = trainer(small_sim_set, tmp_path / name, precision=name, epochs=3)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.train()
    assert t.autocast_dtype == precision.resolve(name, torch.device("cpu"))[0] and t.scaled == (name == "fp16")
    assert np.isfinite(t.log[-1]["loss"]) and np.isfinite(t.log[-1]["val_median_rad"])
    assert t.log[-1]["skipped_steps"] < t.steps_per_epoch  # float16: only the first steps overflow
    assert not torch.equal(before["dense.weight"], t.model.state_dict()["dense.weight"])


def test_a_training_step_reads_nothing_back_from_the_device(small_sim_set, tmp_path, monkeypatch):
    """``_step`` and the step's metrics make no host read (item, float, bool, cpu, numpy, tolist): on a GPU each
    would wait for the queued work. The optimiser is the fused Adam a GPU run uses (its GradScaler step then needs
    no read either); the one read is ``StepMetrics.read`` at the log row."""
    t = trainer(small_sim_set, tmp_path / "m", head="grid", grid_spacing=30.0)
    t.opt = torch.optim.Adam(t.net.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True)
    t.sched = t._one_cycle()
    rows = t.split["train"][:16]
    x, target = t._inputs(rows, t.source.batch(rows), augmented=True)
    t.net.train()
    reads = []
    for name in ("item", "__float__", "__int__", "__bool__", "cpu", "numpy", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real, **k: reads.append(_n) or _r(self, *a, **k))
    metrics = StepMetrics(t.device)
    for _ in range(2):
        metrics.add(*t._step(x, target, 0.5))
    assert reads == []
    monkeypatch.undo()
    values = metrics.read()
    assert len(values["losses"]) == 2 and len(values["errs"]) == 32 and values["nonfinite"] == values["skipped"] == 0


def test_a_non_finite_loss_is_skipped_on_the_device_and_stops_training_at_the_log_row(small_sim_set, tmp_path):
    """The third step's loss is NaN: that update is skipped (weights and optimiser state stay finite), the other
    steps of the epoch run, and the epoch's log row stops the training with the clear error before its checkpoint."""
    t = trainer(small_sim_set, tmp_path / "m", epochs=2)
    real, calls = t.loss, []

    def loss(out, target, progress):
        total, err = real(out, target, progress)
        calls.append(1)
        return (total * float("nan") if len(calls) == 3 + t.steps_per_epoch else total), err

    t.loss = loss
    with pytest.raises(CryoforumError, match=r"NaN/inf in 1 of the last \d+ steps") as err:
        t.train()
    assert "--precision fp32" in err.value.fix
    assert len(calls) == 2 * t.steps_per_epoch  # the second epoch ran to its end
    assert all(torch.isfinite(v).all() for v in t.model.state_dict().values())
    assert all(torch.isfinite(s).all() for p in t.opt.state.values() for s in p.values())
    assert torch.load(tmp_path / "m" / "last.pt", weights_only=False)["epoch"] == 1  # the first epoch's


def test_cuda_settings_only_on_cuda():
    from cryoforum_plugin.runtime import tune_for

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (torch.backends.cudnn.benchmark, matmul.fp32_precision, conv.fp32_precision)
    try:
        torch.backends.cudnn.benchmark, matmul.fp32_precision, conv.fp32_precision = False, "ieee", "ieee"
        tune_for(torch.device("cpu"))
        assert (torch.backends.cudnn.benchmark, matmul.fp32_precision, conv.fp32_precision) == (False, "ieee", "ieee")
        tune_for(torch.device("cuda"))
        assert (torch.backends.cudnn.benchmark, matmul.fp32_precision, conv.fp32_precision) == (True, "tf32", "tf32")
    finally:
        torch.backends.cudnn.benchmark, matmul.fp32_precision, conv.fp32_precision = saved


def test_loader_processes_persist_from_pass_to_pass(small_sim_set):
    """A streamed set: the loader processes of the first pass serve the next passes (training epochs and
    validations, prediction batches), with the same images as reading in the main process."""
    source = ImageSource(small_sim_set, cache_bytes=0)
    rows = np.arange(100)
    pids = []
    for order in (rows, rows[::-1], rows[::3]):
        got = list(source.batches(order, 16, workers=2))
        assert np.array_equal(np.concatenate([r for r, _ in got]), order)
        assert all(torch.equal(images, source.batch(r)) for r, images in got)
        pids.append(sorted(w.pid for w in source._loader._iterator._workers))
    assert pids[0] == pids[1] == pids[2] and os.getpid() not in pids[0]
    iterator = source._loader._iterator
    source.close()
    assert source._loader is None
    del iterator
