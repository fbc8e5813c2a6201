"""Siamese training of the orientation network (the paper), with checkpoints, resume and a per-epoch log.

One optimiser step per batch of the loss of losses.py (the Siamese loss with its curriculum, or the grid head's
soft-target cross-entropy) plus l2 · Σ w², its gradient clipped to GRAD_CLIP; one one-cycle learning-rate schedule
over every step (T = ``total_steps``). With ``pretrain_steps`` > 0 the first steps are the pre-training on
synthetic particles simulated from a map, sized by --time-budget when given (pretrain.py); then come ``epochs``
on the real particles. Validation is on the real validation particles throughout: one log row (log.csv) and one
checkpoint (last.pt, best.pt when the validation error improved) per real epoch or per ``pretrain_log_every``
pre-training steps, and ``resume`` continues from last.pt. ``whiten`` fixes the input whitening from the training
particles (nn.preprocess.Preprocess.fit, stored with the model; real and synthetic images go through it alike);
``balance_views`` draws the particles of every real epoch with views.view_balance_weights (with replacement; the
epoch keeps its number of steps) instead of a permutation.

On a GPU the network runs in mixed precision (``precision``: nn.precision.resolve; float16 with a GradScaler) with
the fused Adam, cuDNN autotuning and TF32 (runtime.tune_for). No step waits for the GPU: its metrics stay on the
device (StepMetrics) and are read once per log row; a step whose loss is not finite changes nothing (its
gradients are made NaN, which the scaler's step skips) and the next log row stops the training with an error,
before its checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch

from cryoforum_plugin import __version__
from cryoforum_plugin import runtime
from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics import symmetry
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.loader import ImageSource, auto_workers, split_rows
from cryoforum_plugin.train.model_dir import ModelDir
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.nn import precision
from cryoforum_plugin.nn.preprocess import to_model_grid, augment, phase_flipped
from cryoforum_plugin.progress import Events, Progress
from cryoforum_plugin.train.config import TrainConfig, build
from cryoforum_plugin.train.losses import curriculum, grid_loss, siamese_loss
from cryoforum_plugin.train.pretrain import BUDGET_CALIBRATION_STEPS, Pretraining
from cryoforum_plugin.train.step_metrics import StepMetrics
from cryoforum_plugin.train.views import view_balance_weights
from cryoforum_plugin.nn.uncertainty import trace_scale

GRAD_CLIP = 10.0  # global gradient-norm clip: eigh's backward can spike when eigenvalues nearly coincide


class Trainer:
    """Trains on a ParticleSet with poses and writes MODEL_DIR (config.json, split.json, best.pt, last.pt, log.csv)."""

    def __init__(self, ps: ParticleSet, out_dir, config: TrainConfig, device: torch.device, progress: bool = True,
                 events: Events | None = None, workers: int = -1, cache_gb: float = 2.0, compile: bool = False):
        if not ps.has_poses.all():
            r = int(np.argmax(~ps.has_poses))
            raise CryoforumError("training particles need poses; this one has none.", path=ps.path, row=r,
                                 fix="train on a refinement's particles (e.g. Refine3D run_data.star, a cryoSPARC "
                                     "refinement's particles with alignments3D).")
        if config.pretrain_steps and config.from_map and not Path(config.from_map).is_file():
            raise CryoforumError("the map to pre-train from does not exist.", path=config.from_map,
                                 fix="pass the consensus map (.mrc) to --from-map, or leave it out to use a "
                                     "reconstruction of the training particles.")
        if config.pretrain_steps:  # the training map and its noise model live on one grid
            ps.require_one_sampling("pre-training from a map")
        created = time.time()  # --time-budget counts from here
        if config.time_budget and not config.pretrain_steps:
            raise CryoforumError("--time-budget sizes the pre-training, which is off (--pretrain-steps 0).",
                                 fix="give --pretrain-steps N (any N > 0: the budget replaces it) or --preset cpu, "
                                     "or leave --time-budget out.")
        self.rank, self.world = runtime.init_from_env(device)
        device = runtime.local_device(device)
        self.ps, self.out, self.cfg, self.device = ps, ModelDir(out_dir), config, device
        self.progress, self.events = progress and self.rank == 0, events or Events()
        self.workers = auto_workers(device) if workers < 0 else workers
        self.autocast_dtype, self.scaled = precision.resolve(config.precision, device)
        runtime.tune_for(device)
        self.out.create()
        symmetry.canonical_name(config.sym)
        self.group = torch.as_tensor(symmetry.group_quats(config.sym), dtype=torch.float32, device=device)
        targets = rotations.normalize(ps.quat)
        if config.restrict_to_asu:  # the paper's protocol: unique targets in the asymmetric unit, plain distances
            targets = symmetry.reduce_to_asu(targets, config.sym)
            self.group = self.group[:1]
        self.targets = torch.as_tensor(targets, dtype=torch.float32)
        self.split = split_rows(len(ps), config.val_fraction, config.test_fraction, config.seed, ps.quat,
                                stratify=config.split == "stratified")
        if config.max_particles and len(self.split["train"]) > config.max_particles:
            rng = np.random.default_rng(config.seed + 1)
            self.split["train"] = np.sort(rng.choice(self.split["train"], config.max_particles, replace=False))
        if len(self.split["train"]) < 2 or len(self.split["val"]) < 1:
            raise CryoforumError(f"too few particles ({len(ps)}) for a training and a validation set.", path=ps.path,
                                 fix="use more particles or a smaller --test-fraction / larger --val-fraction.")
        self.source = ImageSource(ps, cache_bytes=cache_gb * 1e9, device=device)  # a GPU keeps it if it fits
        torch.manual_seed(config.seed)
        self.gen = torch.Generator().manual_seed(config.seed)
        rows = self.split["train"][: min(2000, len(self.split["train"]))]
        sample = self.source.batch(rows).cpu()  # fitted on the host (a GPU may hold the cache)
        sample = to_model_grid(sample, ps.pixel_size[rows], float(ps.pixel_size[0]), int(ps.box[0]))
        self.pre, self.net = build(config)
        self.whitening = self.pre.fit(sample, config.whiten)  # config.json's record (None with --whiten off)
        self.pre.to(device)
        self.view_weights, self.view_balance = None, None
        if config.balance_views:  # the real epochs' sampling probabilities over the training split
            weights, self.view_balance = view_balance_weights(ps.quat[self.split["train"]], config.sym)
            self.view_weights = torch.as_tensor(weights, dtype=torch.float64)
        self.net.to(device)
        self.model = self.net  # the bare network (checkpoints, L2); self.net may be its DDP wrapper
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[device] if device.type == "cuda" else None)
        self.net = runtime.compiled(self.net, device, compile, self.events)  # --compile: CUDA only
        self.per_rank = len(self.split["train"]) // self.world
        self.steps_per_epoch = math.ceil(self.per_rank / config.batch)
        if self.total_steps < 1:
            raise CryoforumError("nothing to train: --epochs 0 and --pretrain-steps 0.",
                                 fix="give --epochs and/or --pretrain-steps.")
        self.opt = torch.optim.Adam(self.net.parameters(), lr=config.lr, betas=(0.9, 0.99),
                                    fused=True if device.type == "cuda" else None)
        # float16: dynamic loss scaling; otherwise a fixed scale of 1 (exact), kept for its skip of non-finite steps
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16 if self.scaled else 1.0)
        self.sched = self._one_cycle()
        self.epoch, self.best = 0, float("inf")
        self.log: list[dict] = []
        self.pretraining = Pretraining(ps, self.split["train"], self.source, config, self.out, device, self.rank,
                                       started=created)

    @property
    def pretrain_step(self) -> int:
        """Pre-training steps done."""
        return self.pretraining.step

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole training (per rank): pre-training plus the real epochs."""
        return self.cfg.pretrain_steps + self.cfg.epochs * self.steps_per_epoch

    def _one_cycle(self, steps_done: int = 0):
        """The one-cycle schedule over ``self.total_steps``, advanced by ``steps_done`` steps."""
        sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=self.cfg.lr, total_steps=self.total_steps,
                                                    cycle_momentum=True, base_momentum=0.85, max_momentum=0.95)
        for _ in range(steps_done):
            sched.step()
        return sched

    def _plan_budget(self, step_s: float, eval_s: float) -> None:
        """--time-budget: the plan (``Pretraining.make_plan``: ``pretrain_steps`` and ``epochs``, real epochs dropped
        with a WARNING when they would leave the pre-training less than its share) and the schedule, so the training
        ends in the budget; config.json records the plan (the caller's next checkpoint is the first one)."""
        plan = self.pretraining.make_plan(step_s, eval_s, self.steps_per_epoch)
        self.sched = self._one_cycle(self.pretrain_step)
        if self.rank == 0:
            self._write_meta()
            self.events.message(plan.message(self.cfg.time_budget))

    # ------------------------------------------------------------------ distances
    def dist(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Symmetry-aware geodesic distance (radians) between (..., 4) quaternions."""
        return symmetry.symmetric_geodesic(p, q, self.group)

    def _batches(self, rows: np.ndarray, batch: int):
        """(rows, raw images) for consecutive chunks of ``rows``, read ahead by the loader processes."""
        return self.source.batches(rows, batch, workers=self.workers, pin_memory=self.device.type == "cuda")

    def _network_input(self, raw: torch.Tensor, target: torch.Tensor, augmented: bool, ctf, ctf_rows, pixel_size):
        """Raw (B, N, N) images (any device) and their (B, 4) targets on the device -> (network input, targets),
        augmented; ``ctf``/``ctf_rows``/``pixel_size`` give each image's CTF for the phase-flipped channel."""
        raw = raw.to(self.device, non_blocking=True)
        flipped = phase_flipped(raw, ctf, ctf_rows, pixel_size) if self.cfg.phase_flip else None
        if augmented:
            raw, target, flipped = augment(raw, target, self.gen, self.cfg.augment_psi, self.cfg.augment_shift,
                                           also=flipped)
        return self.pre(raw, flipped), target

    def _inputs(self, rows, raw: torch.Tensor, augmented: bool):
        """Raw (B, N, N) images of ``rows`` -> (network input on the device, (B, 4) targets), augmented."""
        target = self.targets[torch.as_tensor(rows)].to(self.device, non_blocking=True)
        # optics groups of other pixel sizes are brought to the first particle's sampling (the model's grid)
        grid_pixel, grid_box = float(self.ps.pixel_size[0]), int(self.ps.box[0])
        raw = to_model_grid(raw.to(self.device, non_blocking=True), self.ps.pixel_size[rows], grid_pixel, grid_box)
        return self._network_input(raw, target, augmented, self.ps.ctf, rows, grid_pixel)

    def loss(self, out: dict, target: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, per-image geodesic error (B,) in radians): the head's loss (losses.py) plus the L2 term."""
        cfg = self.cfg
        err = self.dist(out["quat"], target)
        if cfg.head == "grid":  # soft-target cross-entropy, no Siamese term (losses.py)
            total = grid_loss(out["logits"], target, self.model.grid, self.group, progress,
                              math.radians(cfg.grid_spacing))
        else:
            total = siamese_loss(out["quat"], target, err, self.group, progress, mode=cfg.loss,
                                 beta1_floor=cfg.beta1_floor, distance=cfg.distance_loss, n_pairs=cfg.pairs_per_batch,
                                 pairs=cfg.pairs, gen=self.gen)
        return total + cfg.l2 * self.model.l2_penalty(head=cfg.l2_head), err.detach()

    def _step(self, x: torch.Tensor, target: torch.Tensor,
              progress: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimiser step: (loss, (B,) per-image error, gradient norm), device tensors, no wait for the device.
        A loss that is not finite multiplies the gradients by NaN, so the scaler's step skips the update (weights
        and optimiser state unchanged; float16 overflows of the gradients are skipped alike)."""
        with precision.autocast(self.device, self.autocast_dtype):
            out = self.net(x)
        loss, err = self.loss({k: v.float() for k, v in out.items()}, target, progress)
        self.opt.zero_grad(set_to_none=True)
        guard = torch.where(torch.isfinite(loss), 1.0, float("nan"))  # 1 (exact) or NaN, on the device
        self.scaler.scale(loss * guard).backward()
        self.scaler.unscale_(self.opt)
        gnorm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), GRAD_CLIP)
        self.scaler.step(self.opt)
        self.scaler.update(None if self.scaled else 1.0)
        self.sched.step()
        return loss.detach(), err, gnorm.detach()

    def _read(self, metrics: StepMetrics) -> dict:
        """``metrics.read()``; the clear error when a step's loss was not finite (before the row's checkpoint: the
        checkpoints hold the model from before it); a WARNING when no step of the row had finite gradients (every
        update skipped: float16 overflows that loss scaling did not cure)."""
        values = metrics.read()
        steps = len(values["losses"])
        if steps and values["skipped"] == steps and not values["nonfinite"] and self.rank == 0:
            self.events.message(f"WARNING: none of the last {steps} steps had finite gradients; their updates were "
                                f"skipped (the model did not change). If this persists, train with --precision bf16 "
                                f"or fp32.")
        if values["nonfinite"]:
            raise CryoforumError(f"the training loss became NaN/inf in {values['nonfinite']} of the last "
                                 f"{len(values['losses'])} steps (their updates were skipped); stopped before the "
                                 f"next checkpoint.",
                                 fix="lower --lr, check the input images, or train with --precision fp32.")
        return values

    # ------------------------------------------------------------------ pre-training (pretrain.py)
    def synthetic_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(network input, targets) of one freshly simulated (``Pretraining.batch``), augmented batch."""
        raw, target, ctf_rows = self.pretraining.batch(step)
        sim = self.pretraining.sim
        return self._network_input(raw, target, True, sim.ctf_table, ctf_rows, sim.pixel_size)

    def _pretrain(self) -> None:
        """The pre-training steps left, a log row and a checkpoint every ``pretrain_log_every`` steps; with
        --time-budget the first BUDGET_CALIBRATION_STEPS steps are timed and make the plan."""
        cfg, pretraining = self.cfg, self.pretraining
        pretraining.setup()
        planning = cfg.time_budget > 0 and self.pretrain_step == 0
        while self.pretrain_step < cfg.pretrain_steps or planning:
            t0 = time.time()
            self.net.train()
            chunk = min(cfg.pretrain_log_every, cfg.pretrain_steps - self.pretrain_step)
            if planning:
                chunk = BUDGET_CALIBRATION_STEPS
            bar = Progress(chunk * cfg.batch, f"pre-training {self.pretrain_step + 1}-{self.pretrain_step + chunk}"
                           f"/{cfg.pretrain_steps}", enabled=self.progress, events=self.events)
            metrics = StepMetrics(self.device)
            for _ in range(chunk):
                with metrics.timed():
                    x, target = self.synthetic_batch(self.pretrain_step)
                metrics.add(*self._step(x, target, self.pretrain_step / max(self.total_steps - 1, 1)))
                pretraining.step += 1
                bar.update(cfg.batch)  # polls the events for an abort
            bar.close()
            values = self._read(metrics)  # waits for the device: the steps' time is complete
            t_eval = time.time()
            row = self._row(values, time.time() - t0, synthetic=True)
            if planning:  # before the first checkpoint: last.pt and config.json hold the planned counts throughout
                self._plan_budget((t_eval - t0) / chunk, time.time() - t_eval)
                planning = False
            self._end_of_row(row, f"pre-training step {self.pretrain_step:5d}/{cfg.pretrain_steps}  "
                                  f"SNR {row['snr']:.3g}")

    # ------------------------------------------------------------------ loop
    @torch.no_grad()
    def evaluate(self, rows, batch: int = 512) -> np.ndarray:
        """Per-particle error (radians) of the current network on ``rows`` (no augmentation)."""
        self.net.eval()
        errs, evals = [], []  # device tensors, read once at the end
        for chunk, raw in self._batches(rows, batch):
            x, t = self._inputs(chunk, raw, augmented=False)
            with precision.autocast(self.device, self.autocast_dtype):
                out = self.net(x)
            errs.append(self.dist(out["quat"].float(), t))
            if "evals" in out:
                evals.append(out["evals"].float())
        self.trace_scale = trace_scale(torch.cat(evals).cpu().numpy() if evals else None)
        return torch.cat(errs).cpu().numpy() if errs else np.zeros(0)

    def _row(self, values: dict, seconds: float, synthetic: bool) -> dict:
        """One log row: the steps' metrics (``StepMetrics.read``; 'timed_s' is the pre-training's simulation time)
        and validation on the real validation particles at the current step."""
        step = self.pretrain_step + self.epoch * self.steps_per_epoch  # optimiser steps done (per rank)
        val = self.evaluate(self.split["val"])
        b1, b2 = curriculum(self.cfg.loss, step / max(self.total_steps - 1, 1), self.cfg.beta1_floor)
        epoch = self.epoch if not synthetic else round((step - self.cfg.pretrain_steps) / self.steps_per_epoch, 3)
        losses, errs, gnorms = values["losses"], values["errs"], values["gnorms"]
        return {"epoch": epoch,
                "loss": float(np.mean(losses)) if len(losses) else float("nan"),
                "train_median_rad": float(np.median(errs)) if len(errs) else float("nan"),
                "val_median_rad": float(np.median(val)), "val_median_deg": float(np.degrees(np.median(val))),
                "lr": float(self.sched.get_last_lr()[0]), "beta1": b1, "beta2": b2,
                "seconds": round(seconds, 2),
                "grad_norm_median": float(np.median(gnorms)) if len(gnorms) else 0.0,
                "step": step, "synthetic": int(synthetic), "skipped_steps": values["skipped"],
                "snr": self.pretraining.snr_at(self.pretrain_step) if synthetic else float("nan"),
                "sim_seconds": round(values["timed_s"] if synthetic else 0.0, 2)}

    def _end_of_row(self, row: dict, label: str) -> None:
        self.log.append(row)
        improved = row["val_median_rad"] < self.best
        if improved:
            self.best = row["val_median_rad"]
        if self.rank == 0:
            self._checkpoint(improved)
        runtime.barrier()
        if self.progress:
            self.events.message(f"{label}  loss {row['loss']:.4f}  train {row['train_median_rad']:.3f} rad  "
                                f"val {row['val_median_rad']:.3f} rad ({row['val_median_deg']:.1f}°)  "
                                f"{row['seconds']:.1f} s" + ("  *best" if improved else ""))

    def train(self) -> dict:
        cfg = self.cfg
        if self.rank == 0:
            self._write_meta()
            self._announce_levers()
        if self.pretrain_step < cfg.pretrain_steps:
            self._pretrain()
        while self.epoch < cfg.epochs:
            t0 = time.time()
            self.net.train()
            n = len(self.split["train"])
            order = (torch.randperm(n, generator=self.gen) if self.view_weights is None else
                     torch.multinomial(self.view_weights, n, replacement=True, generator=self.gen))
            perm = self.split["train"][order.numpy()]
            perm = perm[: self.per_rank * self.world][self.rank::self.world]  # same permutation on every rank
            bar = Progress(len(perm), f"epoch {self.epoch + 1}/{cfg.epochs}", enabled=self.progress,
                           events=self.events)
            metrics = StepMetrics(self.device)
            for step, (rows, raw) in enumerate(self._batches(perm, cfg.batch)):
                if len(rows) < 2:
                    continue
                x, target = self._inputs(rows, raw, augmented=True)
                done = cfg.pretrain_steps + self.epoch * self.steps_per_epoch + step
                metrics.add(*self._step(x, target, done / max(self.total_steps - 1, 1)))
                bar.update(len(rows))  # polls the events for an abort
            bar.close()
            values = self._read(metrics)
            self.epoch += 1
            row = self._row(values, time.time() - t0, synthetic=False)
            self._end_of_row(row, f"epoch {self.epoch:3d}")
        self.source.close()
        return {"best_val_median_rad": self.best, "epochs": self.epoch, "log": self.log}

    def _announce_levers(self) -> None:
        """One line each for --whiten and --balance-views when they are not off (what config.json records)."""
        if self.whitening is not None:
            w = self.whitening
            self.events.message(f"[cryo-forum] whitening ({self.cfg.whiten}): {'on' if w['applied'] else 'off'}; "
                                f"noise colour of the training particles {w['colour']:.2f} (largest / smallest "
                                f"shell of the power outside the particle circle)")
        if self.view_balance is not None:
            v = self.view_balance
            self.events.message(f"[cryo-forum] balanced views: {v['occupied']} of {v['bins']} viewing-direction bins "
                                f"occupied, the largest holds {v['largest_bin_fraction']:.1%} of the training "
                                f"particles; each occupied bin is drawn equally often")

    # ------------------------------------------------------------------ files (the layout: model_dir.py)
    def _write_meta(self) -> None:
        meta = {"cryoforum_version": __version__, "config": dataclasses.asdict(self.cfg),
                "particles": str(self.ps.path), "n_particles": len(self.ps),
                "input_box": int(self.ps.box[0]), "input_pixel_size": float(self.ps.pixel_size[0]),
                "model_pixel_size": float(self.ps.pixel_size[0]) * int(self.ps.box[0]) / self.cfg.box,
                "device": str(self.device), "torch": torch.__version__}
        if self.cfg.pretrain_steps:
            meta["synthetic"] = "synthetic.json"
        if self.whitening is not None:
            meta["whitening"] = {"option": self.cfg.whiten, **self.whitening}
        if self.view_balance is not None:
            meta["view_balance"] = self.view_balance
        self.out.write_meta(meta)
        self.out.write_split(self.split, self.ps.uid)

    def _state(self) -> dict:
        """The checkpoint (model_dir.py's layout of last.pt)."""
        cuda_rng = {"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}
        return {"config": dataclasses.asdict(self.cfg), "preprocess": self.pre.state_dict(),
                "model": self.model.state_dict(), "epoch": self.epoch, "best": self.best,
                "trace_scale": getattr(self, "trace_scale", 1.0),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(), "log": self.log,
                "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(), **cuda_rng,
                **self.pretraining.state_dict()}

    def _checkpoint(self, improved: bool) -> None:
        self.out.save_checkpoint(self._state(), best=improved)
        self.out.write_log(self.log)

    def resume(self) -> bool:
        """Continue from MODEL_DIR/last.pt if it exists (same configuration required). Returns whether it did."""
        state = self.out.last_state(self.device)
        if state is None:
            return False
        stored = TrainConfig.from_dict(state["config"])
        self.pretraining.keep_plan(stored)  # the counts the --time-budget chose (_plan_budget)
        if stored != self.cfg:
            raise CryoforumError("the checkpoint was trained with other options.", path=self.out.path / "last.pt",
                                 fix="resume with the same options, or train into a new --out directory.")
        self.pre.load_state_dict(state["preprocess"])
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if "scaler" in state:  # checkpoints before --precision have none (their scale: 1, or float16's initial)
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best, self.log = state["epoch"], state["best"], state["log"]
        self.gen.set_state(state["gen"])  # CPU ByteTensors whatever the device (ModelDir.last_state)
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.pretraining.load_state_dict(state)
        return True
