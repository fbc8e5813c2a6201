"""Siamese training of the orientation network (the paper), with checkpoints, resume and a per-epoch log.

Loss per batch (B images, P pairs (i, j) drawn inside the batch, so memory grows with the pairs, never N²):
    β1 · 2·mean_i d(q̂_i, q_i)  +  β2 · mean_(i,j) |d(q̂_i, q̂_j) - d(q_i, q_j)|  +  l2 · Σ w²
with the curriculum β1 = √(t/T)/2, β2 = 1 - √(t/T) ('siamese'); β1 = 0 ('siamese_noreg'); or β1 = 1/2, β2 = 0
('single', one branch). d is the geodesic distance, symmetry-aware (minimum over the point group) with --sym.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__, distributed, geometry, symmetry
from .atomic import atomic_path, write_text
from .dataset import ImageSource, auto_workers, split_rows
from .errors import CryoforumError
from .fourier import fft2c, ifft2c
from .model import OrientationNet
from .particles import ParticleSet
from .preprocess import Preprocess, psi_rotation_quats, rotate_images
from .progress import Progress
from .projection import shift_phase

N_DISTANCE_BINS = 8
GRAD_CLIP = 10.0  # global gradient-norm clip: eigh's backward can spike when eigenvalues nearly coincide


@dataclasses.dataclass
class TrainConfig:
    """Every training option (the names and defaults of plugin.yaml's ``train`` job)."""

    box: int = 128
    blur: str = "lowpass"
    pooling: str = "gem"
    head: str = "qcqp"
    qcqp_param: str = "cholesky"
    width: float = 1.0
    drop_last: bool = False
    dropout: float = 0.3
    l2: float = 1e-3
    training: str = "siamese"
    pairs: str = "random"
    pairs_per_batch: int = 1024
    sym: str = "C1"
    restrict_to_asu: bool = False
    epochs: int = 50
    batch: int = 256
    lr: float = 1e-3
    val_fraction: float = 0.17
    test_fraction: float = 0.33
    split: str = "random"
    seed: int = 42
    augment_psi: bool = False
    augment_shift: float = 0.0
    max_particles: int = 0

    @classmethod
    def from_args(cls, args) -> "TrainConfig":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def build(config: TrainConfig, mean: float = 0.0, std: float = 1.0) -> tuple[Preprocess, OrientationNet]:
    """The preprocessing module and the network for a configuration."""
    pre = Preprocess(config.box, config.blur, mean, std)
    net = OrientationNet(pre.channels, config.head, config.pooling, config.width, config.drop_last, config.dropout,
                         config.qcqp_param)
    return pre, net


def curriculum(mode: str, progress: float) -> tuple[float, float]:
    """(β1, β2) at training progress t/T in [0, 1]."""
    if mode == "single":
        return 0.5, 0.0
    s = math.sqrt(min(max(progress, 0.0), 1.0))
    return (0.0 if mode == "siamese_noreg" else s / 2), 1.0 - s


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
                 amp: bool = True, abort_check=None, workers: int = -1, cache_gb: float = 2.0):
        if not ps.has_poses.all():
            r = int(np.argmax(~ps.has_poses))
            raise CryoforumError("training particles need poses; this one has none.", path=ps.path, row=r,
                                 fix="train on a refinement's particles (e.g. Refine3D run_data.star, a cryoSPARC "
                                     "refinement's particles with alignments3D).")
        self.rank, self.world = distributed.init_from_env()
        device = distributed.local_device(device)
        self.ps, self.out, self.cfg, self.device = ps, Path(out_dir), config, device
        self.progress, self.abort_check = progress and self.rank == 0, abort_check
        self.workers = auto_workers(device) if workers < 0 else workers
        self.amp = amp and device.type == "cuda"
        self.out.mkdir(parents=True, exist_ok=True)
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
        self.opt = torch.optim.Adam(self.net.parameters(), lr=config.lr, betas=(0.9, 0.99))
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=config.lr, epochs=config.epochs,
                                                         steps_per_epoch=self.steps_per_epoch, cycle_momentum=True,
                                                         base_momentum=0.85, max_momentum=0.95)
        self.epoch, self.best = 0, float("inf")
        self.log: list[dict] = []

    # ------------------------------------------------------------------ distances
    def dist(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Symmetry-aware geodesic distance (radians) between (..., 4) quaternions."""
        return symmetry.symmetric_geodesic(p, q, self.group)

    def _batches(self, rows: np.ndarray, batch: int):
        """(rows, raw images) for consecutive chunks of ``rows``, read ahead by the loader processes."""
        return self.source.batches(rows, batch, workers=self.workers, pin_memory=self.device.type == "cuda")

    def _inputs(self, rows, raw: torch.Tensor, augment: bool):
        """Raw (B, N, N) images of ``rows`` -> (network input on the device, (B, 4) targets), augmented."""
        raw = raw.to(self.device, non_blocking=True)
        target = self.targets[torch.as_tensor(rows)].to(self.device)
        if augment and self.cfg.augment_psi:
            a = torch.rand(len(rows), generator=self.gen) * 360 - 180
            raw = rotate_images(raw, a.to(self.device))
            r = torch.as_tensor(psi_rotation_quats(a.numpy()), dtype=torch.float32, device=self.device)
            target = geometry.quat_mul(r, target)
        if augment and self.cfg.augment_shift > 0:  # re-centring noise: the pose does not change
            s = (torch.rand(len(rows), 2, generator=self.gen) * 2 - 1) * self.cfg.augment_shift
            raw = ifft2c(fft2c(raw) * shift_phase(s.to(self.device), raw.shape[-1])).real
        return self.pre(raw), target

    def loss(self, out: dict, target: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, per-image error (B,) in radians)."""
        b1, b2 = curriculum(self.cfg.training, progress)
        err = self.dist(out["quat"], target)
        total = b1 * 2 * err.mean()
        if b2 > 0 and len(target) > 1:
            with torch.no_grad():
                true_all = self.dist(target[:, None, :], target[None, :, :])
            i, j = sample_pairs(true_all, self.cfg.pairs_per_batch, self.cfg.pairs, self.gen)
            pred_d = self.dist(out["quat"][i], out["quat"][j])
            total = total + b2 * (pred_d - true_all[i, j]).abs().mean()
        total = total + self.cfg.l2 * self.model.l2_penalty()
        return total, err.detach()

    # ------------------------------------------------------------------ loop
    @torch.no_grad()
    def evaluate(self, rows, batch: int = 512) -> np.ndarray:
        """Per-particle error (radians) of the current network on ``rows`` (no augmentation)."""
        self.net.eval()
        errs, traces = [], []
        for chunk, raw in self._batches(rows, batch):
            x, t = self._inputs(chunk, raw, augment=False)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                out = self.net(x)
            errs.append(self.dist(out["quat"].float(), t).cpu().numpy())
            if "evals" in out:
                ev = out["evals"].float()
                traces.append((ev[:, 1:].sum(1) - 3 * ev[:, 0]).cpu().numpy())
        self.trace_scale = float(np.median(np.concatenate(traces))) if traces else 1.0
        return np.concatenate(errs) if errs else np.zeros(0)

    def train(self) -> dict:
        cfg = self.cfg
        total_steps = cfg.epochs * self.steps_per_epoch
        if self.rank == 0:
            self._write_meta()
        while self.epoch < cfg.epochs:
            t0 = time.time()
            self.net.train()
            perm = self.split["train"][torch.randperm(len(self.split["train"]), generator=self.gen).numpy()]
            perm = perm[: self.per_rank * self.world][self.rank::self.world]  # same permutation on every rank
            bar = Progress(len(perm), f"epoch {self.epoch + 1}/{cfg.epochs}", enabled=self.progress)
            losses, errs = [], []
            self.gnorms = []
            for step, (rows, raw) in enumerate(self._batches(perm, cfg.batch)):
                if len(rows) < 2:
                    continue
                x, target = self._inputs(rows, raw, augment=True)
                progress = (self.epoch * self.steps_per_epoch + step) / max(total_steps - 1, 1)
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
                losses.append(float(loss.detach()))
                errs.append(err.cpu().numpy())
                bar.update(len(rows))
                if self.abort_check is not None:
                    self.abort_check()
            bar.close()
            val = self.evaluate(self.split["val"])
            b1, b2 = curriculum(cfg.training, (self.epoch + 1) / cfg.epochs)
            row = {"epoch": self.epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                   "train_median_rad": float(np.median(np.concatenate(errs))) if errs else float("nan"),
                   "val_median_rad": float(np.median(val)), "val_median_deg": float(np.degrees(np.median(val))),
                   "lr": float(self.sched.get_last_lr()[0]), "beta1": b1, "beta2": b2,
                   "seconds": round(time.time() - t0, 2),
                   "grad_norm_median": float(np.median(self.gnorms)) if self.gnorms else 0.0}
            self.epoch += 1
            self.log.append(row)
            improved = row["val_median_rad"] < self.best
            if improved:
                self.best = row["val_median_rad"]
            if self.rank == 0:
                self._checkpoint(improved)
            distributed.barrier()
            if self.progress:
                print(f"epoch {row['epoch']:3d}  loss {row['loss']:.4f}  train {row['train_median_rad']:.3f} rad  "
                      f"val {row['val_median_rad']:.3f} rad ({row['val_median_deg']:.1f}°)  {row['seconds']:.1f} s"
                      + ("  *best" if improved else ""), flush=True)
        self.source.close()
        return {"best_val_median_rad": self.best, "epochs": self.epoch, "log": self.log}

    # ------------------------------------------------------------------ files
    def _write_meta(self) -> None:
        meta = {"cryoforum_version": __version__, "config": dataclasses.asdict(self.cfg),
                "particles": str(self.ps.path), "n_particles": len(self.ps),
                "input_box": int(self.ps.box[0]), "input_pixel_size": float(self.ps.pixel_size[0]),
                "model_pixel_size": float(self.ps.pixel_size[0]) * int(self.ps.box[0]) / self.cfg.box,
                "device": str(self.device), "torch": torch.__version__}
        write_text(self.out / "config.json", json.dumps(meta, indent=2))
        split = {k: {"rows": v.tolist(), "uids": [int(u) for u in self.ps.uid[v]]} for k, v in self.split.items()}
        write_text(self.out / "split.json", json.dumps(split))

    def _state(self, full: bool) -> dict:
        state = {"config": dataclasses.asdict(self.cfg), "preprocess": self.pre.state_dict(),
                 "model": self.model.state_dict(), "epoch": self.epoch, "best": self.best,
                 "trace_scale": getattr(self, "trace_scale", 1.0)}
        if full:
            state.update(optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(), log=self.log,
                         gen=self.gen.get_state(), torch_rng=torch.get_rng_state())
        return state

    def _checkpoint(self, improved: bool) -> None:
        with atomic_path(self.out / "last.pt") as tmp:
            torch.save(self._state(full=True), tmp)
        if improved:
            with atomic_path(self.out / "best.pt") as tmp:
                torch.save(self._state(full=False), tmp)
        import csv
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(self.log[0]))
        writer.writeheader()
        writer.writerows(self.log)
        write_text(self.out / "log.csv", buf.getvalue())

    def resume(self) -> bool:
        """Continue from MODEL_DIR/last.pt if it exists (same configuration required). Returns whether it did."""
        path = self.out / "last.pt"
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["config"] != dataclasses.asdict(self.cfg):
            raise CryoforumError("the checkpoint was trained with other options.", path=path,
                                 fix="resume with the same options, or train into a new --out directory.")
        self.pre.load_state_dict(state["preprocess"])
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.epoch, self.best, self.log = state["epoch"], state["best"], state["log"]
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        return True


def load_model(model_dir, device=None) -> tuple[Preprocess, OrientationNet, dict]:
    """(preprocess, network in eval mode, state) from MODEL_DIR/best.pt."""
    path = Path(model_dir) / "best.pt"
    if not path.exists():
        raise CryoforumError("no trained model (best.pt) in the model directory.", path=model_dir,
                             fix="pass the --out directory of a finished `cryoforum train` run.")
    state = torch.load(path, map_location=device or "cpu", weights_only=False)
    cfg = TrainConfig(**state["config"])
    pre, net = build(cfg)
    pre.load_state_dict(state["preprocess"])
    net.load_state_dict(state["model"])
    return pre.to(device).eval(), net.to(device).eval(), state
