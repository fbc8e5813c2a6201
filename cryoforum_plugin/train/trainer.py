"""Siamese training of the orientation network (the paper), with checkpoints, resume and a per-epoch log.

Loss per batch (B images, P pairs (i, j) drawn inside the batch, so memory grows with the pairs, never N²):
    β1 · 2·mean_i d(q̂_i, q_i)  +  β2 · mean_(i,j) |d(q̂_i, q̂_j) - d(q_i, q_j)|  +  l2 · Σ w²
with the curriculum β1 = max(floor, √(t/T)/2), β2 = 1 - √(t/T) ('siamese'; the paper: floor 0); β1 = 0
('siamese_noreg'); or β1 = 1/2, β2 = 0 ('single', one branch). d is the geodesic distance 2 acos|<p,q>| or, with
``distance_loss='chordal'``, 2 - 2|<p,q>|; symmetry-aware (minimum over the point group) with --sym.

The grid head (``head='grid'``, a classification over the SO(3) grid of model.py) has its own loss instead:
    -mean_i Σ_g t_i(g) log softmax(logits_i)(g)  +  l2 · Σ w²,   t_i(g) ∝ exp(-d(g, q_i)² / (2σ²))
the cross-entropy against soft targets around the true orientation (d symmetry-aware as above), with σ annealed
geometrically from 3 grid spacings at the start to 0.75 at the end (``grid_sigma``). The Siamese distance term,
the curriculum (``loss``) and ``distance_loss`` do not apply to it: the targets already teach every distance,
and the distribution, not a distance between two predictions, is what the head outputs. Reported errors are
the geodesic errors of its mode, as for the other heads.

Training from a map (issue 14): with ``pretrain_steps`` > 0 the first steps see only synthetic particles, freshly
simulated on the training device for every batch (synthetic.MapParticleSimulator): projections of the map
(``from_map``, or by default a reconstruction of the TRAINING split at its poses, FSC-weighted from its half-maps)
at uniformly random orientations, with the CTFs and shifts of the training particles and Gaussian noise of the
spectrum measured on the training particles against that map (noise.estimate_noise_spectrum), at the measured SNR
(or ``synthetic_snr``; ``synthetic_snr_start`` anneals from another one over the first ``synthetic_snr_anneal``
of the pre-training steps). The same preprocessing, augmentations,
loss and one learning-rate schedule span both phases (T counts the pre-training steps too); then come ``epochs``
on the real particles. Validation is on the real validation particles throughout. With ``time_budget`` (minutes)
the first 20 pre-training steps are timed and ``plan_budget`` sets the pre-training steps and the real epochs: the
real epochs are cut (with a WARNING) when they would leave the pre-training less than half of the time left; the
plan is in config.json and in every checkpoint (the first one is written after it), so a resume keeps it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch

from cryoforum_plugin import __version__
from cryoforum_plugin import runtime as distributed
from cryoforum_plugin.physics import rotations as geometry
from cryoforum_plugin.physics import symmetry
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.physics.fourier import fft3c, ifft3c, radius_3d
from cryoforum_plugin.formats.loader import ImageSource, auto_workers, split_rows
from cryoforum_plugin.train.model_dir import ModelDir
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.nn.preprocess import to_model_grid, augment, phase_flipped
from cryoforum_plugin.progress import Events, Progress
from cryoforum_plugin.train.config import TrainConfig, build
from cryoforum_plugin.nn.uncertainty import trace_scale

N_DISTANCE_BINS = 8
GRAD_CLIP = 10.0  # global gradient-norm clip: eigh's backward can spike when eigenvalues nearly coincide
RECONSTRUCTION = "reconstruction of the training split"



def curriculum(mode: str, progress: float, beta1_floor: float = 0.0) -> tuple[float, float]:
    """(β1, β2) at training progress t/T in [0, 1]; ``beta1_floor`` applies to 'siamese' only."""
    if mode == "single":
        return 0.5, 0.0
    s = math.sqrt(min(max(progress, 0.0), 1.0))
    return (0.0 if mode == "siamese_noreg" else max(beta1_floor, s / 2)), 1.0 - s


def grid_sigma(progress: float, spacing_rad: float) -> float:
    """Width σ (radians) of the grid head's soft targets at training progress t/T in [0, 1]: geometric from
    3 grid spacings at t = 0 to 0.75 at t = 1 (wide targets first, so the first steps learn the coarse
    orientation from every neighbouring class; at the end about one grid step, the resolution of the grid)."""
    t = min(max(progress, 0.0), 1.0)
    return 3.0 * spacing_rad * 0.25**t


def grid_targets(grid: torch.Tensor, target: torch.Tensor, group: torch.Tensor, sigma: float) -> torch.Tensor:
    """Soft targets of the grid head, (B, G): t(g) ∝ exp(-d(g, q)² / (2σ²)) over the grid rotations ``grid``
    (G, 4) for each target ``q`` (B, 4), d the symmetry-aware geodesic (``group`` (S, 4)), σ in radians."""
    with torch.no_grad():
        grid = grid.to(device=target.device, dtype=target.dtype)
        d = symmetry.symmetric_geodesic(grid[None], target[:, None], group.to(target.dtype))  # (B, G)
        return torch.softmax(-(d**2) / (2 * sigma**2), dim=1)


def grid_cross_entropy(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the cross-entropy -Σ_g t(g) log softmax(logits)(g), logits and targets (B, G);
    minimal (the entropy of t) at logits = log t + c."""
    return -(soft * torch.log_softmax(logits, dim=1)).sum(1).mean()


def symmetric_chordal(p: torch.Tensor, q: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """min over g of the squared quaternion chordal distance 2 - 2|<p, q ⊗ g>| (in [0, 2]; ≈ θ²/4 for small
    angles θ). p, q: (..., 4); group: (G, 4)."""
    expanded = geometry.quat_mul(q[..., None, :], group)
    return (2 - 2 * (p[..., None, :] * expanded).sum(-1).abs()).min(dim=-1).values


def fsc_weighted(maps: dict) -> tuple[np.ndarray, np.ndarray]:
    """The full map of ``reconstruction.reconstruct(..., halves=True)`` multiplied per Fourier shell by
    sqrt(2·FSC / (1 + FSC)) of its half-maps (0 where the FSC is <= 0 and beyond the last shell): the noise of a
    small reconstruction is filtered out before it is projected as if it were signal. Returns (map, FSC curve)."""
    from cryoforum_plugin.physics.fsc import fsc_curve

    curve = fsc_curve(maps["half1"], maps["half2"])
    c = np.clip(curve, 0, 1)
    weight = np.concatenate([np.sqrt(2 * c / (1 + c)), [0.0]])
    vol = torch.as_tensor(maps["full"], dtype=torch.float64)
    d = vol.shape[-1]
    shell = torch.round(radius_3d(d)).long().clamp(max=len(weight) - 1)
    w = torch.as_tensor(weight)[shell]
    return ifft3c(fft3c(vol) * w).real.float().numpy(), curve


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


def sample_pairs(true_dist: torch.Tensor, n_pairs: int, mode: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (I, J), i != j, inside a batch. ``true_dist``: (B, B) true distances. 'random': uniform over pairs;
    'stratified': equal counts in each of 8 distance bins over [0, max distance]."""
    b = true_dist.shape[0]
    i, j = torch.triu_indices(b, b, offset=1, device=true_dist.device)
    if mode == "random" or len(i) <= n_pairs:
        pick = torch.randperm(len(i), generator=gen, device="cpu")[:n_pairs].to(i.device)
        return i[pick], j[pick]
    d = true_dist[i, j]
    edges = torch.linspace(0, float(d.max()) + 1e-6, N_DISTANCE_BINS + 1, device=d.device)
    bins = torch.bucketize(d, edges[1:-1])
    per_bin = max(1, n_pairs // N_DISTANCE_BINS)
    chosen = []
    for k in range(N_DISTANCE_BINS):
        members = torch.nonzero(bins == k).flatten()
        if len(members):
            idx = torch.randint(len(members), (per_bin,), generator=gen, device="cpu").to(members.device)
            chosen.append(members[idx])
    pick = torch.cat(chosen)
    return i[pick], j[pick]


class Trainer:
    """Trains on a ParticleSet with poses and writes MODEL_DIR (config.json, split.json, best.pt, last.pt, log.csv)."""

    def __init__(self, ps: ParticleSet, out_dir, config: TrainConfig, device: torch.device, progress: bool = True,
                 amp: bool = True, events: Events | None = None, workers: int = -1, cache_gb: float = 2.0):
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
        self._created = time.time()  # --time-budget counts from here
        if config.time_budget and not config.pretrain_steps:
            raise CryoforumError("--time-budget sizes the pre-training, which is off (--pretrain-steps 0).",
                                 fix="give --pretrain-steps N (any N > 0: the budget replaces it) or --preset cpu, "
                                     "or leave --time-budget out.")
        self.rank, self.world = distributed.init_from_env()
        device = distributed.local_device(device)
        self.ps, self.out, self.cfg, self.device = ps, ModelDir(out_dir), config, device
        self.progress, self.events = progress and self.rank == 0, events or Events()
        self.workers = auto_workers(device) if workers < 0 else workers
        self.amp = amp and device.type == "cuda"
        self.out.create()
        symmetry.canonical_name(config.sym)
        self.group = torch.as_tensor(symmetry.group_quats(config.sym), dtype=torch.float32, device=device)
        targets = geometry.normalize(ps.quat)
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
        self.source = ImageSource(ps, cache_bytes=cache_gb * 1e9)
        torch.manual_seed(config.seed)
        self.gen = torch.Generator().manual_seed(config.seed)
        sample = self.source.batch(self.split["train"][: min(2000, len(self.split["train"]))])
        self.pre, self.net = build(config)
        self.pre.fit(sample)
        self.pre.to(device)
        self.net.to(device)
        self.model = self.net  # the bare network (checkpoints, L2); self.net may be its DDP wrapper
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[device] if device.type == "cuda" else None)
        self.per_rank = len(self.split["train"]) // self.world
        self.steps_per_epoch = math.ceil(self.per_rank / config.batch)
        if self.total_steps < 1:
            raise CryoforumError("nothing to train: --epochs 0 and --pretrain-steps 0.",
                                 fix="give --epochs and/or --pretrain-steps.")
        self.opt = torch.optim.Adam(self.net.parameters(), lr=config.lr, betas=(0.9, 0.99))
        self.sched = self._one_cycle()
        self.epoch, self.best = 0, float("inf")
        self.log: list[dict] = []
        self.pretrain_step = 0
        self.sim = None
        self.sim_gen = torch.Generator(device=device).manual_seed(config.seed * 1000 + 7 + self.rank)
        self.synthetic_info: dict | None = None

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
        """--time-budget: set ``pretrain_steps`` and ``epochs`` (``plan_budget``: real epochs dropped when they
        would leave the pre-training less than its share, with a WARNING) and the schedule, so the training ends
        in the budget; config.json records the plan (the caller's next checkpoint is the first one)."""
        cfg = self.cfg
        plan = plan_budget(60.0 * cfg.time_budget, time.time() - self._created, step_s, eval_s, self.pretrain_step,
                           cfg.pretrain_log_every, self.steps_per_epoch, cfg.epochs)
        plan.pretrain_steps = distributed.broadcast_int(plan.pretrain_steps)  # every rank runs the same numbers
        plan.epochs = distributed.broadcast_int(plan.epochs)
        cfg.pretrain_steps, cfg.epochs = plan.pretrain_steps, plan.epochs
        self.sched = self._one_cycle(self.pretrain_step)
        if self.rank == 0:
            self._write_meta()
            self.events.message(plan.message(cfg.time_budget))

    # ------------------------------------------------------------------ distances
    def dist(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Symmetry-aware geodesic distance (radians) between (..., 4) quaternions."""
        return symmetry.symmetric_geodesic(p, q, self.group)

    def _batches(self, rows: np.ndarray, batch: int):
        """(rows, raw images) for consecutive chunks of ``rows``, read ahead by the loader processes."""
        return self.source.batches(rows, batch, workers=self.workers, pin_memory=self.device.type == "cuda")

    def loss_dist(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The distance the losses use (``distance_loss``): geodesic (radians) or squared chordal."""
        if self.cfg.distance_loss == "chordal":
            return symmetric_chordal(p, q, self.group)
        return self.dist(p, q)

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
        target = self.targets[torch.as_tensor(rows)].to(self.device)
        # optics groups of other pixel sizes are brought to the first particle's sampling (the model's grid)
        grid_pixel, grid_box = float(self.ps.pixel_size[0]), int(self.ps.box[0])
        raw = to_model_grid(raw.to(self.device, non_blocking=True), self.ps.pixel_size[rows], grid_pixel, grid_box)
        return self._network_input(raw, target, augmented, self.ps.ctf, rows, grid_pixel)

    def loss(self, out: dict, target: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, per-image geodesic error (B,) in radians): the head's loss plus the L2 term."""
        err = self.dist(out["quat"], target)
        if self.cfg.head == "grid":  # soft-target cross-entropy, no Siamese term (module docstring)
            total = self.grid_loss(out["logits"], target, progress)
        else:
            total = self.siamese_loss(out["quat"], err, target, progress)
        return total + self.cfg.l2 * self.model.l2_penalty(head=self.cfg.l2_head), err.detach()

    def siamese_loss(self, quat: torch.Tensor, err: torch.Tensor, target: torch.Tensor, progress: float):
        """β1 · 2·mean d(q̂, q) + β2 · mean over in-batch pairs |d(q̂_i, q̂_j) - d(q_i, q_j)| (module docstring);
        ``err`` (B,) is the geodesic d(q̂, q), reused when the loss distance is the geodesic."""
        b1, b2 = curriculum(self.cfg.loss, progress, self.cfg.beta1_floor)
        d = err if self.cfg.distance_loss == "geodesic" else self.loss_dist(quat, target)
        total = b1 * 2 * d.mean()
        if b2 > 0 and len(target) > 1:
            with torch.no_grad():
                true_all = self.loss_dist(target[:, None, :], target[None, :, :])
            i, j = sample_pairs(true_all, self.cfg.pairs_per_batch, self.cfg.pairs, self.gen)
            pred_d = self.loss_dist(quat[i], quat[j])
            total = total + b2 * (pred_d - true_all[i, j]).abs().mean()
        return total

    def grid_loss(self, logits: torch.Tensor, target: torch.Tensor, progress: float) -> torch.Tensor:
        """The grid head's loss at ``progress``: ``grid_cross_entropy`` over the network's grid, σ = ``grid_sigma``."""
        sigma = grid_sigma(progress, math.radians(self.cfg.grid_spacing))
        return grid_cross_entropy(logits, grid_targets(self.model.grid, target, self.group, sigma))

    def _step(self, x: torch.Tensor, target: torch.Tensor, progress: float) -> tuple[float, torch.Tensor]:
        """One optimiser step; (loss, per-image error)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.net(x)
        loss, err = self.loss({k: v.float() for k, v in out.items()}, target, progress)
        self.opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise CryoforumError("the training loss became NaN/inf.", fix="lower --lr or check the input images.")
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), GRAD_CLIP)
        self.gnorms.append(float(gnorm))
        self.opt.step()
        self.sched.step()
        return float(loss.detach()), err

    # ------------------------------------------------------------------ synthetic particles (pre-training)
    def training_map(self) -> tuple[np.ndarray, dict]:
        """(map on the particles' grid (box³ at their pixel size), provenance): ``from_map`` resampled, or the
        FSC-weighted reconstruction of the training split (never validation or test particles)."""
        from cryoforum_plugin.physics.resample import map_on_particle_grid

        apix, box = self.ps.require_one_sampling("pre-training from a map")
        if self.cfg.from_map:
            vol = map_on_particle_grid(self.cfg.from_map, box, apix, device="cpu").numpy()
            return vol, {"map": self.cfg.from_map}
        from cryoforum_plugin.physics.fsc import resolution
        from cryoforum_plugin.physics.reconstruct import reconstruct

        t0 = time.time()
        maps = reconstruct(self.ps.subset(self.split["train"]), halves=True, device=self.device, progress=False)
        vol, curve = fsc_weighted(maps)
        return vol, {"map": RECONSTRUCTION, "map_file": "training_map.mrc", "map_particles": len(self.split["train"]),
                     "half_map_fsc_0.143_A": resolution(curve, box, apix, 0.143),
                     "map_weighting": "sqrt(2 FSC / (1 + FSC)) of the half-maps",
                     "map_seconds": round(time.time() - t0, 1)}

    def _setup_synthetic(self) -> None:
        """Build the simulator (map, noise model of the training particles); on a resume the stored ones."""
        from cryoforum_plugin.formats.mrc import read_map
        from cryoforum_plugin.physics.noise import NoiseModel, estimate_noise_spectrum
        from cryoforum_plugin.sim.batches import MapParticleSimulator

        cfg, apix = self.cfg, float(self.ps.pixel_size[0])
        train = self.ps.subset(self.split["train"])
        stored = self.out.synthetic() if self.pretrain_step > 0 else None
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
            images = None if cached is None else cached[torch.as_tensor(self.split["train"])]
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
        self.synthetic_info = info
        if getattr(self, "_sim_gen_state", None) is not None:
            self.sim_gen.set_state(self._sim_gen_state)
            self._sim_gen_state = None

    def synthetic_snr_at(self, step: int) -> float:
        """The pre-training SNR at ``step`` (geometric anneal from ``synthetic_snr_start``)."""
        from cryoforum_plugin.sim.batches import snr_at

        end, start = self.synthetic_info["snr"], self.cfg.synthetic_snr_start
        if not start:
            return end
        return snr_at(step / max(self.cfg.synthetic_snr_anneal * self.cfg.pretrain_steps, 1), start, end)

    def synthetic_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(network input, targets) of one freshly simulated, augmented batch."""
        snr = self.synthetic_snr_at(step)
        raw, quats, p = self.sim.batch(self.cfg.batch, self.sim_gen, snr_scale=snr / self.synthetic_info["snr"],
                                       return_params=True)
        q = geometry.normalize(quats.double().cpu().numpy())
        if self.cfg.restrict_to_asu:
            q = symmetry.reduce_to_asu(q, self.cfg.sym)
        target = torch.as_tensor(q, dtype=torch.float32, device=self.device)
        return self._network_input(raw, target, True, self.sim.ctf_pool, p["ctf_rows"], self.sim.pixel_size)

    def _pretrain(self) -> None:
        cfg = self.cfg
        self._setup_synthetic()
        planning = cfg.time_budget > 0 and self.pretrain_step == 0
        while self.pretrain_step < cfg.pretrain_steps or planning:
            t0 = time.time()
            self.net.train()
            chunk = min(cfg.pretrain_log_every, cfg.pretrain_steps - self.pretrain_step)
            if planning:
                chunk = BUDGET_CALIBRATION_STEPS
            bar = Progress(chunk * cfg.batch, f"pre-training {self.pretrain_step + 1}-{self.pretrain_step + chunk}"
                           f"/{cfg.pretrain_steps}", enabled=self.progress, events=self.events)
            losses, errs, self.gnorms, sim_seconds = [], [], [], 0.0
            for _ in range(chunk):
                ts = time.time()
                x, target = self.synthetic_batch(self.pretrain_step)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                sim_seconds += time.time() - ts
                loss, err = self._step(x, target, self.pretrain_step / max(self.total_steps - 1, 1))
                losses.append(loss)
                errs.append(err.cpu().numpy())
                self.pretrain_step += 1
                bar.update(cfg.batch)  # polls the events for an abort
            bar.close()
            t_eval = time.time()
            row = self._row(losses, errs, time.time() - t0, synthetic=True, sim_seconds=sim_seconds)
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
        errs, evals = [], []
        for chunk, raw in self._batches(rows, batch):
            x, t = self._inputs(chunk, raw, augmented=False)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                out = self.net(x)
            errs.append(self.dist(out["quat"].float(), t).cpu().numpy())
            if "evals" in out:
                evals.append(out["evals"].float().cpu().numpy())
        self.trace_scale = trace_scale(np.concatenate(evals) if evals else None)
        return np.concatenate(errs) if errs else np.zeros(0)

    def _row(self, losses, errs, seconds: float, synthetic: bool, sim_seconds: float = 0.0) -> dict:
        """One log row: validation on the real validation particles at the current step."""
        step = self.pretrain_step + self.epoch * self.steps_per_epoch  # optimiser steps done (per rank)
        val = self.evaluate(self.split["val"])
        b1, b2 = curriculum(self.cfg.loss, step / max(self.total_steps - 1, 1), self.cfg.beta1_floor)
        return {"epoch": self.epoch if not synthetic else round((step - self.cfg.pretrain_steps) / self.steps_per_epoch, 3),
                "loss": float(np.mean(losses)) if losses else float("nan"),
                "train_median_rad": float(np.median(np.concatenate(errs))) if errs else float("nan"),
                "val_median_rad": float(np.median(val)), "val_median_deg": float(np.degrees(np.median(val))),
                "lr": float(self.sched.get_last_lr()[0]), "beta1": b1, "beta2": b2,
                "seconds": round(seconds, 2),
                "grad_norm_median": float(np.median(self.gnorms)) if self.gnorms else 0.0,
                "step": step, "synthetic": int(synthetic),
                "snr": self.synthetic_snr_at(self.pretrain_step) if synthetic else float("nan"),
                "sim_seconds": round(sim_seconds, 2)}

    def _end_of_row(self, row: dict, label: str) -> None:
        self.log.append(row)
        improved = row["val_median_rad"] < self.best
        if improved:
            self.best = row["val_median_rad"]
        if self.rank == 0:
            self._checkpoint(improved)
        distributed.barrier()
        if self.progress:
            self.events.message(f"{label}  loss {row['loss']:.4f}  train {row['train_median_rad']:.3f} rad  "
                                f"val {row['val_median_rad']:.3f} rad ({row['val_median_deg']:.1f}°)  "
                                f"{row['seconds']:.1f} s" + ("  *best" if improved else ""))

    def train(self) -> dict:
        cfg = self.cfg
        if self.rank == 0:
            self._write_meta()
        if self.pretrain_step < cfg.pretrain_steps:
            self._pretrain()
        while self.epoch < cfg.epochs:
            t0 = time.time()
            self.net.train()
            perm = self.split["train"][torch.randperm(len(self.split["train"]), generator=self.gen).numpy()]
            perm = perm[: self.per_rank * self.world][self.rank::self.world]  # same permutation on every rank
            bar = Progress(len(perm), f"epoch {self.epoch + 1}/{cfg.epochs}", enabled=self.progress,
                           events=self.events)
            losses, errs = [], []
            self.gnorms = []
            for step, (rows, raw) in enumerate(self._batches(perm, cfg.batch)):
                if len(rows) < 2:
                    continue
                x, target = self._inputs(rows, raw, augmented=True)
                done = cfg.pretrain_steps + self.epoch * self.steps_per_epoch + step
                loss, err = self._step(x, target, done / max(self.total_steps - 1, 1))
                losses.append(loss)
                errs.append(err.cpu().numpy())
                bar.update(len(rows))  # polls the events for an abort
            bar.close()
            self.epoch += 1
            row = self._row(losses, errs, time.time() - t0, synthetic=False)
            self._end_of_row(row, f"epoch {self.epoch:3d}")
        self.source.close()
        return {"best_val_median_rad": self.best, "epochs": self.epoch, "log": self.log}

    # ------------------------------------------------------------------ files (the layout: model_dir.py)
    def _write_meta(self) -> None:
        meta = {"cryoforum_version": __version__, "config": dataclasses.asdict(self.cfg),
                "particles": str(self.ps.path), "n_particles": len(self.ps),
                "input_box": int(self.ps.box[0]), "input_pixel_size": float(self.ps.pixel_size[0]),
                "model_pixel_size": float(self.ps.pixel_size[0]) * int(self.ps.box[0]) / self.cfg.box,
                "device": str(self.device), "torch": torch.__version__}
        if self.cfg.pretrain_steps:
            meta["synthetic"] = "synthetic.json"
        self.out.write_meta(meta)
        self.out.write_split(self.split, self.ps.uid)

    def _state(self) -> dict:
        return {"config": dataclasses.asdict(self.cfg), "preprocess": self.pre.state_dict(),
                "model": self.model.state_dict(), "epoch": self.epoch, "best": self.best,
                "trace_scale": getattr(self, "trace_scale", 1.0),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "log": self.log,
                "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                "pretrain_step": self.pretrain_step, "sim_gen": self.sim_gen.get_state()}

    def _checkpoint(self, improved: bool) -> None:
        self.out.save_checkpoint(self._state(), best=improved)
        self.out.write_log(self.log)

    def resume(self) -> bool:
        """Continue from MODEL_DIR/last.pt if it exists (same configuration required). Returns whether it did."""
        state = self.out.last_state(self.device)
        if state is None:
            return False
        stored = TrainConfig.from_dict(state["config"])
        if self.cfg.time_budget and stored.time_budget == self.cfg.time_budget:
            self.cfg.pretrain_steps = stored.pretrain_steps  # the counts the budget chose (_plan_budget)
            if stored.epochs <= self.cfg.epochs:
                self.cfg.epochs = stored.epochs
        if stored != self.cfg:
            raise CryoforumError("the checkpoint was trained with other options.", path=self.out.path / "last.pt",
                                 fix="resume with the same options, or train into a new --out directory.")
        self.pre.load_state_dict(state["preprocess"])
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.epoch, self.best, self.log = state["epoch"], state["best"], state["log"]
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.pretrain_step = state.get("pretrain_step", 0)
        if "sim_gen" in state:
            self._sim_gen_state = state["sim_gen"].cpu()
        return True
