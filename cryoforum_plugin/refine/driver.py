"""Projection matching: refinement of particle poses and shifts against a reference map (torch, CPU or GPU).

This module decides which particles are searched how, runs the searches half-set by half-set in batches and
keeps each particle's best result. The score is in scoring.py (model, likelihood, frequency marching) and
particle_terms.py (whitening, noise calibration); the searches in local_search.py and global_search.py; the
reference and its gold-standard filter in reference.py; the plausibility factor of the confidence in
confidence.py.

Who goes where: particles without a pose, ``uncertain`` ones and those whose start error hint exceeds
MAX_RADIUS_DEG are searched globally; the others locally, within RADIUS_MARGIN × their hint. Under "auto",
local results that are doubtful (confidence.doubtful) are searched globally too, and the better of the two by
likelihood is kept.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
import math
import time

import numpy as np
import torch

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.mrc import StackReader
from cryoforum_plugin.formats.particles import ParticleSet, half_sets
from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics import symmetry
from cryoforum_plugin.physics.ctf import ctf_images
from cryoforum_plugin.physics.fourier import fft2c
from cryoforum_plugin.physics.projector import Projector
from cryoforum_plugin.progress import Progress
from cryoforum_plugin.refine.confidence import FALLBACK_CONFIDENCE, doubtful, plausibility
from cryoforum_plugin.refine.global_search import GlobalBank, global_refine
from cryoforum_plugin.refine.local_search import local_refine
from cryoforum_plugin.refine.mismatch import band_radius, particle_mismatch
from cryoforum_plugin.refine.particle_terms import load_particle_terms, noise_weights
from cryoforum_plugin.refine.reference import prepare_reference
from cryoforum_plugin.refine.scoring import HalfPlaneCoefficients, SearchSettings, chunk_elements
from cryoforum_plugin.runtime import resolve_device

DEFAULT_RADIUS_DEG = 15.0  # local search radius when no per-particle hint is given
MAX_RADIUS_DEG = 45.0  # local radii are clipped to this; under "auto" larger hints go to the global search
RADIUS_MARGIN = 1.2  # the local search covers this multiple of the per-particle hint
SMALL_RADIUS_DEG = 13.0  # up to this search radius level 1 uses 33 candidates (spacing radius/2), beyond 123 (radius/3)

__all__ = ["DEFAULT_RADIUS_DEG", "FALLBACK_CONFIDENCE", "MAX_RADIUS_DEG", "RADIUS_MARGIN", "SMALL_RADIUS_DEG",
           "RefineResult", "refine"]


@dataclasses.dataclass
class RefineResult:
    """Per particle (N rows, the order of the input set)."""

    quat: np.ndarray  # (N, 4) refined, internal convention (rotations.py)
    shift_A: np.ndarray  # (N, 2) refined origins in Å (RELION sign)
    score: np.ndarray  # (N,) normalised correlation of the best match (whitened)
    confidence: np.ndarray  # (N,) in [0, 1]: posterior mass near the best pose times the plausibility
    cc_low: np.ndarray  # (N,) 1 - the low-resolution correlation at the refined pose (mismatch.py; high = junk)
    sector: np.ndarray  # (N,) the residual's largest / smallest sector power outside the projection (mismatch.py)
    global_searched: np.ndarray  # (N,) bool
    seconds: float

    @property
    def particles_per_second(self) -> float:
        return len(self.quat) / max(self.seconds, 1e-9)


@dataclasses.dataclass
class _Poses:
    """Search results of R particles: ``rows`` (R,) into the set, ``quat`` (R, 4), ``shift_px`` (R, 2), score
    ``cc``, log-likelihood ``ll``, confidence ``conf`` and the mismatch measures ``cc_low`` and ``sector`` at that
    pose (R,) (mismatch.py), all float64."""

    rows: np.ndarray
    quat: np.ndarray
    shift_px: np.ndarray
    cc: np.ndarray
    ll: np.ndarray
    conf: np.ndarray
    cc_low: np.ndarray
    sector: np.ndarray

    @classmethod
    def nothing_yet(cls, n: int) -> _Poses:
        """All ``n`` rows, zero results of likelihood -inf (any result is better)."""
        return cls(np.arange(n), np.zeros((n, 4)), np.zeros((n, 2)), np.zeros(n), np.full(n, -np.inf), np.zeros(n),
                   np.zeros(n), np.zeros(n))

    @classmethod
    def concat(cls, parts: list[_Poses]) -> _Poses:
        if not parts:
            return cls.nothing_yet(0)
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)))

    def keep_better(self, new: _Poses) -> None:
        """Take ``new``'s result for the rows (of a full ``nothing_yet(n)`` table) where its likelihood is higher."""
        better = new.ll > self.ll[new.rows]
        r = new.rows[better]
        for f in ("quat", "shift_px", "cc", "ll", "conf", "cc_low", "sector"):
            getattr(self, f)[r] = getattr(new, f)[better]


@dataclasses.dataclass
class _Job:
    """What every batch of one ``refine`` call shares. Per particle (N rows): ``half`` set (1 or 2), local search
    ``radius`` (radians), start pose ``q_start`` (N, 4) and shift ``centre`` (N, 2, pixels)."""

    ps: ParticleSet
    reader: StackReader
    maps: dict  # {1: map, 2: map} on the particles' grid (prepare_reference)
    shell_filter: np.ndarray | None  # per-shell weights of the maps (prepare_reference: their half-maps' FSC)
    half: np.ndarray
    radius: np.ndarray
    q_start: np.ndarray
    centre: np.ndarray
    coef: HalfPlaneCoefficients
    whiten: torch.Tensor  # (K,) 1/N on the coefficient list
    settings: SearchSettings
    sym: str
    batch_size: int
    device: torch.device
    abort_check: object  # callable or None, polled before every batch
    progress: bool
    events: object  # progress.Events or None
    low_band: float  # the mismatch measures' band (Fourier pixels, mismatch.band_radius)


@torch.no_grad()
def _refine_batch(job: _Job, projector: Projector, bank: GlobalBank | None, rows: np.ndarray,
                  images: np.ndarray) -> _Poses:
    """Refine particles ``rows`` (their (B, N, N) ``images``) against ``projector``: globally when a ``bank`` is
    given, else locally; then the mismatch measures at the refined pose."""
    ft = fft2c(torch.from_numpy(images).to(job.device))  # one copy, one transform: the search and the mismatch
    ctf = (None if job.ps.ctf is None
           else ctf_images(job.ps.ctf, rows, job.coef.box, job.ps.pixel_size[rows], job.device))
    data = load_particle_terms(ft, ctf, job.coef, job.whiten, job.centre[rows])
    if bank is not None:
        q, shift, cc, ll, conf = global_refine(projector, bank, job.coef, data, job.settings)
    else:
        q0 = torch.as_tensor(job.q_start[rows], dtype=torch.float32, device=job.device)
        rad = job.radius[rows].astype(np.float32)  # the search's precision, decided on the host (no device wait)
        first_level_steps = 3 if rad.max() > math.radians(SMALL_RADIUS_DEG) else 2
        q, shift, cc, ll, conf = local_refine(projector, job.coef, data, q0, torch.as_tensor(rad, device=job.device),
                                              job.settings, first_level_steps=first_level_steps)
    cc_low, sector = particle_mismatch(projector, job.coef, data, ft, ctf, q, shift, job.whiten, job.low_band)
    out = torch.cat([q, shift, cc[:, None], ll[:, None], conf[:, None], cc_low[:, None], sector[:, None]],
                    1).double().cpu().numpy()  # one copy back
    return _Poses(rows, out[:, :4], out[:, 4:6], *out[:, 6:].T)


def _refine_pass(job: _Job, rows_sel: np.ndarray, is_global: bool, label: str) -> _Poses:
    """Refine ``rows_sel`` half-set by half-set (each against its half-map), in batches; local batches hold
    similar radii (the levels' resolutions then suit them all)."""
    bar = Progress(len(rows_sel), label, enabled=job.progress, events=job.events)
    parts = []
    projector = bank = None
    for h in (1, 2):
        sel = rows_sel[job.half[rows_sel] == h]
        if not len(sel):
            continue
        if projector is None or job.maps[2] is not job.maps[1]:
            projector = Projector(job.maps[h], shell_weight=job.shell_filter)
            bank = GlobalBank(projector, job.coef, job.settings, job.sym) if is_global else None
        if not is_global:
            sel = sel[np.argsort(job.radius[sel], kind="stable")]
        batches = [sel[lo:lo + job.batch_size] for lo in range(0, len(sel), job.batch_size)]
        for rows, images in _read_ahead(job, batches):
            parts.append(_refine_batch(job, projector, bank, rows, images))
            bar.update(len(rows))
    bar.close()
    return _Poses.concat(parts)


def _read_ahead(job: _Job, batches: list[np.ndarray]):
    """Yield (rows, their (B, N, N) images) for each batch of rows in order, the abort check polled before each;
    a background thread reads the next batch's images while the caller scores the current one (one batch ahead,
    so at most two batches of images are held; only that thread reads while it runs)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for i, rows in enumerate(batches):
            if job.abort_check is not None:
                job.abort_check()
            images = pending.result() if pending is not None else job.ps.read_images(job.reader, rows)
            pending = pool.submit(job.ps.read_images, job.reader, batches[i + 1]) if i + 1 < len(batches) else None
            yield rows, images


def _routes(ps: ParticleSet, global_search: str, uncertain, start_error_deg) -> tuple[np.ndarray, np.ndarray]:
    """(N,) bool: searched globally first; (N,) local search radii in radians (RADIUS_MARGIN × the hint, within
    [0.5°, MAX_RADIUS_DEG])."""
    n = len(ps)
    for name, arr in (("uncertain", uncertain), ("start_error_deg", start_error_deg)):
        if arr is not None and np.shape(arr) != (n,):
            raise CryoforumError(f"{name} has shape {np.shape(arr)}; one value per particle ({n}) is needed.",
                                 fix=f"pass a ({n},) array or None.")
    hint = np.full(n, DEFAULT_RADIUS_DEG) if start_error_deg is None else np.asarray(start_error_deg, float).copy()
    hint[~np.isfinite(hint)] = MAX_RADIUS_DEG * 2
    glob = ~ps.has_poses
    if global_search == "all":
        glob[:] = True
    elif global_search == "auto":
        if uncertain is not None:
            glob |= np.asarray(uncertain, bool)
        glob |= hint > MAX_RADIUS_DEG
    return glob, np.radians(np.clip(hint * RADIUS_MARGIN, 0.5, MAX_RADIUS_DEG))


def refine(ps: ParticleSet, reference, *, reference_pixel_size: float, sym: str = "C1",
           max_shift_A: float | None = None, global_search: str = "auto", uncertain: np.ndarray | None = None,
           start_error_deg: np.ndarray | None = None, noise_spectrum: np.ndarray | None = None,
           resolution_A: float | None = None, batch: int = 128, device=None, progress: bool = True,
           abort_check=None, events=None) -> RefineResult:
    """Refine the poses and shifts of ``ps`` against ``reference`` (a (D, D, D) map; {'half1', 'half2'}:
    particles of half-set 1/2 use their half-map, RELION's gold standard: each half is matched against the map
    reconstructed from that half only; particles without a half-set get ``particles.half_sets``'s, the one the
    reconstruction gives them too; or {'map', 'half1', 'half2'}: the map, FSC-weighted by the half-maps').

    ``global_search``: "auto" (particles without a pose, ``uncertain`` ones, those whose ``start_error_deg``
    exceeds MAX_RADIUS_DEG, and, in a second pass, those whose local result is doubtful: a confidence below
    FALLBACK_CONFIDENCE or a score more than 2 robust SDs below the confident particles' median; the better of
    the two results by likelihood is kept), "all", or "none" (still: particles without a pose).
    ``start_error_deg``: per-particle local search radius hint (degrees; default DEFAULT_RADIUS_DEG; the search
    covers RADIUS_MARGIN times it, at most MAX_RADIUS_DEG; NaN counts as unknown).
    ``max_shift_A``: the refined origin stays within this distance of the start origin (default 20 % of the box).
    ``noise_spectrum``: radial noise power (box//2 + 1 shells, noise.py's convention) whose shape whitens the
    scores; its level is calibrated on the data. None: the particles' mean power spectrum (conservative).
    ``resolution_A``: finest resolution used (never finer than the particles' or the reference's Nyquist).
    ``events``: optional progress.Events for the progress lines and the abort poll.
    """
    t_start = time.time()
    dev = resolve_device(device)
    n = len(ps)
    if global_search not in ("auto", "all", "none"):
        raise CryoforumError(f"unknown global_search '{global_search}'.", fix="use auto, all or none.")
    if n == 0:
        return RefineResult(np.zeros((0, 4)), np.zeros((0, 2)), *[np.zeros(0)] * 4, np.zeros(0, bool), 0.0)
    apix, box = ps.require_one_sampling("refinement")
    # gold standard: each half-map Wiener-filtered by the half-map FSC (a map given with half-maps: by theirs)
    maps, shell_filter = prepare_reference(reference, reference_pixel_size, box, apix, dev)
    finest = max(2 * apix, 2 * float(reference_pixel_size), float(resolution_A or 0.0))
    r_max = min(box * apix / finest, box / 2 - 1)
    max_shift_px = (0.2 * box) if max_shift_A is None else float(max_shift_A) / apix
    max_shift_px = float(min(max(max_shift_px, 0.0), box / 2 - 1))
    group = torch.as_tensor(symmetry.group_quats(sym), dtype=torch.float32, device=dev)
    settings = SearchSettings(r_max, max_shift_px, chunk_elements(dev), group)
    coef = HalfPlaneCoefficients(box, r_max, dev)
    glob, radius = _routes(ps, global_search, uncertain, start_error_deg)
    centre = np.nan_to_num(np.asarray(ps.shift_A, float) / apix)
    q_start = np.where(ps.has_poses[:, None], np.nan_to_num(ps.quat), np.array([1.0, 0, 0, 0]))

    best = _Poses.nothing_yet(n)
    reader = StackReader()
    try:
        whiten = noise_weights(ps, reader, noise_spectrum, coef, box, dev)
        job = _Job(ps, reader, maps, shell_filter, half_sets(ps), radius, q_start, centre, coef, whiten, settings,
                   sym, batch, dev, abort_check, progress, events, band_radius(box, apix))
        passes = [(np.nonzero(glob)[0], True, "refine global"), (np.nonzero(~glob)[0], False, "refine local")]
        for rows, is_global, label in passes:
            done = _refine_pass(job, rows, is_global, label)
            best.keep_better(done)
            glob[done.rows] |= is_global
        plausible = plausibility(best.cc, best.conf)
        if global_search == "auto":  # doubtful local results: search globally too, keep the better
            retry = np.nonzero(~glob & doubtful(best.conf, plausible))[0]
            if len(retry):
                done = _refine_pass(job, retry, True, "refine retry")
                best.keep_better(done)
                glob[done.rows] = True
                plausible = plausibility(best.cc, best.conf)
    finally:
        reader.close()
    conf = best.conf * plausible
    return RefineResult(rotations.normalize(best.quat), best.shift_px * apix, best.cc, np.clip(conf, 0.0, 1.0),
                        best.cc_low, best.sector, glob, time.time() - t_start)
