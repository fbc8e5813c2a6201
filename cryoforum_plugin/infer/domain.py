"""The domain check: does a trained model fit new particles?

A model trained on one data set is reused on the next; before its poses are trusted, the new particles are
compared with the model's validation particles. ``particle_statistics`` summarises a set on the model's input grid
(each image brought there by ``nn.preprocess.to_model_grid``, then normalised as RELION extracts: the background
outside RELION's default background circle, ``physics.noise.relion_bg_radius``, to mean 0 and standard deviation 1):

- ``signal`` {'mean', 'sd'} (K,) over the images, K = box//2 + 1 shells (``physics.noise`` convention): each
  image's radial power spectrum less its background's (``noise.background_noise_spectrum``): the particle's
  power per shell relative to the noise, i.e. the protein (its size and shape), the CTF and the SNR;
- ``noise_shape`` (K,): the mean background spectrum over its mean: the colour of the noise;
- ``fom``: quantiles and a histogram of the network's figure of merit (``nn.uncertainty.figure_of_merit``, whose
  scale makes a typical validation particle score 0.63); the pixel size, box and defocus quantiles.

``domain_reference`` computes them at the end of training for the validation particles (domain.json,
``ModelDir.write_domain``); ``check_domain`` compares a new set's with them: ``{"fits": True | False | None,
"reasons": [...], "notes": [...], ...the numbers compared}`` (None: no reference, cannot judge). It fails
(``THRESHOLDS``) when the signal spectrum has another shape (``signal_comparison``: its relative difference after
the best scale, from shell ``FIRST_SHELL`` on, debiased by the sampling noise, at its lower 2-sigma bound) or a
much lower level (SNR), when the noise has another colour, when the network is unsure of many more particles than
of its validation particles, or when many particles lie outside the training defocus range. Calibrated with
tests/test_domain.py and benchmarks/domain_check.py: held-out particles of the training set against
β-galactosidase at the same pixel size, box and SNR, white noise and coloured noise with an ice background.
"""

from __future__ import annotations

import numpy as np
import torch

from cryoforum_plugin.formats.loader import ImageSource
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.infer.predict import predict
from cryoforum_plugin.nn.preprocess import to_model_grid
from cryoforum_plugin.physics.fourier import fft2c
from cryoforum_plugin.physics.noise import (
    background_noise_spectrum, relion_bg_radius, relion_normalise, shell_means,
)
from cryoforum_plugin.train.model_dir import ModelDir

VERSION = 1
MAX_PARTICLES = 2000  # particles whose images are summarised (chosen at random, seed 0): bounded cost
FOM_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
FOM_BINS = 100
DEFOCUS_LEVELS = np.linspace(0.0, 1.0, 21)
FIRST_SHELL = 3  # below it the background's spectrum (a thin frame, blurred by its mask) misses the ice background
THRESHOLDS = {
    "signal_shape": 0.15,  # lower bound of the signal spectra's relative difference of shape (signal_comparison)
    "snr_ratio": 0.5,  # the signal's level relative to the reference's (an SNR ratio) below which it fails
    "snr_note": 0.8,  # ... outside [snr_note, 1 / snr_note]: noted
    "noise_shape": 0.25,  # RMS log ratio of the background noise shapes (noise_shape_distance)
    "fom_low": 0.3,  # fraction of particles below the validation particles' 10th percentile (0.1 in the domain)
    "defocus": 0.25,  # fraction of particles outside the training defocus range widened by 10 %
    "pixel_size": 0.02,  # relative difference of pixel size: noted, not failed (prediction resamples)
}


def _curve(per_image: torch.Tensor) -> dict:
    """(B, K) per-image values -> {'mean', 'sd'} lists over the images."""
    return {"mean": per_image.mean(0).tolist(), "sd": per_image.std(0).tolist() if len(per_image) > 1 else None}


def _defocus(ps: ParticleSet, rows) -> list | None:
    """Quantiles at DEFOCUS_LEVELS (0, 5, ..., 100 %) of the mean defocus (Å) of ``rows``, None without CTF."""
    if ps.ctf is None:
        return None
    mean = 0.5 * (np.asarray(ps.ctf["defocus_u"])[rows] + np.asarray(ps.ctf["defocus_v"])[rows])
    return [float(v) for v in np.quantile(mean, DEFOCUS_LEVELS)]


def image_statistics(ps: ParticleSet, grid_pixel: float, grid_box: int, *, device=None, batch: int = 256,
                     max_particles: int = MAX_PARTICLES, seed: int = 0) -> dict:
    """Statistics of (at most ``max_particles``, random with ``seed``) images of ``ps`` on the model's input grid
    (``grid_box`` px at ``grid_pixel`` Å): {'particles', 'pixel_size' (median, Å), 'box' (median, px),
    'grid_pixel', 'grid_box', 'defocus' (``_defocus``), 'signal' {'mean', 'sd'}: (K,) lists, 'noise_shape' (K,)}
    (see the module docstring)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    rows = np.arange(len(ps))
    if len(rows) > max_particles:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_particles, replace=False))
    radius = relion_bg_radius(grid_box)
    source = ImageSource(ps, cache_bytes=0)
    signal, noise = [], []
    try:
        for r, raw in source.batches(rows, batch):
            x = relion_normalise(to_model_grid(raw.to(device), ps.pixel_size[r], grid_pixel, grid_box), radius,
                                  ramp=False)
            bg = torch.stack([torch.as_tensor(background_noise_spectrum(x[i:i + 1], radius)) for i in range(len(x))])
            signal.append(shell_means(fft2c(x).abs() ** 2 / grid_box**2).cpu() - bg)
            noise.append(bg)
    finally:
        source.close()
    noise_mean = torch.cat(noise).mean(0).numpy()
    return {"particles": int(len(rows)), "pixel_size": float(np.median(ps.pixel_size)),
            "box": int(np.median(ps.box)), "grid_pixel": float(grid_pixel), "grid_box": int(grid_box),
            "defocus": _defocus(ps, rows), "signal": _curve(torch.cat(signal)),
            "noise_shape": (noise_mean / noise_mean[1:].mean()).tolist()}


def fom_statistics(fom: np.ndarray, has_uncertainty: bool) -> dict:
    """{'has_uncertainty', 'particles', 'quantiles' (at FOM_QUANTILES), 'histogram' (FOM_BINS counts over [0, 1])}
    of (N,) figures of merit in [0, 1]."""
    fom = np.clip(np.asarray(fom, dtype=np.float64), 0.0, 1.0)
    return {"has_uncertainty": bool(has_uncertainty), "particles": int(len(fom)),
            "quantiles": [float(v) for v in np.quantile(fom, FOM_QUANTILES)] if len(fom) else None,
            "histogram": np.histogram(fom, FOM_BINS, (0.0, 1.0))[0].tolist()}


def fraction_below(histogram, value: float) -> float:
    """Fraction of a FOM_BINS-bin histogram over [0, 1] below ``value`` (linear within its bin)."""
    h = np.asarray(histogram, dtype=np.float64)
    cdf = np.concatenate([[0.0], np.cumsum(h)]) / max(h.sum(), 1.0)
    return float(np.interp(value, np.linspace(0.0, 1.0, len(h) + 1), cdf))


def particle_statistics(ps: ParticleSet, fom: np.ndarray, has_uncertainty: bool, model_dir, *, device=None) -> dict:
    """Every statistic of a predicted set (images and figures of merit), on the grid of ``model_dir``'s model."""
    grid_pixel, grid_box = ModelDir(model_dir).grid(default_pixel=float(ps.pixel_size[0]), default_box=int(ps.box[0]))
    return {"version": VERSION, **image_statistics(ps, grid_pixel, grid_box, device=device),
            "fom": fom_statistics(fom, has_uncertainty)}


def domain_reference(ps: ParticleSet, model_dir, *, device=None, batch: int = 512) -> dict | None:
    """The statistics (``particle_statistics``) of the model's validation particles: the rows of ``ps`` (the
    training set) whose uids are in split.json's 'val' part (else 'test', else every row; at most MAX_PARTICLES,
    random with seed 0), predicted with the trained model (best.pt), with 'split' naming the part used. Under
    torchrun every rank must call it (prediction is shared); the non-zero ranks get None."""
    model = ModelDir(model_dir)
    for part in ("val", "test", None):
        rows = np.arange(len(ps)) if part is None else np.nonzero(np.isin(ps.uid, model.split_uids(part)))[0]
        if len(rows) >= 2:
            break
    if len(rows) > MAX_PARTICLES:
        rows = np.sort(np.random.default_rng(0).choice(rows, MAX_PARTICLES, replace=False))
    subset = ps.subset(rows)
    pred = predict(subset, model_dir, device=device, batch=batch, progress=False, workers=0)
    if pred is None:
        return None
    stats = particle_statistics(subset, pred.fom, pred.evals is not None, model_dir, device=device)
    return {**stats, "split": part or "all"}


# ---------------------------------------------------------------------------------------------- comparison


def signal_comparison(new: dict, ref: dict, z: float = 2.0, first: int = FIRST_SHELL) -> dict:
    """Compare the signal spectra of two sets (``image_statistics``: 'signal' {'mean', 'sd'} over the images,
    'particles') over shells ``first``..K-1: ``S_new ≈ a·S_ref``, each shell weighted by ``w = 1 / sd_ref²`` (the
    per-image scatter of its signal: shells where the ice background varies from image to image count little).

    Returns {'scale': a (weighted least squares: the SNR of the new set over the reference's), 'shape': the
    relative difference of shape ``sqrt(Σ w (R² - var R) / Σ w (a S_ref)²)``, ``R = S_new - a S_ref``, debiased by
    the sampling variance of the means (``var R = sd_new² / n_new + a² sd_ref² / n_ref``; 0 for two samples of one
    set in expectation), 'shape_low': its lower confidence bound, ``z`` standard deviations of the debiased sum
    below it (what the check tests)}."""
    s_new, s_ref = np.asarray(new["signal"]["mean"])[first:], np.asarray(ref["signal"]["mean"])[first:]
    sd_new, sd_ref = np.asarray(new["signal"]["sd"])[first:], np.asarray(ref["signal"]["sd"])[first:]
    w = 1.0 / np.maximum(sd_ref, 1e-12) ** 2
    a = float(np.sum(w * s_new * s_ref) / max(np.sum(w * s_ref**2), 1e-30))
    r2 = (s_new - a * s_ref) ** 2
    var = sd_new**2 / max(new["particles"], 1) + a**2 * sd_ref**2 / max(ref["particles"], 1)
    norm = max(float(np.sum(w * (a * s_ref) ** 2)), 1e-30)
    d2 = float(np.sum(w * (r2 - var))) / norm
    sd = float(np.sqrt(np.sum(w**2 * (2 * var**2 + 4 * np.maximum(r2 - var, 0) * var)))) / norm
    return {"scale": a, "shape": float(np.sqrt(max(d2, 0.0))), "shape_low": float(np.sqrt(max(d2 - z * sd, 0.0)))}


def noise_shape_distance(new, ref) -> float:
    """Root mean square over shells 1..K-1 of log(new / reference) of two noise shapes (K,)."""
    ratio = np.maximum(np.asarray(new)[1:], 1e-30) / np.maximum(np.asarray(ref)[1:], 1e-30)
    return float(np.sqrt(np.mean(np.log(ratio) ** 2)))


def outside_range(quantiles, low: float, high: float) -> float:
    """Fraction of a set outside [low, high], from its quantiles at DEFOCUS_LEVELS (linear in between)."""
    q = np.asarray(quantiles, dtype=np.float64)
    return float(np.interp(low, q, DEFOCUS_LEVELS, left=0.0, right=1.0)
                 + 1.0 - np.interp(high, q, DEFOCUS_LEVELS, left=0.0, right=1.0))


def _cannot_judge(why: str, stats: dict) -> dict:
    return {"fits": None, "reasons": [f"cannot judge: {why}"], "notes": [], "particles": stats.get("particles")}


def _compare_images(reference: dict, stats: dict, out: dict) -> None:
    """The image statistics' verdicts into ``out`` (reasons, notes and numbers)."""
    t = THRESHOLDS
    sig = signal_comparison(stats, reference)
    noise = noise_shape_distance(stats["noise_shape"], reference["noise_shape"])
    out.update(signal_shape=round(sig["shape"], 4), signal_shape_low=round(sig["shape_low"], 4),
               snr_ratio=round(sig["scale"], 4), noise_shape=round(noise, 4))
    if sig["shape_low"] > t["signal_shape"]:
        out["reasons"].append("their power spectrum has another shape than the training particles' (another "
                              "protein, defocus range or pixel size: signal_shape)")
    elif sig["shape"] > t["signal_shape"]:
        out["notes"].append("too few particles to rule out another power spectrum (signal_shape)")
    if sig["scale"] < t["snr_ratio"]:
        out["reasons"].append("their signal-to-noise ratio is less than half the training particles' (snr_ratio)")
    elif not t["snr_note"] <= sig["scale"] <= 1 / t["snr_note"]:
        out["notes"].append("their signal-to-noise ratio differs from the training particles' (snr_ratio)")
    if noise > t["noise_shape"]:
        out["reasons"].append("their background noise has another colour (noise_shape)")
    if stats["defocus"] and reference["defocus"]:
        lo, hi = 0.9 * reference["defocus"][0], 1.1 * reference["defocus"][-1]
        out.update(defocus_outside=round(outside_range(stats["defocus"], lo, hi), 4),
                   model_defocus_range_A=[round(lo), round(hi)])
        if out["defocus_outside"] > t["defocus"]:
            out["reasons"].append("many have a defocus outside the training range, widened by 10 % "
                                  "(defocus_outside)")
    if abs(stats["pixel_size"] / reference["pixel_size"] - 1.0) > t["pixel_size"] or stats["box"] != reference["box"]:
        out["notes"].append(f"the particles ({stats['box']} px at {stats['pixel_size']:.3f} Å) were resampled to the "
                            f"model's grid ({reference['grid_box']} px at {reference['grid_pixel']:.3f} Å)")


def _compare_fom(reference: dict, stats: dict, out: dict) -> None:
    """The figure of merit's verdict into ``out``: the fraction of particles below the validation particles' 10th
    percentile (0.1 in the domain), tested at its lower 2-sigma bound (binomial, both sets' sizes)."""
    new, ref = stats["fom"], reference["fom"]
    if not (new["has_uncertainty"] and ref["has_uncertainty"] and new["quantiles"] and ref["quantiles"]):
        out["notes"].append("the model's head gives no uncertainty: its confidence was not compared")
        return
    low = fraction_below(new["histogram"], ref["quantiles"][0])
    bound = low - 2 * np.sqrt(low * (1 - low) / max(new["particles"], 1) + 0.09 / max(ref["particles"], 1))
    out.update(fom_below_model_p10=round(low, 4), fom_median=round(new["quantiles"][2], 4),
               model_fom_median=round(ref["quantiles"][2], 4))
    if bound > THRESHOLDS["fom_low"]:
        out["reasons"].append("the network is unsure of many more of them than of its validation particles "
                              "(fom_below_model_p10)")


def check_domain(reference: dict | None, stats: dict) -> dict:
    """Does the model whose validation particles ``reference`` summarises (``domain_reference``; None for a model
    directory without domain.json) fit the particles ``stats`` summarises (``particle_statistics``)?

    Returns {'fits': True | False | None (cannot judge), 'reasons': why not, 'notes': differences that do not fail
    it (a resampled grid, another SNR, too few particles to tell), each a phrase naming the number it comes from
    (the same words for every batch of a stream), 'signal_shape', 'signal_shape_low', 'snr_ratio', 'noise_shape',
    'fom_below_model_p10', 'fom_median', 'model_fom_median', 'defocus_outside', 'model_defocus_range_A' (without
    CTF: absent), 'pixel_size', 'model_pixel_size', 'box', 'model_box', 'particles', 'model_particles',
    'thresholds'}."""
    if reference is None:
        return _cannot_judge("the model directory has no domain.json (a model trained before the domain check); "
                             "train it again to get one", stats)
    if reference.get("version") != stats.get("version"):
        return _cannot_judge(f"domain.json is of version {reference.get('version')}, this check of version "
                             f"{stats.get('version')}; train the model again", stats)
    if len(reference["signal"]["mean"]) != len(stats["signal"]["mean"]):
        return _cannot_judge("the statistics were computed on different grids", stats)
    if min(reference["particles"], stats["particles"]) < 2:
        return _cannot_judge("fewer than 2 particles to compare", stats)
    out = {"fits": True, "reasons": [], "notes": [], "particles": stats["particles"],
           "model_particles": reference["particles"], "pixel_size": stats["pixel_size"],
           "model_pixel_size": reference["pixel_size"], "box": stats["box"], "model_box": reference["box"]}
    _compare_images(reference, stats, out)
    _compare_fom(reference, stats, out)
    out["fits"] = not out["reasons"]
    out["thresholds"] = dict(THRESHOLDS)
    return out


def summary_line(check: dict) -> str:
    """One line for the job's log, starting 'WARNING:' when the model does not fit."""
    if check["fits"] is None:
        return f"[cryo-forum] domain check: {check['reasons'][0]}"
    if not check["fits"]:
        return ("WARNING: the model does not fit these particles (domain check): " + "; ".join(check["reasons"])
                + ". Its poses and confidence may be wrong: train a model on these particles (numbers in "
                  "predict.json).")
    notes = f"; note: {'; '.join(check['notes'])}" if check["notes"] else ""
    return f"[cryo-forum] domain check: the model fits these particles{notes}"
