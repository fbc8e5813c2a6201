"""Synthetic particle sets (the paper's protocol, plus realistic options), streamed to disk in chunks.

Output layout (contracts.md): ``DIR/particles.mrcs``, ``DIR/particles.star`` (RELION 3.1, image names
relative to DIR, poses of the simulation as a consensus refinement would give them), ``DIR/particles.cs``
and ``DIR/truth.star`` (the same with ``rlnCryoforumJunk``: 0 good, else the kind of junk, ``JUNK_KINDS``, and
``rlnCryoforumViewDensity``: how common the particle's view is, ``realism.view_density``). Memory is bounded by
``chunk``, not by the particle count. The realistic options (issue 21) are functions of ``sim.realism`` (noise
colour, ice background, micrograph levels, normalisation, B-factors, preferred views) and ``sim.junk``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics import symmetry
from cryoforum_plugin.physics.noise import relative_spectrum
from cryoforum_plugin.formats.atomic import write_text
from cryoforum_plugin.physics.ctf import ctf_images
from cryoforum_plugin.physics.fourier import as_tensor, radius_3d
from cryoforum_plugin.physics.noise import relion_bg_radius, relion_normalise
from cryoforum_plugin.physics.resample import resized_map
from cryoforum_plugin.formats.mrc import StackWriter
from cryoforum_plugin.formats.cs import write_cs
from cryoforum_plugin.formats.files import read_particles
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.formats.star import write_star
from cryoforum_plugin.progress import Progress
from cryoforum_plugin.sim import realism
from cryoforum_plugin.sim.junk import DEFAULT_JUNK_KINDS, JUNK_KINDS, JunkMaker, MAKER_KINDS, assign_junk
from cryoforum_plugin.sim.junk import parse_junk_kinds, particle_radius_px

__all__ = ["JUNK_KINDS", "SimulationResult", "simulate", "write_truth"]
VIEW_DENSITY_COLUMN = "rlnCryoforumViewDensity"
MICROGRAPH_COLUMN = "rlnMicrographName"
BFACTOR_COLUMN = "rlnCtfBfactor"


@dataclasses.dataclass
class SimulationResult:
    """Paths written and the numbers a caller needs (pixel size Å, noise std, signal variance)."""

    out_dir: Path
    n: int
    box: int
    pixel_size: float
    noise_std: float
    signal_var: float
    seconds: float


def grid_orientations(n: int, rng: np.random.Generator) -> np.ndarray:
    """About ``n`` orientations on a near-uniform grid (Fibonacci directions × evenly spaced psi),
    like RELION's HEALPix sampling, in random order; (n, 4)."""
    n_psi = max(1, int(round((n * np.pi / 4) ** (1 / 3) * 2)))
    n_dir = int(np.ceil(n / n_psi))
    q = rotations.fibonacci_so3(n_dir, n_psi)
    return q[rng.permutation(len(q))[:n]]


def blob_map(box: int, rng: np.random.Generator, device=None) -> torch.Tensor:
    """A random 'different particle': a few dozen Gaussian blobs in a sphere of radius box/4."""
    r = radius_3d(box, device)
    f = torch.arange(box, dtype=torch.float32, device=device) - box // 2
    z, y, x = torch.meshgrid(f, f, f, indexing="ij")
    vol = torch.zeros_like(r)
    for _ in range(40):
        c = rng.normal(size=3) * box / 10
        s = rng.uniform(1.5, 3.5) * box / 64
        vol += float(rng.uniform(0.5, 1)) * torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol


def simulate(map_path, out_dir, n: int, box: int, snr: float = 0.1, orientations: str = "random", sym: str = "C1",
             restrict_to_asu: bool = False, angles_file=None, max_shift: float = 0.0,
             defocus_min: float = 10000.0, defocus_max: float = 25000.0, astigmatism: float = 500.0,
             voltage: float = 300.0, cs: float = 2.7, amp_contrast: float = 0.1, ctf_from=None, no_ctf: bool = False,
             junk_fraction: float = 0.0, junk_map=None, seed: int = 0, chunk: int = 1000, device=None,
             progress: bool = True, noise_spectrum=None, junk_kinds: str = DEFAULT_JUNK_KINDS,
             noise_bfactor: float = 0.0, noise_floor: float = 0.1, ice_std: float = 0.0, ice_scale: float = 100.0,
             particles_per_micrograph: int = 0, micrograph_sigma: float = 0.25, normalise: bool = False,
             bg_radius: float | None = None, bfactor_min: float = 0.0, bfactor_max: float = 0.0,
             preferred_views: float = 0.0, view_clusters: int = 3, view_width: float = 10.0) -> SimulationResult:
    """Simulate ``n`` particles of ``map_path`` in a ``box``-pixel box; see ``cryoforum simulate --help``.

    ``max_shift``: Å (uniform in [-max, max] per axis); defocus and astigmatism in Å; ``snr`` = mean variance of
    the clean CTF-modulated images / noise variance (the noise before the ice background, at the median
    micrograph level, before normalisation; ``snr <= 0``: no noise). ``noise_spectrum``: None for white noise
    (or the colour of ``noise_bfactor`` Å² > 0 and ``noise_floor``, ``realism.noise_shape``); else coloured noise
    of the same per-pixel variance with this radial shape: a (box//2+1,) array of per-shell power, a callable of
    spatial frequency (1/Å) or a noise.NoiseModel (see noise.relative_spectrum).

    Realistic options (``sim.realism``, ``sim.junk``; their random draws come from a stream of their own, so a
    set made without them is the same as before they existed): ``ice_std`` (× the noise std) and ``ice_scale``
    (Å) the ice background; ``particles_per_micrograph`` > 0 groups the particles into micrographs (written as
    rlnMicrographName), each with its noise level drawn log-normally with log-std ``micrograph_sigma``;
    ``normalise``: RELION's normalisation with ``bg_radius`` px (None: RELION's default, 0.375·box);
    ``bfactor_min``/``bfactor_max`` (Å²): per-particle B-factor envelopes (written as rlnCtfBfactor);
    ``preferred_views``: that fraction of the particles in ``view_clusters`` von Mises-Fisher clusters of
    viewing directions ``view_width`` degrees wide; ``junk_kinds``: comma-separated names of ``JUNK_KINDS``.
    """
    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rng_real = np.random.default_rng([seed, 21])  # the realistic options' own stream
    kinds = parse_junk_kinds(junk_kinds)
    vol, apix = resized_map(map_path, box, device)
    device = vol.device
    from cryoforum_plugin.physics.projector import Projector

    projector = Projector(vol, device=device)

    # ---- poses, shifts, CTF
    given = read_particles(angles_file) if angles_file else None
    centres = None
    if given is not None:
        if not given.has_poses.all():
            r = int(np.argmax(~given.has_poses))
            raise CryoforumError("every particle of --angles needs a pose.", path=angles_file, row=r,
                                 fix="pass a file with rlnAngleRot/Tilt/Psi or alignments3D/pose on every row.")
        if preferred_views > 0:
            raise CryoforumError("--preferred-views draws the orientations, --angles gives them.", path=angles_file,
                                 fix="leave out one of the two.")
        n = len(given)
        quat = given.quat.copy()
        shift = given.shift_A.copy()
    else:
        if preferred_views > 0 and orientations == "grid":
            raise CryoforumError("--preferred-views draws random orientations, not a grid.",
                                 fix="use --orientations random with --preferred-views.")
        if preferred_views > 0:
            quat, _, centres = realism.preferred_view_quats(n, preferred_views, view_clusters, view_width, rng_real)
        else:
            quat = grid_orientations(n, rng) if orientations == "grid" else rotations.random_quats(n, rng)
        if restrict_to_asu:
            quat = symmetry.reduce_to_asu(quat, sym)
        shift = rng.uniform(-max_shift, max_shift, (n, 2)) if max_shift > 0 else np.zeros((n, 2))
    if no_ctf:
        ctf = None
    elif ctf_from is not None or (given is not None and given.ctf is not None):
        src = read_particles(ctf_from) if ctf_from is not None else given
        if src.ctf is None:
            raise CryoforumError("the file has no CTF parameters.", path=src.path, fix="pass a file with rlnDefocusU.")
        rows = np.arange(n) if src is given else rng.integers(0, len(src), n)
        ctf = {k: np.asarray(v, dtype=np.float64)[rows] for k, v in src.ctf.items()}
    else:
        du = rng.uniform(defocus_min, defocus_max, n)
        ctf = {"defocus_u": du, "defocus_v": du - rng.uniform(0, astigmatism, n),
               "defocus_angle": rng.uniform(0, 180, n), "voltage": np.full(n, voltage), "cs": np.full(n, cs),
               "amp_contrast": np.full(n, amp_contrast), "phase_shift": np.zeros(n)}
    if bfactor_min > bfactor_max:
        raise CryoforumError(f"--bfactor-min {bfactor_min} is above --bfactor-max {bfactor_max}.",
                             fix="give a range with --bfactor-min <= --bfactor-max.")
    bfactor = rng_real.uniform(bfactor_min, bfactor_max, n) if bfactor_max > 0 else None
    micrograph = realism.micrograph_of(n, particles_per_micrograph) if particles_per_micrograph > 0 else None
    levels = None if micrograph is None else realism.micrograph_levels(int(micrograph.max()) + 1, micrograph_sigma,
                                                                        rng_real)
    level = None if micrograph is None else levels[micrograph]

    junk = assign_junk(n, junk_fraction, kinds, rng)
    other = None
    if (junk == 3).any():
        other = (resized_map(junk_map, box, device)[0] if junk_map else blob_map(box, rng, device))
        other = other * (vol.std() / other.std())
        other_projector = Projector(other, device=device)
    radius_px = particle_radius_px(vol)
    maker = None
    if np.isin(junk, MAKER_KINDS).any():
        peak = float(projector.project(rotations.random_quats(16, rng_real)).amax((-2, -1)).mean())
        maker = JunkMaker(junk, projector, radius_px, peak, rng_real)

    def filters(rows, size=box):
        """(B, size, size) CTF × B-factor envelope of ``rows`` on a ``size``-px grid (None: neither)."""
        c = None if ctf is None else ctf_images(ctf, rows, size, apix, device)
        if bfactor is not None:
            env = realism.bfactor_envelope(as_tensor(bfactor[rows], device), size, apix)
            c = env if c is None else c * env
        return c

    def clean(rows):
        c = filters(rows)
        sh = as_tensor(shift[rows] / apix, device)
        img = projector.project(quat[rows], sh, c)
        off = junk[rows] == 2
        if off.any():  # badly centred: the particle sits 25-40 % of the box away from where its origin says
            r = rng.uniform(0.25, 0.4, off.sum()) * box
            a = rng.uniform(0, 2 * np.pi, off.sum())
            bad = sh[off] + as_tensor(np.stack([r * np.cos(a), r * np.sin(a)], 1), device)
            img[off] = projector.project(quat[rows][off], bad, None if c is None else c[off])
        oth = junk[rows] == 3
        if oth.any():
            img[oth] = other_projector.project(quat[rows][oth], sh[oth], None if c is None else c[oth])
        if maker is not None:
            img = maker.apply(img, rows, filters)
        img[junk[rows] == 1] = 0.0
        return img

    pilot = np.arange(min(n, 500))
    signal_var = float(clean(pilot)[torch.as_tensor(junk[pilot] == 0, device=device)].var(dim=(-2, -1)).mean())
    noise_std = float(np.sqrt(signal_var / snr)) if snr > 0 else 0.0

    if noise_spectrum is None and noise_bfactor > 0:
        noise_spectrum = realism.noise_shape(noise_bfactor, noise_floor)
    colour = None if noise_spectrum is None else relative_spectrum(noise_spectrum, box, apix)
    background = realism.Background(box, apix, noise_std, colour, level, ice_std, ice_scale, seed, device)
    bg_radius_px = relion_bg_radius(box) if bg_radius is None else float(bg_radius)

    stack_path = out / "particles.mrcs"
    writer = StackWriter(stack_path, n, box, apix)
    bar = Progress(n, "simulate", enabled=progress)
    try:
        for lo in range(0, n, chunk):
            rows = np.arange(lo, min(n, lo + chunk))
            img = background.add(clean(rows), rows)
            if normalise:
                img = relion_normalise(img, bg_radius_px)
            writer.write(img.cpu().numpy())
            bar.update(len(rows))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()

    extra = {}
    if bfactor is not None:
        extra[BFACTOR_COLUMN] = bfactor
    if micrograph is not None:
        extra[MICROGRAPH_COLUMN] = realism.micrograph_names(micrograph)
    ps = ParticleSet(image_path=np.array([str(stack_path.resolve())] * n, dtype=object),
                     image_index=np.arange(n, dtype=np.int64), quat=rotations.normalize(quat), shift_A=shift,
                     pixel_size=np.full(n, apix), box=np.full(n, box, np.int64), ctf=ctf,
                     optics_group=np.ones(n, np.int64), half_set=rng.permutation(np.arange(n) % 2 + 1),
                     uid=np.arange(1, n + 1, dtype=np.uint64) + np.uint64(seed) * np.uint64(10**9), extra=extra)
    write_star(ps, out / "particles.star", relative_to=out)
    write_cs(ps, out / "particles.cs", project_dir=out)
    write_truth(ps, junk, out / "truth.star", relative_to=out, view_density=realism.view_density(ps.quat))
    result = SimulationResult(out, n, box, apix, noise_std, signal_var, time.time() - start)
    realistic = {"noise_bfactor_A2": noise_bfactor, "noise_floor": noise_floor, "ice_std": ice_std,
                 "ice_scale_A": ice_scale, "particles_per_micrograph": particles_per_micrograph,
                 "micrograph_sigma": micrograph_sigma, "normalise": normalise, "bg_radius_px": bg_radius_px,
                 "micrograph_levels": None if levels is None else levels.tolist(),
                 "bfactor_A2": [bfactor_min, bfactor_max], "particle_radius_px": radius_px,
                 "preferred_views": {"fraction": preferred_views, "clusters": view_clusters, "width_deg": view_width,
                                     "centres": None if centres is None else centres.tolist()},
                 "junk_kinds": [JUNK_KINDS[k] for k in kinds]}
    write_text(out / "simulation.json", json.dumps(
        {"map": str(map_path), "n": n, "box": box, "pixel_size_A": apix, "snr": snr, "noise_std": noise_std,
         "signal_var": signal_var, "orientations": "file" if given is not None else orientations, "sym": sym,
         "restrict_to_asu": restrict_to_asu, "max_shift_A": max_shift, "ctf": ctf is not None,
         "junk": {JUNK_KINDS[k]: int((junk == k).sum()) for k in JUNK_KINDS}, "seed": seed,
         "seconds": round(result.seconds, 2), "realism": realistic,
         **({"noise_spectrum": [float(v) for v in colour]} if colour is not None else {})}, indent=2))
    return result


def write_truth(ps: ParticleSet, junk: np.ndarray, path, relative_to=None, view_density=None) -> None:
    """``truth.star``: the particles with their true poses and shifts plus the junk label column and, when given,
    each particle's view density (``realism.view_density``, rlnCryoforumViewDensity)."""
    extra = dict(ps.extra) if view_density is None else {**ps.extra, VIEW_DENSITY_COLUMN: np.asarray(view_density)}
    write_star(dataclasses.replace(ps, junk=np.asarray(junk, dtype=np.int64), extra=extra), path,
               relative_to=relative_to)
