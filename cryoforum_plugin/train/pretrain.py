"""Pre-training from a map (issue 14) and its --time-budget (issue 19): the synthetic particles and the plan.

With ``pretrain_steps`` > 0 the first steps see only synthetic particles, freshly simulated on the training device
for every batch (sim.batches.MapParticleSimulator): projections of the map (``from_map``, or by default a
reconstruction of the TRAINING split at its poses, FSC-weighted from its half-maps) at uniformly random
orientations, with the CTFs and shifts of the training particles and Gaussian noise of the spectrum measured on
the training particles against that map (noise.estimate_noise_spectrum), at the measured SNR (or
``synthetic_snr``; ``synthetic_snr_start`` anneals from another one over the first ``synthetic_snr_anneal`` of the
pre-training steps). The Trainer runs the steps with the same preprocessing (the --whiten filter included, so
the synthetic particles' coloured noise is whitened as the real particles' is), augmentations, loss and one
learning-rate schedule as the real epochs that follow.

With ``time_budget`` (minutes) the first BUDGET_CALIBRATION_STEPS pre-training steps are timed and
``plan_budget`` sets the pre-training steps and the real epochs: the real epochs are cut (with a WARNING) when
they would leave the pre-training less than PRETRAIN_SHARE of the time left; the plan is in config.json and in
every checkpoint (the first one is written after it), so a resume keeps it.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from cryoforum_plugin import runtime
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.loader import ImageSource
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics import symmetry
from cryoforum_plugin.train.config import TrainConfig
from cryoforum_plugin.train.model_dir import ModelDir

RECONSTRUCTION = "reconstruction of the training split"
BUDGET_CALIBRATION_STEPS = 20  # pre-training steps timed before --time-budget sizes the rest
PRETRAIN_SHARE = 0.5  # --time-budget: the least share of the time left after the timing that pre-training keeps


def plan_pretrain_steps(budget_s: float, elapsed_s: float, step_s: float, eval_s: float, steps_done: int,
                        log_every: int, real_steps: int, real_evals: int) -> int:
    """Pre-training steps (in all, ``steps_done`` included) that end a training at ``budget_s`` seconds: after
    ``elapsed_s`` spent so far, every further step costs ``step_s`` seconds plus one validation (``eval_s``) per
    ``log_every`` steps, and the real epochs cost ``real_steps`` steps and ``real_evals`` validations. Never fewer
    than ``steps_done``."""
    left = budget_s - elapsed_s - real_steps * step_s - real_evals * eval_s
    per_step = step_s + eval_s / max(log_every, 1)
    return max(int(steps_done), int(steps_done + max(left, 0.0) // max(per_step, 1e-9)))


@dataclasses.dataclass
class BudgetPlan:
    """What --time-budget chose (``plan_budget``): the pre-training steps and the real epochs to run."""

    pretrain_steps: int  # pre-training steps in all (the timing steps included)
    epochs: int  # real epochs kept
    epochs_planned: int  # real epochs asked for (--epochs, or the preset's)
    left_s: float  # seconds of the budget left when the plan was made
    step_s: float  # measured seconds per optimiser step
    epoch_s: float  # estimated seconds per real epoch (its steps and one validation)

    @property
    def capped(self) -> bool:
        """Whether real epochs were dropped so that the pre-training keeps its share of the budget."""
        return self.epochs < self.epochs_planned

    def message(self, budget_min: float) -> str:
        """The line the training prints: a WARNING naming the numbers when real epochs were dropped."""
        numbers = (f"{self.step_s:.3f} s per step, {self.epoch_s / 60:.1f} min per real epoch, "
                   f"{self.left_s / 60:.1f} min left")
        if not self.capped:
            return (f"[cryo-forum] time budget {budget_min:g} min: {numbers} -> {self.pretrain_steps} pre-training "
                    f"steps, {self.epochs} real epochs")
        return (f"WARNING: time budget {budget_min:g} min: {numbers}; the {self.epochs_planned} real epochs planned "
                f"would leave the pre-training less than {PRETRAIN_SHARE:.0%} of the time left, so {self.epochs} of "
                f"{self.epochs_planned} are kept, with {self.pretrain_steps} pre-training steps. For all "
                f"{self.epochs_planned}: a larger --time-budget, --time-budget 0 (no limit), or fewer particles "
                f"per epoch (--max-particles).")


def plan_budget(budget_s: float, elapsed_s: float, step_s: float, eval_s: float, steps_done: int, log_every: int,
                steps_per_epoch: int, epochs: int, share: float = PRETRAIN_SHARE) -> BudgetPlan:
    """--time-budget's plan: the real epochs (each ``steps_per_epoch`` steps of ``step_s`` seconds and one
    validation of ``eval_s`` seconds) get at most ``1 - share`` of the time left (``budget_s - elapsed_s``,
    seconds); as many of the ``epochs`` as fit are kept (possibly none: pre-training only), and the pre-training
    gets the rest (``plan_pretrain_steps``), so at least ``share`` of the time left, however many particles."""
    left = max(budget_s - elapsed_s, 0.0)
    epoch_s = steps_per_epoch * step_s + eval_s
    kept = min(int(epochs), int((1.0 - share) * left // max(epoch_s, 1e-9)))
    n = plan_pretrain_steps(budget_s, elapsed_s, step_s, eval_s, steps_done, log_every, kept * steps_per_epoch, kept)
    return BudgetPlan(n, kept, int(epochs), left, step_s, epoch_s)


class Pretraining:
    """The pre-training of one Trainer: its simulator of synthetic particles (built by ``setup``, with the training
    map and the noise model, which it writes to the model directory), the step count and the simulator's random
    generator (both checkpointed: ``state_dict``, ``load_state_dict``) and the --time-budget plan (``plan``), which
    sets ``cfg.pretrain_steps`` and ``cfg.epochs`` (the Trainer's configuration, shared)."""

    def __init__(self, ps: ParticleSet, train_rows: np.ndarray, source: ImageSource, cfg: TrainConfig,
                 out: ModelDir, device: torch.device, rank: int, started: float):
        """``train_rows``: the training split (rows of ``ps``, read through ``source``); ``rank``: this process's
        rank (each rank simulates its own particles); ``started``: time.time() when the training began (the
        --time-budget counts from there)."""
        self.ps, self.rows, self.source, self.cfg, self.out = ps, train_rows, source, cfg, out
        self.device, self.rank, self.started = device, rank, started
        self.step = 0  # pre-training steps done
        self.sim = None  # sim.batches.MapParticleSimulator, after ``setup``
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + 7 + rank)
        self.info: dict | None = None  # what synthetic.json records (model_dir.py), after ``setup``
        self.plan: BudgetPlan | None = None  # --time-budget's plan, once made (a resume finds it in the config)
        self._gen_state = None  # a checkpoint's generator state, set once the simulator exists

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """The checkpoint's keys of the pre-training: the steps done and the simulator's generator state."""
        return {"pretrain_step": self.step, "sim_gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint (``state_dict``'s keys; those written before pre-training existed load too)."""
        self.step = state.get("pretrain_step", 0)
        if "sim_gen" in state:
            self._gen_state = state["sim_gen"].cpu()

    def keep_plan(self, stored: TrainConfig) -> None:
        """On a resume with the same --time-budget: the counts its plan chose (``stored``, the checkpoint's
        configuration) replace the ones asked for, so the resumed training runs the plan."""
        if self.cfg.time_budget and stored.time_budget == self.cfg.time_budget:
            self.cfg.pretrain_steps = stored.pretrain_steps
            if stored.epochs <= self.cfg.epochs:
                self.cfg.epochs = stored.epochs

    # ------------------------------------------------------------------ the time budget
    def make_plan(self, step_s: float, eval_s: float, steps_per_epoch: int) -> BudgetPlan:
        """--time-budget, after the timed steps (``step_s`` seconds per step, ``eval_s`` per validation): the plan
        (``plan_budget``, the same on every rank), which sets ``cfg.pretrain_steps`` and ``cfg.epochs``."""
        cfg = self.cfg
        plan = plan_budget(60.0 * cfg.time_budget, time.time() - self.started, step_s, eval_s, self.step,
                           cfg.pretrain_log_every, steps_per_epoch, cfg.epochs)
        plan.pretrain_steps = runtime.broadcast_int(plan.pretrain_steps)  # every rank runs the same numbers
        plan.epochs = runtime.broadcast_int(plan.epochs)
        cfg.pretrain_steps, cfg.epochs = plan.pretrain_steps, plan.epochs
        self.plan = plan
        return plan

    # ------------------------------------------------------------------ synthetic particles
    def training_map(self) -> tuple[np.ndarray, dict]:
        """(map on the particles' grid (box³ at their pixel size), provenance): ``from_map`` resampled, or the
        FSC-weighted reconstruction of the training split (never validation or test particles)."""
        from cryoforum_plugin.physics.resample import map_on_particle_grid

        apix, box = self.ps.require_one_sampling("pre-training from a map")
        if self.cfg.from_map:
            vol = map_on_particle_grid(self.cfg.from_map, box, apix, device="cpu").numpy()
            return vol, {"map": self.cfg.from_map}
        from cryoforum_plugin.physics.fsc import fsc_weighted, resolution
        from cryoforum_plugin.physics.reconstruct import reconstruct

        t0 = time.time()
        maps = reconstruct(self.ps.subset(self.rows), halves=True, device=self.device, progress=False)
        vol, curve = fsc_weighted(maps)
        return vol, {"map": RECONSTRUCTION, "map_file": "training_map.mrc", "map_particles": len(self.rows),
                     "half_map_fsc_0.143_A": resolution(curve, box, apix, 0.143),
                     "map_weighting": "sqrt(2 FSC / (1 + FSC)) of the half-maps",
                     "map_seconds": round(time.time() - t0, 1)}

    def setup(self) -> None:
        """Build the simulator (map, noise model of the training particles); on a resume the stored ones."""
        from cryoforum_plugin.formats.mrc import read_map
        from cryoforum_plugin.physics.noise import NoiseModel, estimate_noise_spectrum
        from cryoforum_plugin.sim.batches import MapParticleSimulator

        cfg, apix = self.cfg, float(self.ps.pixel_size[0])
        train = self.ps.subset(self.rows)
        stored = self.out.synthetic() if self.step > 0 else None
        if stored is not None:
            noise = NoiseModel.from_dict(stored["noise_model"])
            if stored["map"] == RECONSTRUCTION:
                vol = read_map(self.out.path / stored["map_file"])[0]
            else:
                vol = self.training_map()[0]
            info = stored
        else:
            t0 = time.time()
            vol, info = self.training_map()
            cached = self.source._cache
            images = None if cached is None else cached[torch.as_tensor(self.rows)]
            noise = estimate_noise_spectrum(train, vol, images=images, device=self.device, seed=cfg.seed)
            snr = cfg.synthetic_snr if cfg.synthetic_snr else noise.snr
            if not (snr > 0 and math.isfinite(snr)):
                raise CryoforumError(f"the SNR measured on the training particles against the map is {snr}.",
                                     fix="check the map (--from-map) matches the particles, or set --synthetic-snr.")
            info = {**info, "data_snr": noise.snr, "snr": snr, "snr_start": cfg.synthetic_snr_start,
                    "orientations": "uniform", "noise_particles": min(len(train), 2000),
                    "setup_seconds": round(time.time() - t0, 1), "noise_model": noise.to_dict()}
            if self.rank == 0:
                if info["map"] == RECONSTRUCTION:
                    self.out.write_training_map(vol, apix)
                self.out.write_synthetic(info)
        sim_box = min(cfg.box, int(self.ps.box[0]))  # simulate at the training box: Fourier cropping commutes
        self.sim = MapParticleSimulator.from_particles(train, vol, apix, noise=noise, snr=info["snr"],
                                                       device=self.device, box=sim_box, per_image_snr=False)
        self.info = info
        if self._gen_state is not None:
            self.gen.set_state(self._gen_state)
            self._gen_state = None

    def snr_at(self, step: int) -> float:
        """The pre-training SNR at ``step`` (geometric anneal from ``synthetic_snr_start``)."""
        from cryoforum_plugin.sim.batches import snr_at

        end, start = self.info["snr"], self.cfg.synthetic_snr_start
        if not start:
            return end
        return snr_at(step / max(self.cfg.synthetic_snr_anneal * self.cfg.pretrain_steps, 1), start, end)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | torch.Tensor | None]:
        """One freshly simulated batch at ``step``, before preprocessing and augmentation: (raw images (B, N, N)
        on the device, their (B, 4) target quaternions on the device (in the asymmetric unit with
        --restrict-to-asu), their rows of ``sim.ctf_pool`` (None without CTFs; a tensor on the device with a GPU
        generator: sim.batches.MapParticleSimulator._draw))."""
        snr = self.snr_at(step)
        raw, quats, p = self.sim.batch(self.cfg.batch, self.gen, snr_scale=snr / self.info["snr"], return_params=True)
        q = quats.double()
        if not isinstance(p["quat"], torch.Tensor):  # drawn on the host (a CPU generator): reduced there as ever
            q = q.cpu().numpy()
        q = rotations.normalize(q)  # a GPU generator's draws are reduced on the GPU: the targets never leave it
        if self.cfg.restrict_to_asu:
            q = symmetry.reduce_to_asu(q, self.cfg.sym)
        target = torch.as_tensor(q, dtype=torch.float32, device=self.device)
        return raw, target, p["ctf_rows"]
