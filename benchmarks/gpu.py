#!/usr/bin/env python3
"""GPU benchmark (issue 23): where the time of each engine part goes on one device, with the product's own code.

Phases, in this order; OUT/gpu.json is rewritten after every row, so a run cut short keeps what finished:

- ``eigh``: the QCQP head's float64 eigh (nn.model.qcqp_solve), forward and forward+backward, per batch size;
- ``forward``: the network alone at 128 px, full width, QCQP and grid heads, four settings: default,
  cudnn.benchmark, channels_last (+ cudnn.benchmark), compile (``--compile``: runtime.compiled, + cudnn.benchmark;
  CUDA only: on a CPU, or when compiling fails, a ``skipped_cases`` entry with "cpu" or the error's text instead);
  bf16 autocast on CUDA, as ``predict`` runs it;
- ``prediction``: ``infer.predict.predict`` end to end (stream, preprocess, network, head) on simulated particles
  (sim.dataset.simulate), an untrained model of the gpu preset's architecture, loader workers auto vs 0;
- ``training_step``: a Trainer of ``--preset gpu`` and ``--preset paper`` (batch 256, 128 px, full width): input
  time (a real batch read and augmented; for the gpu preset also a simulated pre-training batch), the Trainer's
  step (loss, loss scaling, clipping, schedule), a bare forward + backward + Adam step (the Trainer's autocast
  dtype, a sum of squares of the outputs as the loss), peak GPU memory of each;
- ``resume``: a few pre-training steps interrupted after the first checkpoint, a new Trainer resumes from last.pt
  and finishes (the check: it resumed at that step and ended at the planned step count);
- ``refinement``: refine.driver.refine, particles/s at 64 and 128 px, local from 10° starts and global from
  random starts, batches of 128 and 512 (median error against the truth as a sanity check).

Rates are items per second (matrices, images, particles, training images); the first call of each case is a
warm-up outside the timing. ``--quick`` shrinks everything (32 px, tiny width, a few particles) for the CI smoke
run on a CPU (tests/test_gpu_benchmark.py).

  python benchmarks/gpu.py --device cuda --out benchmarks/out/gpu          # target: ≤ 8 minutes on an H100
  python benchmarks/gpu.py --device cpu --quick --out /tmp/gpu_smoke      # the smoke run (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryoforum_plugin.data import DEFAULT_MAP  # noqa: E402
from cryoforum_plugin.errors import CryoforumError  # noqa: E402
from cryoforum_plugin.formats.files import read_particles  # noqa: E402
from cryoforum_plugin.formats.loader import auto_workers  # noqa: E402
from cryoforum_plugin.infer.metrics import geodesic_errors  # noqa: E402
from cryoforum_plugin.infer.predict import predict  # noqa: E402
from cryoforum_plugin.nn import precision  # noqa: E402
from cryoforum_plugin.nn.model import qcqp_matrix, qcqp_solve  # noqa: E402
from cryoforum_plugin.physics import rotations  # noqa: E402
from cryoforum_plugin.physics.resample import resized_map  # noqa: E402
from cryoforum_plugin.progress import Events  # noqa: E402
from cryoforum_plugin.refine.driver import refine  # noqa: E402
from cryoforum_plugin.runtime import compiled, resolve_device  # noqa: E402
from cryoforum_plugin.sim.dataset import simulate  # noqa: E402
from cryoforum_plugin.train.config import TrainConfig, build  # noqa: E402
from cryoforum_plugin.train.model_dir import ModelDir  # noqa: E402
from cryoforum_plugin.train.trainer import Trainer  # noqa: E402
from refine import rotate_by  # noqa: E402  (benchmarks/refine.py)

PHASES = ("eigh", "forward", "prediction", "training_step", "resume", "refinement")
SIZES = {  # the sizes, and the smoke run's
    "full": dict(eigh_batches=(256, 1024, 4096), box=128, width=1.0, forward_batch=512, predict_n=50_000,
                 predict_batch=512, train_batch=256, train_particles=4000, resume=(64, 0.25, 64, 4),
                 refine_boxes=(64, 128), refine_n={64: (4096, 1024), 128: (2048, 512)}, refine_batches=(128, 512),
                 min_seconds=1.0),
    "quick": dict(eigh_batches=(16,), box=32, width=0.05, forward_batch=4, predict_n=48, predict_batch=16,
                  train_batch=4, train_particles=48, resume=(32, 0.05, 4, 2), refine_boxes=(32,),
                  refine_n={32: (8, 4)}, refine_batches=(4, 8), min_seconds=0.0),
}


class Quiet(Events):
    """Events that print nothing; ``abort_at``: raise KeyboardInterrupt at that abort poll (one per step)."""

    def __init__(self, abort_at: int = 0):
        super().__init__()
        self.abort_at, self.polls = abort_at, 0

    def message(self, text: str) -> None:
        pass

    def check_abort(self) -> None:
        self.polls += 1
        if self.abort_at and self.polls == self.abort_at:
            raise KeyboardInterrupt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: torch.device, min_seconds: float, min_calls: int = 2) -> float:
    """Mean wall-clock seconds of ``fn()`` after one warm-up call: at least ``min_calls`` calls and
    ``min_seconds`` seconds, the device synchronised before and after."""
    fn()
    sync(device)
    t0, calls = time.perf_counter(), 0
    while calls < min_calls or time.perf_counter() - t0 < min_seconds:
        fn()
        calls += 1
    sync(device)
    return (time.perf_counter() - t0) / calls


def peak_gb(device: torch.device, fn) -> float | None:
    """Peak GPU memory (GB) allocated while ``fn()`` runs; None on a CPU."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 1e9


class Report:
    """The rows of every phase, written to ``path`` (JSON) after each row and printed as a table line."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.data, self.t0 = path, {**meta, "phases": {}}, time.time()

    def add(self, phase: str, case: str, rate: float, unit: str, **extra) -> None:
        row = {"case": case, "rate": rate, "unit": unit, **extra}
        self.data["phases"].setdefault(phase, {"rows": []})["rows"].append(row)
        self.data["total_seconds"] = round(time.time() - self.t0, 1)
        self.path.write_text(json.dumps(self.data, indent=1))
        details = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items())
        print(f"{phase:<14}{case:<34}{rate:>12.1f} {unit:<12}{details}", flush=True)

    def skip(self, phase: str, case: str, why: str) -> None:
        """A case that did not run (``why``: 'cpu', or an error's text), listed beside the phase's rows."""
        self.data["phases"].setdefault(phase, {"rows": []}).setdefault("skipped_cases", []).append(
            {"case": case, "skipped": why})
        self.path.write_text(json.dumps(self.data, indent=1))
        print(f"{phase:<14}{case:<34}{'skipped':>12} {why[:200]}", flush=True)

    def done(self, phase: str, seconds: float) -> None:
        self.data["phases"].setdefault(phase, {"rows": []})["seconds"] = round(seconds, 1)
        self.path.write_text(json.dumps(self.data, indent=1))


# ---------------------------------------------------------------------------------------------- phases


def phase_eigh(rep: Report, dev: torch.device, z: dict, work: Path) -> None:
    for b in z["eigh_batches"]:
        theta = torch.randn(b, 10, device=dev, requires_grad=True)

        def forward():
            with torch.no_grad():
                qcqp_solve(qcqp_matrix(theta, "symmetric"))

        def backward():
            q, ev = qcqp_solve(qcqp_matrix(theta, "symmetric"))
            (q.sum() + ev.sum()).backward()

        for name, fn in (("forward", forward), ("forward+backward", backward)):
            s = seconds_per_call(fn, dev, z["min_seconds"])
            rep.add("eigh", f"{name} batch {b}", b / s, "matrices/s", ms_per_call=1e3 * s)


def phase_forward(rep: Report, dev: torch.device, z: dict, work: Path) -> None:
    for head in ("qcqp", "grid"):
        pre, net = build(TrainConfig(box=z["box"], width=z["width"], head=head))
        net = net.to(dev).eval()
        x = torch.randn(z["forward_batch"], pre.channels, z["box"], z["box"], device=dev)
        for setting in ("default", "cudnn.benchmark", "channels_last", "compile"):
            torch.backends.cudnn.benchmark = setting != "default"
            fmt = torch.channels_last if setting == "channels_last" else torch.contiguous_format
            net, xs = net.to(memory_format=fmt), x.contiguous(memory_format=fmt)
            if setting == "compile" and dev.type != "cuda":
                rep.skip("forward", f"{head} {setting}", "cpu")
                continue
            model = compiled(net, dev, setting == "compile")  # net itself for the other settings

            def forward():
                with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    model(xs)

            try:
                s = seconds_per_call(forward, dev, z["min_seconds"])  # the warm-up call compiles
            except Exception as err:  # torch.compile can fail on an install (no Triton, an old GPU): recorded
                if setting != "compile":
                    raise
                rep.skip("forward", f"{head} {setting}", f"{type(err).__name__}: {err}"[:2000])
                continue
            rep.add("forward", f"{head} {setting}", len(x) / s, "images/s", batch=len(x), box=z["box"],
                    width=z["width"])
    torch.backends.cudnn.benchmark = False


def simulated_set(work: Path, n: int, box: int, dev: torch.device, seed: int):
    """``n`` particles of the embedded map at ``box`` px (SNR 0.1, CTF, shifts ≤ 2 px), simulated once per work
    directory; the ParticleSet (true poses) and the seconds simulation took (0 when reused)."""
    out = work / f"sim_{n}_{box}_{seed}"
    t0 = time.time()
    if not (out / "particles.star").exists():
        apix = resized_map(DEFAULT_MAP, box)[1]
        simulate(DEFAULT_MAP, out, n=n, box=box, snr=0.1, max_shift=2 * apix, seed=seed, progress=False,
                 chunk=2000, device=dev)
    return read_particles(out / "particles.star"), round(time.time() - t0, 1)


def gpu_preset(z: dict, **over) -> TrainConfig:
    """The gpu preset's configuration at the run's box and width (``over``: other options)."""
    return TrainConfig.from_args({"preset": "gpu", "box": z["box"], "width": z["width"], **over})


def phase_prediction(rep: Report, dev: torch.device, z: dict, work: Path) -> None:
    ps, sim_s = simulated_set(work, z["predict_n"], z["box"], dev, seed=1)
    model = work / "untrained_gpu_preset"
    ModelDir(model).write_untrained(gpu_preset(z))
    for workers in (-1, 0):
        used = auto_workers(dev) if workers < 0 else workers
        pred = predict(ps, model, device=dev, batch=z["predict_batch"], progress=False, workers=workers)
        rep.add("prediction", f"workers {'auto' if workers < 0 else 0} ({used})", pred.particles_per_second,
                "particles/s", particles=len(ps), box=z["box"], batch=z["predict_batch"], seconds=pred.seconds,
                simulate_seconds=sim_s)


def phase_training_step(rep: Report, dev: torch.device, z: dict, work: Path) -> None:
    ps, _ = simulated_set(work, z["predict_n"], z["box"], dev, seed=1)
    ps = ps.subset(np.arange(min(len(ps), z["train_particles"])))
    b = z["train_batch"]
    for preset in ("gpu", "paper"):
        over = {"box": z["box"], "width": z["width"], "batch": b}
        if preset == "gpu":
            over["from_map"] = str(DEFAULT_MAP)
        cfg = TrainConfig.from_args({"preset": preset, **over})
        trainer = Trainer(ps, work / f"train_{preset}", cfg, dev, progress=False, events=Quiet())
        rows = trainer.split["train"][:b]
        t0 = time.perf_counter()
        raw = trainer.source.batch(rows)
        read_s = time.perf_counter() - t0
        x, target = trainer._inputs(rows, raw, augmented=True)
        input_s = seconds_per_call(lambda: trainer._inputs(rows, raw, augmented=True), dev, z["min_seconds"])
        extra = {"read_s": read_s, "augment_preprocess_s": input_s}
        if cfg.pretrain_steps:
            t0 = time.perf_counter()
            trainer.pretraining.setup()
            extra["pretrain_setup_s"] = time.perf_counter() - t0
            extra["synthetic_batch_s"] = seconds_per_call(lambda: trainer.synthetic_batch(0), dev, z["min_seconds"])
        trainer.net.train()
        step_s = seconds_per_call(lambda: trainer._step(x, target, 0.5), dev, z["min_seconds"])
        step_gb = peak_gb(dev, lambda: trainer._step(x, target, 0.5))
        net, opt = trainer.model, torch.optim.Adam(trainer.model.parameters(), lr=1e-4)

        def bare():
            with precision.autocast(dev, trainer.autocast_dtype):
                out = net(x)
            loss = sum(v.float().square().mean() for v in out.values() if v.requires_grad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        bare_s = seconds_per_call(bare, dev, z["min_seconds"])
        bare_gb = peak_gb(dev, bare)
        trainer.source.close()
        rep.add("training_step", f"--preset {preset} ({cfg.head} head)", b / step_s, "images/s", batch=b,
                box=cfg.box, width=cfg.width, step_s=step_s, bare_step_s=bare_s, peak_gpu_gb_step=step_gb,
                peak_gpu_gb_bare=bare_gb, **extra)


def phase_resume(rep: Report, dev: torch.device, z: dict, work: Path) -> None:
    box, width, batch, steps = z["resume"]
    ps, _ = simulated_set(work, z["predict_n"], z["box"], dev, seed=1)
    ps = ps.subset(np.arange(min(len(ps), z["train_particles"])))
    over = dict(box=box, width=width, batch=batch, pretrain_steps=2 * steps, pretrain_log_every=steps, epochs=1,
                max_particles=4 * batch, from_map=str(DEFAULT_MAP))
    out = work / "resume_model"
    t0 = time.perf_counter()
    first = Trainer(ps, out, gpu_preset(z, **over), dev, progress=False, events=Quiet(abort_at=steps + 1))
    try:
        first.train()
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    first.source.close()
    second = Trainer(ps, out, gpu_preset(z, **over), dev, progress=False, events=Quiet())
    resumed = second.resume()
    at = second.pretrain_step
    second.train()
    last = second.log[-1]["step"]
    ok = interrupted and resumed and at == steps and last == second.total_steps
    rep.add("resume", f"interrupted at step {steps + 1}, resumed", second.total_steps / (time.perf_counter() - t0),
            "steps/s", continues=ok, resumed_at_step=at, last_step=last, total_steps=second.total_steps,
            box=box, batch=batch)


def phase_refinement(rep: Report, dev: torch.device, z: dict, work: Path) -> None:
    rng = np.random.default_rng(0)
    for box in z["refine_boxes"]:
        n_local, n_global = z["refine_n"][box]
        truth, _ = simulated_set(work, n_local, box, dev, seed=2)
        vol, apix = resized_map(DEFAULT_MAP, box)
        local = dataclasses.replace(truth, quat=rotate_by(truth.quat, 10.0, rng), shift_A=np.zeros((n_local, 2)))
        rand = dataclasses.replace(local, quat=rotations.random_quats(n_local, rng))
        refine(local.subset(np.arange(min(8, n_local))), vol, reference_pixel_size=apix, global_search="all",
               batch=8, device=dev, progress=False)  # warm-up: kernels, FFT plans
        for mode, starts, n in (("local", local, n_local), ("global", rand, n_global)):
            for b in z["refine_batches"]:
                sel = starts.subset(np.arange(n))
                res = refine(sel, vol, reference_pixel_size=apix, global_search="none" if mode == "local" else "all",
                             start_error_deg=np.full(n, 10.0) if mode == "local" else None, batch=b, device=dev,
                             progress=False)
                err = np.degrees(geodesic_errors(res.quat, truth.quat[:n]))
                rep.add("refinement", f"{mode} {box} px batch {b}", res.particles_per_second, "particles/s",
                        particles=n, seconds=res.seconds, median_error_deg=float(np.median(err)))


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the CI smoke run)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gpu", help="writes OUT/gpu.json")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    args = ap.parse_args(argv)
    try:
        dev = resolve_device(args.device)
    except CryoforumError as err:  # e.g. --device cuda without a GPU: one line, no traceback
        ap.error(f"--device: {err}")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        ap.error(f"--phases: unknown {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    z = SIZES["quick" if args.quick else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    meta = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick,
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "sizes": {
                k: v for k, v in z.items() if k != "refine_n"}}
    rep = Report(args.out / "gpu.json", meta)
    print(f"{'phase':<14}{'case':<34}{'rate':>12} {'unit':<12}details  ({dev})", flush=True)
    for name in phases:
        t0 = time.time()
        torch.manual_seed(0)
        globals()[f"phase_{name}"](rep, dev, z, work)
        rep.done(name, time.time() - t0)
    print(f"total {rep.data['total_seconds']:.0f} s -> {rep.path}")
    return rep.data


if __name__ == "__main__":
    main()
