"""Prediction: orientation and uncertainty for every particle, streamed in batches (bounded memory)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from . import distributed, geometry, symmetry
from .dataset import ImageSource, auto_workers
from .particles import PRIOR_ANGLE_COLUMNS, ParticleSet
from .preprocess import psi_rotation_quats, rotate_images
from .progress import Progress
from .training import load_model
from .uncertainty import FOM_COLUMN, STAR_COLUMNS, dispersions, figure_of_merit


@dataclasses.dataclass
class Prediction:
    """Per-particle results: quat (N, 4), evals (N, 4) or None (non-QCQP heads), dispersions {'max','trace'},
    fom (N,), and the throughput."""

    quat: np.ndarray
    evals: np.ndarray | None
    dispersion: dict
    fom: np.ndarray
    seconds: float

    @property
    def particles_per_second(self) -> float:
        return len(self.quat) / max(self.seconds, 1e-9)


def _average_quats(qs: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
    """(K, B, 4) -> (B, 4) chordal mean (top eigenvector of Σ q qᵀ); with a group, each q_k is first replaced by
    its symmetry mate nearest to q_0."""
    if group is not None and len(group) > 1:
        mates = geometry.quat_mul(qs[:, :, None, :], group)  # (K, B, G, 4)
        dots = (mates * qs[0][None, :, None, :]).sum(-1).abs()  # (K, B, G)
        best = dots.argmax(-1)
        qs = torch.gather(mates, 2, best[..., None, None].expand(-1, -1, 1, 4))[:, :, 0]
    M = torch.einsum("kbi,kbj->bij", qs.double(), qs.double())
    return torch.linalg.eigh(M)[1][..., -1].float()


@torch.no_grad()
def predict(ps: ParticleSet, model_dir, device=None, batch: int = 512, tta: int = 1, progress: bool = True,
            abort_check=None, workers: int = -1) -> Prediction:
    """Predict every particle of ``ps`` with the model in ``model_dir``. ``tta``: number of in-plane rotations
    averaged (test-time augmentation; 1 = off). ``workers``: loader processes reading ahead (-1: auto).
    Images are preprocessed on ``device``. Under torchrun each process predicts its block and rank 0 returns the
    merged result in row order; the other ranks return None."""
    distributed.init_from_env()
    device = distributed.local_device(torch.device(device) if device is not None else torch.device("cpu"))
    pre, net, state = load_model(model_dir, device)
    cfg = state["config"]
    group = torch.as_tensor(symmetry.group_quats(cfg["sym"]), dtype=torch.float32, device=device)
    amp = device.type == "cuda"
    source = ImageSource(ps, cache_bytes=0)
    n = len(ps)
    mine = distributed.shard(n)  # all rows when not distributed
    quat = np.zeros((n, 4), np.float32)
    evals = np.zeros((n, 4), np.float32) if cfg["head"] == "qcqp" else None
    angles = [360.0 * k / tta for k in range(tta)]
    bar = Progress(len(mine), "predict", enabled=progress and distributed.is_main())
    workers = auto_workers(device) if workers < 0 else workers
    start = time.time()
    for rows, raw in source.batches(mine, batch, workers=workers, pin_memory=device.type == "cuda"):
        raw = raw.to(device, non_blocking=True)
        qs, evs = [], []
        for a in angles:
            img = raw if a == 0 else rotate_images(raw, torch.full((len(rows),), a, device=device))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = net(pre(img))
            q = out["quat"].float()
            if a != 0:  # the network saw psi + a: undo it, q = r⁻¹ ⊗ q̂
                r = torch.as_tensor(psi_rotation_quats([a]), dtype=torch.float32, device=device)
                q = geometry.quat_mul(geometry.quat_conj(r), q)
            qs.append(q)
            if "evals" in out:
                evs.append(out["evals"].float())
        q = qs[0] if tta == 1 else _average_quats(torch.stack(qs), group)
        quat[rows] = q.cpu().numpy()
        if evals is not None:
            evals[rows] = torch.stack(evs).mean(0).cpu().numpy()
        bar.update(len(rows))
        if abort_check is not None:
            abort_check()
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - start
    source.close()
    merged = distributed.gather_rows(mine, {"quat": quat[mine], "evals": None if evals is None else evals[mine]}, n)
    if merged is None:  # not rank 0: rank 0 writes the merged output
        return None
    quat, evals = merged["quat"], merged["evals"]
    if evals is not None:
        disp = dispersions(evals)
    else:  # heads without a Bingham: no uncertainty; zeros keep the columns well-defined
        disp = {"max": np.zeros(n), "trace": np.zeros(n)}
    scale = float(state.get("trace_scale") or np.median(-disp["trace"]) or 1.0)
    return Prediction(geometry.normalize(quat.astype(np.float64)), evals, disp,
                      figure_of_merit(disp["trace"], scale), seconds)


def with_predictions(ps: ParticleSet, pred: Prediction) -> ParticleSet:
    """A copy of ``ps`` whose poses are the predicted ones; the previous angles (if any) are kept as
    rlnCryoforumPriorAngleRot/Tilt/Psi; uncertainty columns and rlnParticleFigureOfMerit added."""
    extra = dict(ps.extra)
    if ps.has_poses.any():
        prior = np.full((len(ps), 3), np.nan)
        prior[ps.has_poses] = geometry.quat_to_relion_euler(ps.quat[ps.has_poses])
        for i, column in enumerate(PRIOR_ANGLE_COLUMNS):
            extra[column] = prior[:, i]
    extra[STAR_COLUMNS["max"]] = pred.dispersion["max"]
    extra[STAR_COLUMNS["trace"]] = pred.dispersion["trace"]
    extra[FOM_COLUMN] = pred.fom
    return dataclasses.replace(ps, quat=pred.quat.copy(), extra=extra)


def uncertainty_dataset(ps: ParticleSet):
    """The cryoSPARC sidecar: a Dataset keyed by uid with cryoforum/{max_dispersion, trace_dispersion, fom}."""
    from cryosparc.dataset import Dataset

    ds = Dataset.allocate(len(ps), [("cryoforum/max_dispersion", "f4"), ("cryoforum/trace_dispersion", "f4"),
                                    ("cryoforum/fom", "f4")])
    ds["uid"] = ps.uid
    ds["cryoforum/max_dispersion"] = ps.extra[STAR_COLUMNS["max"]]
    ds["cryoforum/trace_dispersion"] = ps.extra[STAR_COLUMNS["trace"]]
    ds["cryoforum/fom"] = ps.extra[FOM_COLUMN]
    return ds
