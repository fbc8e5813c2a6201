#!/usr/bin/env python3
"""Realistic-set benchmark and learning curve: particles made by real `relion_project` at uniformly random
orientations with per-particle defocus, astigmatism and shifts (SNR 0.1, 64 px), trained on one part and tested
on 1000 particles never seen in training.

  python benchmarks/realistic.py --train-sizes 2000,10000 --epochs 30

Training from the map (issue 14): each ``--row NAME:key=value,...`` is one training whose TrainConfig options are
``--base`` overridden by the row's (values: numbers, true/false, none, or MAP = the set's true map, else the
default reconstruction of the training split is used), e.g.

  python benchmarks/realistic.py --train-sizes 2000 --epochs 5 --threads 1 \
      --row 'baseline:' --row 'pretrain 1000:pretrain_steps=1000' \
      --row 'pretrain + floor:pretrain_steps=1000,beta1_floor=0.25'

prints held-out median / mean / p90 error and the time to train (pre-training included). ``--evaluate MODEL
--refine`` adds what the job's refinement makes of the test split (against half-maps of the training split).
``--step-timing`` measures ms per optimiser step on freshly simulated batches against cached real images (same batch size).

Issue 21's sets, from relion_project's clean projections plus the simulator's own corruption functions
(``sim.realism``, ``sim.junk``): (a) the white set (default), (b) ``--noise real`` (coloured noise, ice background,
micrograph levels, RELION normalisation), (c) ``--preferred-views 0.6``, (d) ``--realistic`` (all of it, B-factors
50-200 Å², 20 % junk); ``--build-only`` builds a set and prints what it holds. On sets with truth.star the errors
are of the real particles, with the rarest 10 % of views reported apart.

  python benchmarks/realistic.py --realistic --train-sizes 2000 --epochs 5 --row 'baseline:'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryoforum_plugin.physics import rotations  # noqa: E402
from cryoforum_plugin.physics.noise import relion_bg_radius, relion_normalise  # noqa: E402
from cryoforum_plugin.data import DEFAULT_MAP  # noqa: E402
from cryoforum_plugin.infer.metrics import geodesic_errors  # noqa: E402
from cryoforum_plugin.formats.mrc import write_mrc  # noqa: E402
from cryoforum_plugin.formats.star import read_star  # noqa: E402
from cryoforum_plugin.physics.ctf import ctf_images  # noqa: E402
from cryoforum_plugin.physics.projector import Projector  # noqa: E402
from cryoforum_plugin.physics.resample import map_on_particle_grid, resized_map  # noqa: E402
from cryoforum_plugin.sim import realism  # noqa: E402
from cryoforum_plugin.sim.junk import JunkMaker, MAKER_KINDS, assign_junk, parse_junk_kinds  # noqa: E402
from cryoforum_plugin.sim.junk import particle_radius_px  # noqa: E402
from cryoforum_plugin.sim.realism import REALISTIC  # noqa: E402
from cryoforum_plugin.train.trainer import Trainer, TrainConfig  # noqa: E402

OPTIONS = {"paper defaults": {}, "augment + symmetric A": {"augment_psi": True, "qcqp_param": "symmetric"}}
BASE = "augment_psi=true,qcqp_param=symmetric"


def parse_options(text: str, set_dir: Path) -> dict:
    """'key=value,key=value' -> TrainConfig overrides (numbers, true/false, none; MAP = the set's true map)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, value = item.split("=", 1)
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        elif low == "none":
            out[key] = None
        elif value == "MAP":
            out[key] = str(set_dir / "map.mrc")
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


def truth_labels(set_dir: Path, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(n,) junk labels (0 without truth.star) and (n,) view densities (None without) of a set's particles."""
    path = Path(set_dir) / "truth.star"
    if not path.exists():
        return np.zeros(n, np.int64), None
    truth = starfile.read(path)["particles"]
    return truth["rlnCryoforumJunk"].to_numpy(np.int64), truth["rlnCryoforumViewDensity"].to_numpy(np.float64)


def held_out_report(ps, model_dir, set_dir: Path | None = None) -> dict:
    """A trained model on its own held-out test split: median / mean / p90 error (degrees) and how well its
    confidence ranks the errors (Spearman of uncertainty and error, AUROC of the uncertainty for an error > 15°).
    With a ``set_dir`` holding truth.star (issue 21's sets): errors of the real particles only (junk has no true
    pose), and the median error on the rarest 10 % of views (lowest view density of the set's real particles)
    against the rest."""
    from cryoforum_plugin.infer.select import auroc, spearman
    from cryoforum_plugin.infer.predict import predict

    split = json.loads((Path(model_dir) / "split.json").read_text())
    rows = np.asarray(split["test"]["rows"] if isinstance(split["test"], dict) else split["test"])
    junk, density = truth_labels(set_dir, len(ps)) if set_dir is not None else (np.zeros(len(ps), np.int64), None)
    rows = rows[junk[rows] == 0]
    pred = predict(ps.subset(rows), model_dir, device="cpu", progress=False)
    err = np.degrees(geodesic_errors(pred.quat, ps.quat[rows]))
    out = {"test_median_deg": float(np.median(err)), "test_mean_deg": float(np.mean(err)),
           "test_p90_deg": float(np.percentile(err, 90)), "spearman_uncertainty_error": spearman(-pred.fom, err),
           "auroc_error_over_15deg": auroc(-pred.fom, err > 15), "fraction_over_15deg": float(np.mean(err > 15))}
    if density is not None:
        rare = density[rows] <= np.quantile(density[junk == 0], 0.1)
        out.update({"rare10_views_median_deg": float(np.median(err[rare])) if rare.any() else float("nan"),
                    "other_views_median_deg": float(np.median(err[~rare])), "rare10_views_test_particles":
                    int(rare.sum())})
    return out


def refined_report(ps, model_dir, set_dir: Path | None = None) -> dict:
    """What the job's refinement makes of a trained model's held-out test split (real particles only): the
    training split reconstructed into half-maps at its poses (junk included, as a consensus; the job's
    ``pipeline.job.training_reference``, written beside the model), the test particles predicted
    (``steps.predict``) and refined against those half-maps with the job's defaults (``steps.refine``). Refined
    median / p90 error (degrees), fraction within 5°, shift error (px), the global-search fraction and the
    refinement's particles/s."""
    from cryoforum_plugin.pipeline import steps
    from cryoforum_plugin.pipeline.job import training_reference
    from cryoforum_plugin.progress import Events

    model_dir = Path(model_dir)
    split = json.loads((model_dir / "split.json").read_text())
    part = {k: np.asarray(v["rows"] if isinstance(v, dict) else v) for k, v in split.items() if k in ("train", "test")}
    junk = truth_labels(set_dir, len(ps))[0] if set_dir is not None else np.zeros(len(ps), np.int64)
    test = part["test"][junk[part["test"]] == 0]
    reference = training_reference(ps.subset(part["train"]), model_dir, argparse.Namespace(sym="C1", device="cpu"),
                                   Events())
    predicted, _ = steps.predict(ps.subset(test), model_dir, device="cpu")
    t0 = time.time()
    refined, result = steps.refine(predicted, reference, device="cpu")
    seconds = time.time() - t0
    err = np.degrees(geodesic_errors(refined.quat, ps.quat[test]))
    shift = np.linalg.norm(refined.shift_A - ps.shift_A[test], axis=1) / ps.pixel_size[test]
    return {"refined_median_deg": float(np.median(err)), "refined_p90_deg": float(np.percentile(err, 90)),
            "refined_within_5deg": float(np.mean(err < 5)), "shift_median_px": float(np.median(shift)),
            "global_searched_fraction": float(np.mean(result.global_searched)),
            "refine_particles_per_second": round(len(test) / seconds, 1), "refined_particles": int(len(test))}


def step_timing(ps, cfg, steps: int = 20) -> dict:
    """ms per optimiser step (input preparation + forward + backward + update): freshly simulated batches vs
    cached real images, the same batch size, after 3 warm-up steps each."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(ps, tmp, cfg, torch.device("cpu"), progress=False)
        t.pretraining.setup()
        t.net.train()
        t.gnorms = []
        rows = t.split["train"]
        out = {}
        for name in ("cached real", "simulated"):
            times, sim = [], []
            for k in range(steps + 3):
                t0 = time.perf_counter()
                if name == "simulated":
                    x, target = t.synthetic_batch(0)
                else:
                    r = rows[(k * cfg.batch) % (len(rows) - cfg.batch):][: cfg.batch]
                    x, target = t._inputs(r, t.source.batch(r), augmented=True)
                t1 = time.perf_counter()
                t._step(x, target, 0.5)
                if k >= 3:
                    times.append(time.perf_counter() - t0)
                    sim.append(t1 - t0)
            out[name] = {"ms_per_step": 1e3 * float(np.median(times)), "ms_input": 1e3 * float(np.median(sim))}
        t.source.close()
    return out


def make_relion_set(d: Path, n: int, box: int, snr: float, seed: int, noise: str = "white",
                    preferred_views: float = 0.0, bfactor: tuple = (0.0, 0.0), junk_fraction: float = 0.0,
                    junk_kinds: str = REALISTIC["junk_kinds"], defocus: tuple = (10000.0, 25000.0),
                    volume: Path | None = None) -> Path:
    """relion_project particles: random poses, shifts up to 3 px, defocus ``defocus`` Å (1-2.5 µm) with up to
    0.1 µm astigmatism, and noise of the given SNR: 'white' (relion_project --add_noise), 'coloured' (relion_project's
    clean images plus Gaussian noise of the spectrum ``noise.lorentzian_with_bump()``: strong low-frequency power
    falling to a floor, with a bump near 1/12 Å⁻¹ — a colour unlike white, to test that training from the map
    measures and uses it) or 'real' (issue 21's set b: ``sim.realism``'s coloured noise, ice background,
    per-micrograph level and RELION normalisation with the ``REALISTIC`` preset's values).

    Issue 21's other corruptions, applied to relion_project's clean projections by the simulator's own functions
    (``sim.realism``, ``sim.junk``): ``preferred_views`` (that fraction in 3 dominant views, set c), per-particle
    ``bfactor`` (min, max) Å² envelopes (rlnCtfBfactor), ``junk_fraction`` of ``junk_kinds`` (set d; off-centre
    particles are projected by relion_project at a wrong origin). ``truth.star`` beside ``parts.star`` holds
    rlnCryoforumJunk and rlnCryoforumViewDensity (``realism.view_density``: the rarest 10 % of views).
    ``volume``: another protein's map, placed on the embedded map's grid at this box (the same pixel size; the
    domain check's other protein); None: the embedded 70S-like map.
    """
    if (d / "parts.star").exists():
        return d / "parts.star"
    d.mkdir(parents=True, exist_ok=True)
    vol, apix = resized_map(DEFAULT_MAP, box)
    if volume is not None:
        vol = map_on_particle_grid(str(volume), box, apix)
    write_mrc(d / "map.mrc", vol.numpy(), apix)
    rng = np.random.default_rng(seed)
    rng_real = np.random.default_rng([seed, 21])  # issue 21's draws: the white and coloured sets stay as they were
    q = rotations.random_quats(n, rng)
    if preferred_views > 0:
        q = realism.preferred_view_quats(n, preferred_views, REALISTIC["view_clusters"], REALISTIC["view_width"],
                                         rng_real)[0]
    ang = rotations.quat_to_relion_euler(q)
    du = rng.uniform(*defocus, n)
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnImagePixelSize": [apix],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    parts = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@x.mrcs" for i in range(n)], "rlnAngleRot": ang[:, 0],
                          "rlnAngleTilt": ang[:, 1], "rlnAnglePsi": ang[:, 2],
                          "rlnOriginXAngst": rng.uniform(-3, 3, n) * apix, "rlnOriginYAngst": rng.uniform(-3, 3, n) * apix,
                          "rlnDefocusU": du, "rlnDefocusV": du - rng.uniform(0, 1000, n),
                          "rlnDefocusAngle": rng.uniform(0, 180, n), "rlnOpticsGroup": 1})
    realistic = noise == "real" or preferred_views > 0 or bfactor[1] > 0 or junk_fraction > 0
    junk = assign_junk(n, junk_fraction, parse_junk_kinds(junk_kinds), rng_real)
    projected = parts.copy()
    off = junk == 2  # off-centre: relion_project draws the particle 25-40 % of the box away from its origin
    r, a = rng_real.uniform(0.25, 0.4, off.sum()) * box, rng_real.uniform(0, 2 * np.pi, off.sum())
    projected.loc[off, "rlnOriginXAngst"] -= r * np.cos(a) * apix
    projected.loc[off, "rlnOriginYAngst"] -= r * np.sin(a) * apix
    starfile.write({"optics": optics, "particles": projected}, d / "poses.star")
    subprocess.run(["relion_project", "--i", "map.mrc", "--ang", "poses.star", "--o", "clean", "--ctf"], cwd=d,
                   check=True, capture_output=True)
    if not realistic:
        signal = float(mrcfile.mmap(d / "clean.mrcs").data[:500].var(axis=(1, 2)).mean())
        if noise == "white":
            subprocess.run(["relion_project", "--i", "map.mrc", "--ang", "poses.star", "--o", "parts", "--ctf",
                            "--add_noise", "--white_noise", str(np.sqrt(signal / snr))], cwd=d, check=True,
                           capture_output=True)
            return d / "parts.star"
    clean = torch.from_numpy(np.array(mrcfile.mmap(d / "clean.mrcs").data, dtype=np.float32))  # a writable copy
    if realistic:
        return corrupt_relion_set(d, clean, parts, optics, junk, vol, apix, snr, seed, noise, bfactor, rng_real)
    from cryoforum_plugin.physics.noise import coloured_noise, lorentzian_with_bump, relative_spectrum

    spectrum = relative_spectrum(lorentzian_with_bump(), box, apix) * (signal / snr)  # per-pixel variance signal/snr
    gen = torch.Generator().manual_seed(seed)
    noisy = torch.cat([c + coloured_noise(len(c), box, spectrum, gen) for c in clean.split(1000)]).numpy()
    write_mrc(d / "parts.mrcs", noisy, apix)
    star = starfile.read(d / "clean.star")
    star["particles"]["rlnImageName"] = [f"{i + 1:06d}@parts.mrcs" for i in range(len(noisy))]
    starfile.write(star, d / "parts.star")
    np.save(d / "noise_spectrum.npy", spectrum)
    return d / "parts.star"


def corrupt_relion_set(d: Path, clean: torch.Tensor, parts: pd.DataFrame, optics: pd.DataFrame, junk: np.ndarray,
                       vol: torch.Tensor, apix: float, snr: float, seed: int, noise: str, bfactor: tuple,
                       rng: np.random.Generator) -> Path:
    """Issue 21's sets from relion_project's clean CTF-modulated projections (N, box, box), by the functions
    ``cryoforum simulate`` uses: B-factor envelopes, junk (``JunkMaker``; label 1 emptied), the noise of
    ``realism.Background`` (white, or with ``noise`` 'real' coloured with the ice background and micrograph levels)
    at ``snr`` (signal: the good particles' mean variance; 'coloured': ``noise.lorentzian_with_bump``) and, for
    'real', RELION's normalisation. Writes
    ``parts.mrcs``, ``parts.star`` (the claimed origins; rlnCtfBfactor, rlnMicrographName) and ``truth.star``."""
    n, box = clean.shape[0], clean.shape[-1]
    ctf = {"defocus_u": parts["rlnDefocusU"].to_numpy(), "defocus_v": parts["rlnDefocusV"].to_numpy(),
           "defocus_angle": parts["rlnDefocusAngle"].to_numpy(), "voltage": np.full(n, 300.0), "cs": np.full(n, 2.7),
           "amp_contrast": np.full(n, 0.1), "phase_shift": np.zeros(n)}
    b = rng.uniform(bfactor[0], bfactor[1], n) if bfactor[1] > 0 else None

    def filters(rows, size):
        c = ctf_images(ctf, rows, size, apix)
        return c if b is None else c * realism.bfactor_envelope(torch.from_numpy(b[rows]), size, apix)

    rows = np.arange(n)
    if b is not None:
        clean = realism.fourier_filtered(clean, realism.bfactor_envelope(torch.from_numpy(b), box, apix))
    if np.isin(junk, MAKER_KINDS).any():
        projector = Projector(vol)
        peak = float(projector.project(rotations.random_quats(16, rng)).amax((-2, -1)).mean())
        clean = JunkMaker(junk, projector, particle_radius_px(vol), peak, rng).apply(clean, rows, filters)
    clean[torch.from_numpy(junk == 1)] = 0.0
    signal = float(clean[torch.from_numpy(junk == 0)][:500].var(dim=(-2, -1)).mean())
    real = noise == "real"
    micrograph = realism.micrograph_of(n, REALISTIC["particles_per_micrograph"]) if real else None
    level = None if micrograph is None else realism.micrograph_levels(
        int(micrograph.max()) + 1, REALISTIC["micrograph_sigma"], rng)[micrograph]
    colour = None
    if real:
        colour = realism.noise_spectrum(box, apix, REALISTIC["noise_bfactor"], REALISTIC["noise_floor"])
    elif noise == "coloured":
        from cryoforum_plugin.physics.noise import lorentzian_with_bump, relative_spectrum

        colour = relative_spectrum(lorentzian_with_bump(), box, apix)
    background = realism.Background(box, apix, float(np.sqrt(signal / snr)), colour, level,
                                    REALISTIC["ice_std"] if real else 0.0, REALISTIC["ice_scale"], seed)
    out = []
    for lo in range(0, n, 1000):
        chunk = rows[lo:lo + 1000]
        img = background.add(clean[chunk], chunk)
        out.append(relion_normalise(img, relion_bg_radius(box)) if real else img)
    write_mrc(d / "parts.mrcs", torch.cat(out).numpy(), apix)
    parts = parts.assign(rlnImageName=[f"{i + 1:06d}@parts.mrcs" for i in range(n)])
    if b is not None:
        parts["rlnCtfBfactor"] = b
    if micrograph is not None:
        parts["rlnMicrographName"] = realism.micrograph_names(micrograph)
    starfile.write({"optics": optics, "particles": parts}, d / "parts.star")
    quat = rotations.relion_euler_to_quat(*parts[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy().T)
    truth = parts.assign(rlnCryoforumJunk=junk, rlnCryoforumViewDensity=realism.view_density(quat))
    starfile.write({"optics": optics, "particles": truth}, d / "truth.star")
    if colour is not None:
        np.save(d / "noise_spectrum.npy", colour * background.noise_std**2)
    return d / "parts.star"


def spectrum_agreement(info: dict | None, set_dir: Path) -> dict | None:
    """How well training from the map measured the set's noise colour: the estimated spectrum (the trainer's noise
    model) against the one the coloured set was made with, both normalised to unit mean over shells 1..Nyquist;
    median and max |ratio - 1| over those shells (None for a white set or without pre-training)."""
    true_file = set_dir / "noise_spectrum.npy"
    if not info or "noise_model" not in info or not true_file.exists():
        return None
    est = np.asarray(info["noise_model"]["spectrum"], dtype=np.float64)[1:]
    true = np.load(true_file)[1:]
    ratio = (est / est.mean()) / (true / true.mean())
    return {"median_abs_ratio_minus_1": float(np.median(np.abs(ratio - 1))),
            "max_abs_ratio_minus_1": float(np.max(np.abs(ratio - 1))),
            "estimated": [float(v) for v in est], "true": [float(v) for v in true]}


def realistic_set() -> dict:
    """make_relion_set's keywords for issue 21's set d (``cryoforum simulate --realistic``'s values)."""
    return {"noise": "real", "preferred_views": REALISTIC["preferred_views"],
            "bfactor": (REALISTIC["bfactor_min"], REALISTIC["bfactor_max"]),
            "junk_fraction": REALISTIC["junk_fraction"], "junk_kinds": REALISTIC["junk_kinds"],
            "defocus": (REALISTIC["defocus_min"], REALISTIC["defocus_max"])}


def set_options(args) -> dict:
    """make_relion_set's keywords from the command line (--realistic: issue 21's set d)."""
    if args.realistic:
        return realistic_set()
    lo, hi = (float(v) for v in args.bfactor.split(","))
    return {"noise": args.noise, "preferred_views": args.preferred_views, "bfactor": (lo, hi),
            "junk_fraction": args.junk_fraction, "junk_kinds": args.junk_kinds}


def set_suffix(kind: dict) -> str:
    """The set directory's suffix naming its options ('' for the white set, as before issue 21)."""
    out = "" if kind["noise"] == "white" else f"_{kind['noise']}"
    if kind.get("preferred_views"):
        out += f"_pv{kind['preferred_views']:g}"
    if kind.get("bfactor", (0, 0))[1] > 0:
        out += f"_B{kind['bfactor'][0]:g}-{kind['bfactor'][1]:g}"
    if kind.get("junk_fraction"):
        out += f"_junk{kind['junk_fraction']:g}" + ("" if kind["junk_kinds"] == REALISTIC["junk_kinds"] else
                                                    "_" + kind["junk_kinds"].replace(",", "-"))
    if "defocus" in kind:
        out += f"_df{kind['defocus'][0]:g}-{kind['defocus'][1]:g}"
    return out


def set_summary(set_dir: Path) -> dict:
    """What a built set holds: particles, junk per kind, the view density's spread, B-factors, micrographs and the
    background's mean and std of the first images (RELION-normalised sets: about 0 and 1)."""
    from cryoforum_plugin.sim.junk import JUNK_KINDS

    parts = starfile.read(set_dir / "parts.star")["particles"]
    n = len(parts)
    junk, density = truth_labels(set_dir, n)
    stack = np.asarray(mrcfile.mmap(set_dir / "parts.mrcs").data[:200], dtype=np.float64)
    box = stack.shape[-1]
    yy, xx = np.mgrid[:box, :box] - box // 2
    bg = stack[:, np.hypot(xx, yy) > relion_bg_radius(box)]
    out = {"set": str(set_dir), "particles": n, "junk": {JUNK_KINDS[k]: int((junk == k).sum()) for k in JUNK_KINDS
                                                         if (junk == k).any()},
           "background_mean_std_first_200": [float(bg.mean(1).mean()), float(bg.std(1).mean())]}
    if density is not None:
        out["view_density_p10_p50_p90"] = [float(v) for v in np.percentile(density, [10, 50, 90])]
    if "rlnCtfBfactor" in parts:
        out["bfactor_min_max"] = [float(parts["rlnCtfBfactor"].min()), float(parts["rlnCtfBfactor"].max())]
    if "rlnMicrographName" in parts:
        out["micrographs"] = int(parts["rlnMicrographName"].nunique())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-sizes", default="2000,10000")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--noise", choices=("white", "coloured", "real"), default="white",
                    help="the set's noise: white (relion_project), coloured (noise.lorentzian_with_bump), or real "
                    "(issue 21 set b: sim.realism's coloured noise, ice background, micrograph levels, RELION "
                    "normalisation)")
    ap.add_argument("--preferred-views", type=float, default=0.0,
                    help="fraction of the particles in 3 dominant views (issue 21 set c)")
    ap.add_argument("--bfactor", default="0,0", help="MIN,MAX per-particle B-factor envelope, Å² (0,0: none)")
    ap.add_argument("--junk-fraction", type=float, default=0.0, help="fraction of junk (issue 21 set d)")
    ap.add_argument("--junk-kinds", default=REALISTIC["junk_kinds"], help="kinds of junk (cryoforum simulate's)")
    ap.add_argument("--realistic", action="store_true",
                    help="issue 21's set d: --noise real --preferred-views 0.6 --bfactor 50,200 --junk-fraction 0.2, "
                    "defocus 0.8-2.8 µm (cryoforum simulate --realistic's values)")
    ap.add_argument("--build-only", action="store_true", help="only build the set and print what it holds")
    ap.add_argument("--options", default=None, help="named option sets (" + ", ".join(OPTIONS) + "); default: "
                    "all of them when no --row is given")
    ap.add_argument("--row", action="append", default=[], help="NAME:key=value,... (see the module docstring)")
    ap.add_argument("--base", default=BASE, help="TrainConfig options every --row starts from")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--step-timing", action="store_true", help="only measure ms/step, simulated vs cached real")
    ap.add_argument("--evaluate", type=Path, action="append", default=[],
                    help="only report a trained model directory on its test split (errors and uncertainty ranking)")
    ap.add_argument("--refine", action="store_true",
                    help="with --evaluate: also refine the test split as the job does (refined_report)")
    ap.add_argument("--json", type=Path, default=None, help="output JSON (default WORK/realistic.json)")
    ap.add_argument("--set-seed", type=int, default=3, help="the set's seed (3: the sets of RESULTS 3 and 7)")
    ap.add_argument("--seed", type=int, default=42, help="the training's seed (split, initialisation, batches)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "realistic")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.train_sizes.split(",")]
    n_test, n_val = 1000, 500
    kind = set_options(args)
    n_set = max(sizes) + n_test + n_val  # the set's size is fixed by the arguments (and named in its directory)
    seed_suffix = "" if args.set_seed == 3 else f"_s{args.set_seed}"
    star = make_relion_set(args.work / f"set_n{n_set}_b{args.box}_snr{args.snr:g}{set_suffix(kind)}{seed_suffix}",
                           n_set, args.box, args.snr, seed=args.set_seed, **kind)
    ps = read_star(star)
    n = len(ps)
    test_fraction, val_fraction = n_test / n, n_val / n
    set_dir = star.parent
    if args.build_only:
        print(json.dumps(set_summary(set_dir), indent=1))
        return
    common = dict(box=args.box, width=args.width, epochs=args.epochs, batch=args.batch, lr=args.lr,
                  val_fraction=val_fraction, test_fraction=test_fraction, seed=args.seed)
    rows = []
    if args.options or not args.row:
        rows += [(name, OPTIONS[name]) for name in (args.options or ",".join(OPTIONS)).split(",")]
    for spec in args.row:
        name, _, opts = spec.partition(":")
        rows.append((name, {**parse_options(args.base, set_dir), **parse_options(opts, set_dir)}))
    if args.evaluate:
        evaluated = []
        for model_dir in args.evaluate:
            row = {"model": str(model_dir), **held_out_report(ps, model_dir, set_dir)}
            if args.refine:
                row.update(refined_report(ps, model_dir, set_dir))
            print(model_dir.name, json.dumps(row), flush=True)
            evaluated.append(row)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"set": str(star), "command": " ".join(sys.argv), "rows": evaluated},
                                            indent=1, default=float))
        return
    if args.step_timing:
        for name, opts in rows:
            cfg = TrainConfig(**{**common, "max_particles": sizes[0], **opts,
                                 "pretrain_steps": max(1, opts.get("pretrain_steps", 0))})
            print(name, json.dumps(step_timing(ps, cfg)), flush=True)
        return
    out_json = args.json or args.work / "realistic.json"
    results = {"set": str(star), "set_seed": args.set_seed, "seed": args.seed, "noise": kind["noise"], "set_options": kind, "particles": n, "box": args.box, "snr": args.snr, "epochs": args.epochs,
               "width": args.width, "batch": args.batch, "lr": args.lr, "rows": []}
    print(f"relion_project set: {n} particles, {args.box} px, SNR {args.snr}, {kind['noise']} noise; test {n_test} held out; "
          f"width {args.width}, {args.epochs} epochs (real), batch {args.batch}, lr {args.lr}")
    print(f"{'row':<34}{'train n':>8}{'pre steps':>10}{'epochs':>7}{'val best':>9}{'test med':>9}{'mean':>7}"
          f"{'p90':>7}{'s':>7}")
    for name, opts in rows:
        for size in sizes:
            cfg = TrainConfig(**{**common, "max_particles": size, **opts})
            slug = "".join(c if c.isalnum() else "_" for c in name).strip("_") + seed_suffix
            model = args.work / "models" / f"{slug}_{size}"
            if (model / "last.pt").exists():
                import shutil

                shutil.rmtree(model)
            t0 = time.time()
            trainer = Trainer(ps, model, cfg, torch.device("cpu"), progress=False)
            trainer.train()
            seconds = time.time() - t0
            row = {"row": name, "options": {k: v for k, v in cfg.to_dict().items() if k in opts},
                   "train_particles": len(trainer.split["train"]), "pretrain_steps": cfg.pretrain_steps,
                   "epochs": cfg.epochs, "best_val_median_deg": float(np.degrees(trainer.best)),
                   **held_out_report(ps, model, set_dir), "train_seconds": round(seconds, 1),
                   "synthetic": {k: v for k, v in (trainer.pretraining.info or {}).items() if k != "noise_model"},
                   "noise_spectrum_vs_true": spectrum_agreement(trainer.pretraining.info, set_dir),
                   "log": trainer.log}
            results["rows"].append(row)
            print(f"{name:<34}{row['train_particles']:>8}{cfg.pretrain_steps:>10}{cfg.epochs:>7}"
                  f"{row['best_val_median_deg']:>9.1f}{row['test_median_deg']:>9.1f}{row['test_mean_deg']:>7.1f}"
                  f"{row['test_p90_deg']:>7.1f}{seconds:>7.0f}", flush=True)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
