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


# ---------------------------------------------------------------- issue 23: no host round trip per synthetic batch

def _no_reads_to_host(monkeypatch):
    """Make every read of a tensor's values on the host fail (what would wait for a GPU)."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    for name in ("cpu", "numpy", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.fixture(scope="module")
def simulator_inputs():
    from cryoforum_plugin.data import DEFAULT_MAP
    from cryoforum_plugin.formats.mrc import read_map
    from cryoforum_plugin.physics.fourier import as_tensor
    from cryoforum_plugin.physics.resample import resample

    raw, apix = read_map(DEFAULT_MAP)
    rng = np.random.default_rng(3)
    du = rng.uniform(8000, 30000, 40)
    pool = {"defocus_u": du, "defocus_v": du - 300, "defocus_angle": rng.uniform(0, 180, 40),
            "voltage": np.full(40, 300.0), "cs": np.full(40, 2.7), "amp_contrast": np.full(40, 0.1),
            "phase_shift": rng.uniform(0, 90, 40)}
    return resample(as_tensor(raw), 32, 3), apix * raw.shape[0] / 32, pool, rng.uniform(-5, 5, (40, 2))


@pytest.mark.parametrize("orientations", ["uniform", "pool"])
def test_simulator_draws_on_the_generators_device_without_reading_back(simulator_inputs, monkeypatch, orientations):
    """The device path (a GPU generator; here forced on the CPU) draws the same numbers in the same order as the
    host path and keeps them as tensors: same pool rows and shifts, SNRs and images equal up to float rounding,
    and no tensor read on the host."""
    from cryoforum_plugin.sim import batches

    vol, apix, pool, shifts = simulator_inputs
    quats = np.random.default_rng(4).normal(size=(30, 4)) if orientations == "pool" else "uniform"
    sim = batches.MapParticleSimulator(vol, apix, ctf_pool=pool, shift_pool_A=shifts, snr=(0.1, 1.0),
                                       orientations=quats)
    img, q, p = sim.batch(20, torch.Generator().manual_seed(1), return_params=True)
    monkeypatch.setattr(batches, "_on_host", lambda device: False)
    with monkeypatch.context() as m:
        _no_reads_to_host(m)
        img_d, q_d, p_d = sim.batch(20, torch.Generator().manual_seed(1), return_params=True)
    assert isinstance(p_d["ctf_rows"], torch.Tensor) and isinstance(p_d["snr"], torch.Tensor)
    assert np.array_equal(p_d["ctf_rows"].numpy(), p["ctf_rows"])
    assert np.array_equal(p_d["shift_A"].numpy(), p["shift_A"])
    assert np.allclose(p_d["snr"].numpy(), p["snr"], rtol=1e-12)
    assert torch.allclose(q_d, q, atol=1e-6)
    assert torch.allclose(img_d, img, atol=1e-4 * float(img.abs().max()))


@pytest.mark.parametrize("sym", ["C1", "D7", "O"])
def test_reduce_to_asu_and_normalize_on_tensors_match_numpy(sym):
    from cryoforum_plugin.physics import rotations, symmetry

    q = np.random.default_rng(5).normal(size=(200, 4))
    expected = symmetry.reduce_to_asu(q, sym)
    got = symmetry.reduce_to_asu(torch.as_tensor(q), sym)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    assert np.allclose(got.numpy(), expected, atol=1e-12)
    assert np.allclose(rotations.normalize(torch.as_tensor(q)).numpy(), rotations.normalize(q), atol=1e-15)


def test_pretraining_batch_stays_on_the_device(small_sim_set, tmp_path, monkeypatch):
    """A pre-training batch with a GPU generator (the device path forced on the CPU), with --restrict-to-asu and
    --phase-flip: simulated, targets reduced and phase flip computed without reading a tensor on the host; the
    targets are the host path's up to rounding."""
    from cryoforum_plugin.data import DEFAULT_MAP
    from cryoforum_plugin.sim import batches

    t = trainer(small_sim_set, tmp_path / "m", pretrain_steps=2, from_map=str(DEFAULT_MAP), sym="D2",
                restrict_to_asu=True, phase_flip=True)
    t.pretraining.setup()
    state = t.pretraining.gen.get_state()
    _, target, rows = t.pretraining.batch(0)
    t.pretraining.gen.set_state(state)
    monkeypatch.setattr(batches, "_on_host", lambda device: False)
    with monkeypatch.context() as m:
        _no_reads_to_host(m)
        raw_d, target_d, rows_d = t.pretraining.batch(0)
        from cryoforum_plugin.nn.preprocess import phase_flipped

        flipped = phase_flipped(raw_d, t.pretraining.sim.ctf_table, rows_d, t.pretraining.sim.pixel_size)
    assert torch.equal(rows_d, torch.as_tensor(rows)) and flipped.shape == raw_d.shape
    assert torch.allclose(target_d, target, atol=1e-6)


def test_ctf_images_copy_parameters_once_and_a_device_table_gives_the_same_images(monkeypatch):
    """A CTF dict's rows go to the device in one transfer (not one per parameter); a ctf_table indexed on its
    device gives bit-identical images."""
    from cryoforum_plugin.physics import ctf as ctf_module

    rng = np.random.default_rng(6)
    pool = {k: rng.uniform(1, 2, 30) * s for k, s in
            {"defocus_u": 2e4, "defocus_v": 1.9e4, "defocus_angle": 90, "voltage": 200, "cs": 2,
             "amp_contrast": 0.05, "phase_shift": 40}.items()}
    rows = np.array([4, 0, 29, 4])
    expected = ctf_module.ctf_images(pool, rows, 24, 1.2)
    copies = []
    real = ctf_module.as_tensor
    monkeypatch.setattr(ctf_module, "as_tensor", lambda *a, **k: copies.append(a[0].shape) or real(*a, **k))
    assert torch.equal(ctf_module.ctf_images(pool, rows, 24, 1.2), expected) and copies == [(8, 4)]
    table = real(np.stack([pool[k] for k in ctf_module.CTF_2D_ORDER]))
    assert torch.equal(ctf_module.ctf_table(pool), table)
    assert torch.equal(ctf_module.ctf_images(table, torch.as_tensor(rows), 24, 1.2), expected)
    per_image = np.array([1.2, 1.3, 1.4, 1.5])
    assert torch.equal(ctf_module.ctf_images(table, rows, 24, per_image),
                       ctf_module.ctf_images(pool, rows, 24, per_image))


# ---------------------------------------------------------------- issue 23: the cached image set on a GPU

@pytest.mark.parametrize("free_gb, expected", [(80.0, True), (8.0, True), (7.9, False), (1.0, False)])
def test_cache_goes_to_the_gpu_only_when_it_fits_the_documented_share_of_free_memory(monkeypatch, free_gb,
                                                                                       expected):
    from cryoforum_plugin.formats import loader

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (free_gb * 1e9, 80e9))
    assert loader.GPU_CACHE_FRACTION == 0.25
    assert loader.cache_on_device(2e9, torch.device("cuda:1")) is expected and asked == [torch.device("cuda:1")]
    assert not loader.cache_on_device(2e9, torch.device("cpu")) and not loader.cache_on_device(2e9, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not loader.cache_on_device(1, torch.device("cuda"))


def test_a_cache_placed_on_the_device_serves_its_batches_there(small_sim_set, monkeypatch):
    """('meta' stands in for the GPU.) The cache moves to the device when ``cache_on_device`` says so; its
    batches are gathered there; a CPU cache gives the same images as before."""
    from cryoforum_plugin.formats import loader

    rows = np.array([5, 2, 9])
    host = ImageSource(small_sim_set, device=torch.device("cpu"))
    assert host._cache.device.type == "cpu"
    assert torch.equal(host.batch(rows), torch.from_numpy(small_sim_set.read_images(host.reader, rows)))
    monkeypatch.setattr(loader, "cache_on_device", lambda nbytes, device: nbytes == host._cache.nbytes)
    placed = ImageSource(small_sim_set, device=torch.device("meta"))
    got = placed.batch(rows)
    assert got.device.type == "meta" and got.shape == (3, *host._cache.shape[1:])


class _Wrapped(torch.nn.Module):
    """What torch.compile returns, for a CPU test: a wrapper whose state_dict keys gain '_orig_mod.'."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


def test_compile_wraps_the_network_only_on_cuda(monkeypatch, capsys):
    from cryoforum_plugin import runtime

    calls = []
    monkeypatch.setattr(torch, "compile", lambda m: calls.append(m) or _Wrapped(m))
    net = torch.nn.Linear(2, 2)
    out = runtime.compiled(net, torch.device("cuda"), True)  # nothing runs on the device
    assert isinstance(out, _Wrapped) and calls == [net] and out._orig_mod is net
    assert capsys.readouterr().out == ""
    assert runtime.compiled(net, torch.device("cuda"), False) is net  # --compile not given
    assert runtime.compiled(net, torch.device("cpu"), True) is net and calls == [net]
    assert capsys.readouterr().out == runtime.COMPILE_CPU_NOTE + "\n"


def test_compile_option_reaches_training_and_prediction_from_the_cli(small_sim_set, tmp_path, capsys):
    """``--compile`` on the CPU: one note from train (and one from predict), training and prediction run, and the
    checkpoints are the un-compiled network's."""
    from cryoforum_plugin.cli import build_parser, main as cli
    from cryoforum_plugin.pipeline import options as pipeline_options
    from cryoforum_plugin.runtime import COMPILE_CPU_NOTE

    parser = build_parser()
    assert parser.parse_args(["train", "--particles", "p.star"]).compile is False
    assert pipeline_options.options_from(parser.parse_args(["run", "--train", "p.star", "--compile"])).compile
    model = tmp_path / "m"
    assert cli(["train", "--particles", str(small_sim_set.path), "--out", str(model), "--preset", "paper",
                "--box", "32", "--width", "0.125", "--batch", "32", "--epochs", "1", "--device", "cpu",
                "--compile"]) == 0
    assert capsys.readouterr().out.count(COMPILE_CPU_NOTE) == 1
    assert "compile" not in json.loads((model / "config.json").read_text())["config"]  # a run-time setting
    state = ModelDir(model).best_state()
    assert state["model"] and not any(k.startswith("_orig_mod.") for k in state["model"])
    assert cli(["predict", "--model", str(model), "--particles", str(small_sim_set.path), "--out",
                str(tmp_path / "p"), "--device", "cpu", "--compile"]) == 0
    assert capsys.readouterr().out.count(COMPILE_CPU_NOTE) == 1
    assert (tmp_path / "p" / "predicted.star").is_file()


def test_a_compiled_network_trains_and_checkpoints_the_bare_one(small_sim_set, tmp_path, monkeypatch):
    """The trainer runs its passes through what runtime.compiled returns (here a wrapper that prefixes keys, as
    torch.compile's does) while last.pt/best.pt hold the bare network's keys, so a run resumes either way."""
    from cryoforum_plugin.train import trainer as trainer_module

    seen = []
    monkeypatch.setattr(trainer_module.runtime, "compiled", lambda m, d, on, ev: seen.append(on) or _Wrapped(m))
    t = Trainer(small_sim_set, tmp_path / "m", TrainConfig(**TINY), torch.device("cpu"), progress=False,
                compile=True)
    assert seen == [True] and isinstance(t.net, _Wrapped) and t.net._orig_mod is t.model
    t.train()
    keys = set(ModelDir(tmp_path / "m").best_state()["model"])
    assert keys == set(t.model.state_dict()) and not any(k.startswith("_orig_mod.") for k in keys)
    assert trainer(small_sim_set, tmp_path / "m").resume()  # a run without --compile continues it
