"""Synthetic particle sets (the paper's protocol, plus realistic options), streamed to disk in chunks.

Output layout (contracts.md): ``DIR/particles.mrcs``, ``DIR/particles.star`` (RELION 3.1, image names
relative to DIR, poses of the simulation as a consensus refinement would give them), ``DIR/particles.cs``
and ``DIR/truth.star`` (the same with ``rlnCryoforumJunk``: 0 good, 1 pure noise, 2 badly centred,
3 projection of a different map). Memory is bounded by ``chunk``, not by the particle count.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics import symmetry
from cryoforum_plugin.formats.atomic import write_text
from cryoforum_plugin.physics.ctf import ctf_images
from cryoforum_plugin.physics.fourier import as_tensor, radius_3d
from cryoforum_plugin.physics.resample import resized_map
from cryoforum_plugin.formats.mrc import StackWriter
from cryoforum_plugin.formats.cs import write_cs
from cryoforum_plugin.formats.files import read_particles
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.formats.star import write_star
from cryoforum_plugin.progress import Progress

JUNK_KINDS = {1: "noise", 2: "off-centre", 3: "other map"}


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
             progress: bool = True, noise_spectrum=None) -> SimulationResult:
    """Simulate ``n`` particles of ``map_path`` in a ``box``-pixel box; see ``cryoforum simulate --help``.

    ``max_shift``: Å (uniform in [-max, max] per axis); defocus and astigmatism in Å; ``snr`` = mean variance of
    the clean CTF-modulated images / noise variance (one noise level for the whole set; ``snr <= 0``: no noise).
    ``noise_spectrum``: None for white noise; else coloured noise of the same per-pixel variance with this radial
    shape: a (box//2+1,) array of per-shell power, a callable of spatial frequency (1/Å) or a noise.NoiseModel
    (see noise.relative_spectrum).
    """
    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vol, apix = resized_map(map_path, box, device)
    device = vol.device
    from cryoforum_plugin.physics.projector import Projector

    projector = Projector(vol, device=device)

    # ---- poses, shifts, CTF
    given = read_particles(angles_file) if angles_file else None
    if given is not None:
        if not given.has_poses.all():
            from cryoforum_plugin.errors import CryoforumError

            r = int(np.argmax(~given.has_poses))
            raise CryoforumError("every particle of --angles needs a pose.", path=angles_file, row=r,
                                 fix="pass a file with rlnAngleRot/Tilt/Psi or alignments3D/pose on every row.")
        n = len(given)
        quat = given.quat.copy()
        shift = given.shift_A.copy()
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
            from cryoforum_plugin.errors import CryoforumError

            raise CryoforumError("the file has no CTF parameters.", path=src.path, fix="pass a file with rlnDefocusU.")
        rows = np.arange(n) if src is given else rng.integers(0, len(src), n)
        ctf = {k: np.asarray(v, dtype=np.float64)[rows] for k, v in src.ctf.items()}
    else:
        du = rng.uniform(defocus_min, defocus_max, n)
        ctf = {"defocus_u": du, "defocus_v": du - rng.uniform(0, astigmatism, n),
               "defocus_angle": rng.uniform(0, 180, n), "voltage": np.full(n, voltage), "cs": np.full(n, cs),
               "amp_contrast": np.full(n, amp_contrast), "phase_shift": np.zeros(n)}

    junk = np.zeros(n, np.int64)
    n_junk = int(round(junk_fraction * n))
    if n_junk:
        idx = rng.choice(n, n_junk, replace=False)
        junk[idx] = rng.integers(1, 4, n_junk)
    other = None
    if (junk == 3).any():
        other = (resized_map(junk_map, box, device)[0] if junk_map else blob_map(box, rng, device))
        other = other * (vol.std() / other.std())
        other_projector = Projector(other, device=device)

    def clean(rows):
        c = None if ctf is None else ctf_images(ctf, rows, box, apix, device)
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
        img[junk[rows] == 1] = 0.0
        return img

    pilot = np.arange(min(n, 500))
    signal_var = float(clean(pilot)[torch.as_tensor(junk[pilot] == 0, device=device)].var(dim=(-2, -1)).mean())
    noise_std = float(np.sqrt(signal_var / snr)) if snr > 0 else 0.0

    if noise_spectrum is not None:
        from cryoforum_plugin.physics.noise import coloured_noise, relative_spectrum

        colour = relative_spectrum(noise_spectrum, box, apix)

    stack_path = out / "particles.mrcs"
    writer = StackWriter(stack_path, n, box, apix)
    bar = Progress(n, "simulate", enabled=progress)
    try:
        gen = torch.Generator(device=device).manual_seed(seed)
        for lo in range(0, n, chunk):
            rows = np.arange(lo, min(n, lo + chunk))
            img = clean(rows)
            if noise_std > 0 and noise_spectrum is not None:
                img = img + noise_std * coloured_noise(len(rows), box, colour, gen, device)
            elif noise_std > 0:
                img = img + noise_std * torch.randn(img.shape, generator=gen, device=device)
            writer.write(img.cpu().numpy())
            bar.update(len(rows))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()

    ps = ParticleSet(image_path=np.array([str(stack_path.resolve())] * n, dtype=object),
                     image_index=np.arange(n, dtype=np.int64), quat=rotations.normalize(quat), shift_A=shift,
                     pixel_size=np.full(n, apix), box=np.full(n, box, np.int64), ctf=ctf,
                     optics_group=np.ones(n, np.int64), half_set=rng.permutation(np.arange(n) % 2 + 1),
                     uid=np.arange(1, n + 1, dtype=np.uint64) + np.uint64(seed) * np.uint64(10**9))
    write_star(ps, out / "particles.star", relative_to=out)
    write_cs(ps, out / "particles.cs", project_dir=out)
    write_truth(ps, junk, out / "truth.star", relative_to=out)
    result = SimulationResult(out, n, box, apix, noise_std, signal_var, time.time() - start)
    write_text(out / "simulation.json", json.dumps(
        {"map": str(map_path), "n": n, "box": box, "pixel_size_A": apix, "snr": snr, "noise_std": noise_std,
         "signal_var": signal_var, "orientations": "file" if given is not None else orientations, "sym": sym,
         "restrict_to_asu": restrict_to_asu, "max_shift_A": max_shift, "ctf": ctf is not None,
         "junk": {JUNK_KINDS[k]: int((junk == k).sum()) for k in JUNK_KINDS}, "seed": seed,
         "seconds": round(result.seconds, 2),
         **({"noise_spectrum": [float(v) for v in colour]} if noise_spectrum is not None else {})}, indent=2))
    return result


def write_truth(ps: ParticleSet, junk: np.ndarray, path, relative_to=None) -> None:
    """``truth.star``: the particles with their true poses and shifts plus the junk label column."""
    write_star(dataclasses.replace(ps, junk=np.asarray(junk, dtype=np.int64)), path, relative_to=relative_to)
