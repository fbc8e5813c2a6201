"""Prediction: orientation and uncertainty for every particle, streamed in batches (bounded memory)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from cryoforum_plugin import runtime
from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics import symmetry
from cryoforum_plugin.formats.loader import ImageSource, auto_workers
from cryoforum_plugin.train.model_dir import ModelDir
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.nn import precision as numeric
from cryoforum_plugin.nn.preprocess import check_model_grid, noise_colour, phase_flipped, rotate_images, to_model_grid
from cryoforum_plugin.physics.noise import spectrum_colour
from cryoforum_plugin.progress import Events, Progress
from cryoforum_plugin.nn.uncertainty import dispersions, figure_of_merit, trace_scale

REWHITEN_SAMPLE = 2000  # images per optics group --rewhiten estimates its noise spectrum from (evenly spaced rows)
REWHITEN_MIN = 50  # smaller optics groups keep the model's stored spectrum (too few images for an estimate)

@dataclasses.dataclass
class Prediction:
    """Per-particle results: quat (N, 4), evals (N, 4) or None (heads without them), dispersions {'max','trace'},
    fom (N,), and the throughput; ``domain_check``: whether the model fits these particles (infer.domain, set by
    pipeline.steps.predict); ``rewhitening``: with --rewhiten, the spectra used (``rewhitening_spectra``)."""

    quat: np.ndarray
    evals: np.ndarray | None
    dispersion: dict
    fom: np.ndarray
    seconds: float
    domain_check: dict | None = None
    rewhitening: dict | None = None

    @property
    def particles_per_second(self) -> float:
        return len(self.quat) / max(self.seconds, 1e-9)


def _average_quats(qs: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
    """(K, B, 4) -> (B, 4) chordal mean (top eigenvector of Σ q qᵀ); with a group, each q_k is first replaced by
    its symmetry mate nearest to q_0."""
    if group is not None and len(group) > 1:
        mates = rotations.quat_mul(qs[:, :, None, :], group)  # (K, B, G, 4)
        dots = (mates * qs[0][None, :, None, :]).sum(-1).abs()  # (K, B, G)
        best = dots.argmax(-1)
        qs = torch.gather(mates, 2, best[..., None, None].expand(-1, -1, 1, 4))[:, :, 0]
    M = torch.einsum("kbi,kbj->bij", qs.double(), qs.double())
    return torch.linalg.eigh(M)[1][..., -1].float()


def evenly_spaced(rows: np.ndarray, at_most: int) -> np.ndarray:
    """Up to ``at_most`` of ``rows`` (sorted (n,) ints), evenly spaced through them (all when fewer): a
    deterministic sample that spans a file's micrographs in order."""
    if len(rows) <= at_most:
        return rows
    return rows[np.round(np.linspace(0, len(rows) - 1, at_most)).astype(np.int64)]


def rewhitening_spectra(ps: ParticleSet, source: ImageSource, pre, grid_pixel: float, grid_box: int, device,
                        batch: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """predict --rewhiten: the relative noise spectrum of each optics group of ``ps``, estimated as --whiten
    estimated the model's (``nn.preprocess.noise_colour`` at the model box ``pre.box``) from up to
    REWHITEN_SAMPLE of its images (``evenly_spaced``) brought to the model's grid (``to_model_grid``); a group of
    fewer than REWHITEN_MIN particles keeps the stored spectrum. Returns ((G, box//2 + 1) float32 spectra on
    ``device``, (N,) long index of each row's group on ``device``, the record: {"sample", "stored_colour",
    "groups": [{"optics_group", "particles", "sampled", "colour", "max_ratio", "min_ratio" (new / stored, over
    the shells), "estimated"}]})."""
    stored = pre.noise_spectrum.double().cpu().numpy()
    groups, index = np.unique(ps.optics_group, return_inverse=True)
    table, record = [], []
    for g, group in enumerate(groups):
        rows = np.nonzero(index == g)[0]
        sample = evenly_spaced(rows, REWHITEN_SAMPLE)
        estimated = len(rows) >= REWHITEN_MIN
        if estimated:
            chunks = (to_model_grid(source.batch(part).to(device), ps.pixel_size[part], grid_pixel, grid_box)
                      for part in np.array_split(sample, -(-len(sample) // batch)))
            new = noise_colour(chunks, pre.box, f"--rewhiten: the particles of optics group {int(group)}",
                               fix="predict without --rewhiten (the model's stored spectrum).")
        else:
            new = stored
        ratio = new[1:] / np.maximum(stored[1:], 1e-30)  # shell 0 (the images' mean) left out, as spectrum_colour
        table.append(new)
        record.append({"optics_group": int(group), "particles": int(len(rows)),
                       "sampled": int(len(sample)) if estimated else 0, "colour": round(spectrum_colour(new), 3),
                       "max_ratio": round(float(ratio.max()), 3), "min_ratio": round(float(ratio.min()), 3),
                       "estimated": bool(estimated)})
    spectra = torch.as_tensor(np.stack(table), dtype=torch.float32, device=device)
    return spectra, torch.as_tensor(index, device=device), {
        "sample": REWHITEN_SAMPLE, "stored_colour": round(spectrum_colour(stored), 3), "groups": record}


def rewhitening_line(record: dict) -> str:
    """One line for the user about ``rewhitening_spectra``'s record."""
    groups = record["groups"]
    colours = ", ".join(f"{g['colour']:g}" if g["estimated"] else "stored" for g in groups[:8])
    more = f", ... ({len(groups)} groups)" if len(groups) > 8 else ""
    return (f"[cryo-forum] --rewhiten: whitening each of {len(groups)} optics group(s) by its own noise spectrum "
            f"(colour {colours}{more}; the model's {record['stored_colour']:g})")


@torch.no_grad()
def predict(ps: ParticleSet, model_dir, device=None, batch: int = 512, tta: int = 1, progress: bool = True,
            events: Events | None = None, workers: int = -1, precision: str | None = None,
            compile: bool = False, rewhiten: bool = False) -> Prediction:
    """Predict every particle of ``ps`` with the model in ``model_dir``. ``tta``: number of in-plane rotations
    averaged (test-time augmentation; 1 = off). ``workers``: loader processes reading ahead (-1: auto).
    ``precision``: the network's (nn.precision.resolve; None: the model's --precision, auto for older models).
    ``compile``: --compile (runtime.compiled: torch.compile on CUDA; the model is loaded before it wraps).
    The batches' results stay on the device until the end (no wait for the GPU per batch).
    Images are preprocessed on ``device`` by the model's own preprocessing, its whitening (--whiten) by the noise
    spectrum stored at training included; ``rewhiten`` (--rewhiten) whitens each optics group by its own spectrum
    re-estimated from these particles instead (``rewhitening_spectra``, recorded in ``Prediction.rewhitening``;
    the model is not changed), and only says it has no effect for a model that does not whiten.
    Under torchrun each process predicts its block and rank 0 returns the merged result in row order; the other
    ranks return None."""
    device = device if device is not None else torch.device("cpu")
    runtime.init_from_env(device)
    device = runtime.local_device(device)
    model = ModelDir(model_dir)
    pre, net, state = model.load(device)
    grid_pixel, grid_box = model.grid(default_pixel=float(ps.pixel_size[0]), default_box=int(ps.box[0]))
    # the model's information limit: its training particles' sampling, or its own grid's where that is coarser
    # (a --box larger than the training images Fourier-pads them: no finer information than theirs)
    check_model_grid(ps.pixel_size, max(grid_pixel, grid_pixel * grid_box / pre.box), ps.path)
    if pre.phase_flip and ps.ctf is None:
        raise CryoforumError("the model was trained with --phase-flip and needs the particles' CTF; these have none.",
                             path=ps.path, fix="predict particles with CTF parameters (rlnDefocusU / ctf/df1_A).")
    cfg = state["config"]
    group = torch.as_tensor(symmetry.group_quats(cfg["sym"]), dtype=torch.float32, device=device)
    dtype, _ = numeric.resolve(precision or cfg.get("precision", "auto"), device)
    runtime.tune_for(device)
    net = runtime.compiled(net, device, compile, events)
    source = ImageSource(ps, cache_bytes=0)
    spectra, group_of, rewhitening = None, None, None
    if rewhiten and pre.whitens:
        spectra, group_of, rewhitening = rewhitening_spectra(ps, source, pre, grid_pixel, grid_box, device, batch)
    if rewhiten and runtime.is_main():
        (events or Events()).message(rewhitening_line(rewhitening) if rewhitening is not None else
                                     "[cryo-forum] --rewhiten has no effect: the model does not whiten its input "
                                     f"(trained with --whiten {cfg.get('whiten', 'off')}, no spectrum stored).")
    n = len(ps)
    mine = runtime.shard(n)  # all rows when not distributed
    quat = np.zeros((n, 4), np.float32)
    evals = np.zeros((n, 4), np.float32) if net.has_evals else None  # QCQP and grid heads
    angles = [360.0 * k / tta for k in range(tta)]
    undo = {a: rotations.quat_conj(torch.as_tensor(rotations.psi_rotation_quats([a]), dtype=torch.float32))
            .to(device) for a in angles}  # r⁻¹ of each in-plane turn
    done, quats, evs_all = [], [], []  # rows and their device results, copied once at the end
    bar = Progress(len(mine), "predict", enabled=progress and runtime.is_main(), events=events)
    workers = auto_workers(device) if workers < 0 else workers
    start = time.time()
    for rows, raw in source.batches(mine, batch, workers=workers, pin_memory=device.type == "cuda"):
        raw = to_model_grid(raw.to(device, non_blocking=True), ps.pixel_size[rows], grid_pixel, grid_box)
        flipped = phase_flipped(raw, ps.ctf, rows, grid_pixel) if pre.phase_flip else None
        spectrum = None if spectra is None else spectra[group_of[torch.as_tensor(rows).to(device)]]
        qs, evs = [], []
        for a in angles:
            turn = torch.full((len(rows),), a, device=device)
            img = raw if a == 0 else rotate_images(raw, turn)
            flp = flipped if (flipped is None or a == 0) else rotate_images(flipped, turn)
            with numeric.autocast(device, dtype):
                out = net(pre(img, flp, spectrum))
            q = out["quat"].float()
            if a != 0:  # the network saw psi + a: undo it, q = r⁻¹ ⊗ q̂
                q = rotations.quat_mul(undo[a], q)
            qs.append(q)
            if "evals" in out:
                evs.append(out["evals"].float())
        done.append(rows)
        quats.append(qs[0] if tta == 1 else _average_quats(torch.stack(qs), group))
        if evals is not None:
            evs_all.append(torch.stack(evs).mean(0))
        bar.update(len(rows))  # polls the events for an abort
    bar.close()
    if done:  # the one wait for the device
        rows = np.concatenate(done)
        quat[rows] = torch.cat(quats).cpu().numpy()
        if evals is not None:
            evals[rows] = torch.cat(evs_all).cpu().numpy()
    seconds = time.time() - start
    source.close()
    merged = runtime.gather_rows(mine, {"quat": quat[mine], "evals": None if evals is None else evals[mine]}, n)
    if merged is None:  # not rank 0: rank 0 writes the merged output
        return None
    quat, evals = merged["quat"], merged["evals"]
    if evals is not None:
        disp = dispersions(evals)
    else:  # heads without a Bingham: no uncertainty; zeros keep the columns well-defined
        disp = {"max": np.zeros(n), "trace": np.zeros(n)}
    scale = model.trace_scale(state) or trace_scale(evals)
    return Prediction(rotations.normalize(quat.astype(np.float64)), evals, disp,
                      figure_of_merit(disp["trace"], scale), seconds, rewhitening=rewhitening)


def with_predictions(ps: ParticleSet, pred: Prediction) -> ParticleSet:
    """A copy of ``ps`` whose poses are the predicted ones, also kept as ``predicted_quat``
    (rlnCryoforumPredictedAngleRot/Tilt/Psi, which survive a later refinement); the input's poses (if any) become
    ``prior_quat`` (rlnCryoforumPriorAngleRot/Tilt/Psi), with the uncertainty and figure of merit set."""
    prior = ps.quat.copy() if ps.has_poses.any() else ps.prior_quat
    return dataclasses.replace(ps, quat=pred.quat.copy(), prior_quat=prior, predicted_quat=pred.quat.copy(),
                               uncertainty={"max": pred.dispersion["max"], "trace": pred.dispersion["trace"]},
                               fom=pred.fom)
