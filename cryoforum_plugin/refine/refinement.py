"""Projection matching: refinement of particle poses and shifts against a reference map (torch, CPU or GPU).

Model and score. A particle's centred transform is ``X = C·P(q)·exp(+2πi k·o/D) + noise`` (projection.py's
convention: ``P(q)`` the central slice of the map at ``Aᵀ·k``, ``o`` the RELION origin in pixels, ``C`` the
particle's CTF). With noise power ``N(k)`` per shell, the amplitude-free log-likelihood of a pose and shift is
``ll = max(num, 0)² / den`` with, over the half plane of Fourier coefficients (kx > 0, or kx = 0 and ky > 0; the
other half is the complex conjugate), ``num = Re Σ conj(P)·[C·X/N]·exp(-2πi k·o/D)`` and ``den = Σ |P|²·[C²/N]``.
The CTF sits on the particle side, so one bank of templates ``P`` serves every particle and both sums are
matrix products. The reported score is the normalised correlation ``num / sqrt(den · Σ|X|²/N)``.

Frequency marching. Coefficients are sorted by radius: a level at resolution ``r`` (Fourier pixels of the
particle box) uses a prefix of the list. Coarse levels use low ``r`` and wide angular steps, fine levels the
reverse (peak half-width in angle ≈ PEAK_WIDTH / r radians); the last level and the final shift use everything up
to ``resolution_A`` (default: Nyquist).

Reference. Resampled in Fourier space to the particles' pixel size, padded/cropped to their box. With half-maps
(gold standard), each half is Wiener-filtered by the half-map FSC per shell (weights in [0, 1]), which keeps its
noisy high-resolution shells from dominating the score; a single map is used as given (pass ``resolution_A`` to
low-pass it).

Global search (particles with no or untrusted start): a near-uniform SO(3) grid (GLOBAL_SPACING_DEG, Fibonacci
viewing directions × in-plane steps, restricted to the asymmetric unit of ``sym``) at low resolution against a
grid of shifts within ``max_shift`` of the start shift, as GEMMs over one template bank shared by all particles;
the GLOBAL_CANDIDATES best well-separated grid points are refined locally (radius one grid step), the best after
the first local level continues.

Local search: candidates ``dq ⊗ q`` (``dq`` = rotation vectors on a cubic grid inside a ball; left multiplication
perturbs the pose in the image frame, so an in-plane ``dq`` about z is a change of psi as in
``geometry.psi_rotation_quats``). Level 1 covers RADIUS_MARGIN × the particle's radius hint (123 candidates at
spacing radius/3, or 33 at radius/2 for small radii) and searches every integer shift of the window by FFT; each
later level halves the step (33 candidates around the best) with a 3x3 sub-pixel shift grid, until the step is
at most FINAL_STEP / r_max. A parabola per rotation axis refines the last level's best, and the final shift is
the sub-pixel (parabolic) peak of a 2x-upsampled FFT cross-correlation over the whole window.

Confidence: the posterior mass (``exp(ll)`` normalised over the searched poses, best shift each) within 1.5 grid
steps of the best pose, on the widest level a particle went through (the global grid, or the first local level);
halved when a local search ended at the rim of its ball (the optimum may lie outside the searched region); times
a plausibility in [0, 1] that falls from 1 to 0 as the final score goes from 2 to 4 robust SDs below the median of
the confident particles (a wrong pose or a junk particle matches much worse than its peers). The noise level is
calibrated on the data, so ``ll`` has its natural scale and the posterior its natural width.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from cryoforum_plugin.physics import rotations as geometry
from cryoforum_plugin.physics import symmetry
from cryoforum_plugin.physics.ctf import ctf_2d
from cryoforum_plugin.runtime import resolve_device
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.physics.fourier import fft2c, fft3c, freq_1d, pad_real, radius_3d
from cryoforum_plugin.physics.fsc import fsc_curve
from cryoforum_plugin.formats.mrc import StackReader
from cryoforum_plugin.physics.resample import map_on_particle_grid
from cryoforum_plugin.physics.noise import radial_power
from cryoforum_plugin.formats.particles import ParticleSet, half_sets
from cryoforum_plugin.progress import Progress

DEFAULT_RADIUS_DEG = 15.0  # local search radius when no per-particle hint is given
MAX_RADIUS_DEG = 45.0  # local radii are clipped to this; under "auto" larger hints go to the global search
RADIUS_MARGIN = 1.2  # the local search covers this multiple of the per-particle hint
FINE_BALL = 2.0  # later levels search |g| ≤ FINE_BALL steps (33 points; 1.5: 19 points), the step halving
SMALL_RADIUS_DEG = 13.0  # up to this search radius level 1 uses 33 candidates (spacing radius/2), beyond 123 (radius/3)
GLOBAL_SPACING_DEG = 12.5  # angular step of the global grid
GLOBAL_CANDIDATES = 4  # well-separated global-grid maxima refined locally
FALLBACK_CONFIDENCE = 0.6  # under "auto", local results below this confidence are searched globally too
GLOBAL_SHIFT_STEP = 5.0  # global shift grid step = box / (GLOBAL_SHIFT_STEP · r) pixels
PEAK_WIDTH = 1.5  # angular peak half-width ≈ PEAK_WIDTH / r (radians) at resolution r (Fourier pixels)
FINAL_STEP = 1.1  # the last local level's angular step is at most FINAL_STEP / r_max radians
MIN_RADIUS_PX = 6  # coarsest resolution used (Fourier pixels)


@dataclasses.dataclass
class RefineResult:
    """Per particle (N rows, the order of the input set)."""

    quat: np.ndarray  # (N, 4) refined, internal convention (geometry.py)
    shift_A: np.ndarray  # (N, 2) refined origins in Å (RELION sign)
    score: np.ndarray  # (N,) normalised correlation of the best match (whitened)
    confidence: np.ndarray  # (N,) in [0, 1]: posterior mass near the best pose (see the module docstring)
    global_searched: np.ndarray  # (N,) bool
    seconds: float

    @property
    def particles_per_second(self) -> float:
        return len(self.quat) / max(self.seconds, 1e-9)


# ------------------------------------------------------------------------------------------ rotations (torch)


def _quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """(..., 4) unit quaternions (w, x, y, z) -> (..., 3, 3) matrices (geometry.quat_to_matrix's, in torch)."""
    w, x, y, z = q.unbind(-1)
    m = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1)
    return m.reshape(*q.shape[:-1], 3, 3)


def _rotvec_to_quat(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) rotation vectors (radians) -> (..., 4) quaternions."""
    angle = v.norm(dim=-1, keepdim=True)
    half = angle / 2
    scale = torch.where(angle > 1e-12, torch.sin(half) / angle.clamp(min=1e-12), 0.5 - angle**2 / 48)
    return torch.cat([torch.cos(half), v * scale], -1)


@functools.cache
def _ball(radius: float) -> np.ndarray:
    """Integer points g of Z³ with |g| ≤ radius, (L, 3) float; sorted by |g| (the centre first)."""
    m = math.floor(radius)
    r = np.arange(-m, m + 1)
    g = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    g = g[np.linalg.norm(g, axis=1) <= radius + 1e-6]
    order = np.argsort(np.linalg.norm(g, axis=1), kind="stable")
    return g[order].astype(np.float64)


# ------------------------------------------------------------------------------------------ building blocks


def _gridding(n_pad: int, box: int, device) -> torch.Tensor:
    s = torch.sinc(freq_1d(n_pad, device) / n_pad) ** 2
    s = s[n_pad // 2 - box // 2: n_pad // 2 - box // 2 + box]
    return s[:, None, None] * s[None, :, None] * s[None, None, :]


class _Slices:
    """Central slices of one (D, D, D) map: its ``pad``-times zero-padded spectrum (trilinear interpolation
    pre-compensated, as projection.Projector), sampled at ``Aᵀ·k`` for any list of coefficients ``k``."""

    def __init__(self, vol: torch.Tensor, pad: int = 2, chunk: int = 1 << 21, shell_weight=None):
        d = vol.shape[-1]
        self.pad, self.n, self.chunk = pad, pad * d, chunk
        vol = vol / _gridding(self.n, d, vol.device)
        self.spec = fft3c(pad_real(vol, self.n, 3))
        if shell_weight is not None:  # a radial filter (per shell of the unpadded grid, linear interpolation)
            w = torch.as_tensor(np.asarray(shell_weight, dtype=np.float64), dtype=torch.float32, device=vol.device)
            r = radius_3d(self.n, vol.device) / pad
            i0 = r.floor().long().clamp(max=len(w) - 1)
            i1 = (i0 + 1).clamp(max=len(w) - 1)
            t = (r - r.floor()).clamp(0, 1)
            self.spec = self.spec * ((1 - t) * w[i0] + t * w[i1])
        self._crops: dict[int, torch.Tensor] = {}
        self.banks: dict = {}

    def _crop(self, radius: float) -> tuple[torch.Tensor, int]:
        m = min(math.ceil(self.pad * radius) + 2, self.n // 2 - 1)
        if m not in self._crops:
            c = self.n // 2
            sub = self.spec[c - m:c + m + 1, c - m:c + m + 1, c - m:c + m + 1]
            self._crops[m] = torch.stack([sub.real, sub.imag])[None].contiguous()  # (1, 2, s, s, s)
        return self._crops[m], m

    def sample(self, mats: torch.Tensor, kvec: torch.Tensor, radius: float) -> torch.Tensor:
        """(M, 3, 3) matrices ``A``, (K, 3) coefficients (x, y, 0) of radius ≤ ``radius`` -> (M, K) complex."""
        vol, m = self._crop(radius)
        k = kvec.shape[0]
        out = torch.empty((mats.shape[0], k), dtype=torch.complex64, device=mats.device)
        step = max(1, self.chunk // max(k, 1))
        for lo in range(0, mats.shape[0], step):
            coords = torch.einsum("mji,kj->mki", mats[lo:lo + step], kvec) * (self.pad / m)
            s = F.grid_sample(vol, coords[None, None], mode="bilinear", padding_mode="zeros",
                              align_corners=True)[0, :, 0]  # (2, M, K)
            out[lo:lo + step] = torch.complex(s[0], s[1])
        return out


class _Coefficients:
    """The half plane of Fourier coefficients (kx > 0, or kx = 0 and ky > 0) with 1 ≤ |k| ≤ r_max, sorted by
    radius, so that the first ``count(r)`` are those of radius ≤ r."""

    def __init__(self, box: int, r_max: float, device):
        f = np.arange(box) - box // 2
        ky, kx = np.meshgrid(f, f, indexing="ij")
        rad = np.hypot(kx, ky)
        keep = ((kx > 0) | ((kx == 0) & (ky > 0))) & (rad <= r_max)
        order = np.argsort(rad[keep], kind="stable")
        self.box, self.r_max = box, float(r_max)
        self.radius = rad[keep][order]
        self.kx = torch.as_tensor(kx[keep][order], dtype=torch.float32, device=device)
        self.ky = torch.as_tensor(ky[keep][order], dtype=torch.float32, device=device)
        self.flat = torch.as_tensor((ky[keep][order] + box // 2) * box + kx[keep][order] + box // 2, device=device)
        self.shell = torch.as_tensor(np.round(self.radius).astype(np.int64), device=device)
        self.kvec = torch.stack([self.kx, self.ky, torch.zeros_like(self.kx)], -1)

    def count(self, r: float) -> int:
        return int(np.searchsorted(self.radius, r + 1e-9, side="right"))

    def phase(self, shifts: torch.Tensor, k: int) -> torch.Tensor:
        """(..., 2) origins in pixels -> (..., k) exp(-2πi k·o/D) over the first k coefficients."""
        arg = (shifts[..., 0:1] * self.kx[:k] + shifts[..., 1:2] * self.ky[:k]) * (-2 * np.pi / self.box)
        return torch.polar(torch.ones_like(arg), arg)


@dataclasses.dataclass
class _Batch:
    """Particle-side terms on the coefficient list: y = C·X/N (complex), c2w = C²/N, xw = cumulative Σ|X|²/N,
    centre = the start shift (pixels) around which the shift window lies."""

    y: torch.Tensor
    c2w: torch.Tensor
    xw: torch.Tensor
    centre: torch.Tensor

    def take(self, idx: torch.Tensor) -> _Batch:
        return _Batch(self.y[idx], self.c2w[idx], self.xw[idx], self.centre[idx])

    def __len__(self) -> int:
        return self.y.shape[0]


def _whitening(spectrum: np.ndarray, shells: torch.Tensor, box: int) -> torch.Tensor:
    """1/N(k) on the coefficient list from a radial spectrum (box//2 + 1 shells, noise.py's convention
    ``E|fft2c(x)|²/box²``): N = spectrum·box² at round(|k|) (the last shell beyond)."""
    s = torch.as_tensor(np.asarray(spectrum, dtype=np.float64) * box * box, dtype=torch.float32,
                        device=shells.device)
    s = s.clamp(min=float(s.max()) * 1e-6 + 1e-30)
    return 1.0 / s[shells.clamp(max=len(s) - 1)]


# ------------------------------------------------------------------------------------------ scoring


def _num_explicit(t: torch.Tensor, batch: _Batch, coef: _Coefficients, shifts: torch.Tensor) -> torch.Tensor:
    """(B, L, K) templates, (B, S, 2) absolute shifts -> (B, L, S) numerators."""
    k = t.shape[-1]
    ys = batch.y[:, None, :k] * coef.phase(shifts, k)  # (B, S, K)
    tc = torch.cat([t.real, t.imag], -1)
    yc = torch.cat([ys.real, ys.imag], -1)
    return torch.matmul(tc, yc.transpose(1, 2))


def _parabola(cm: torch.Tensor, c0: torch.Tensor, cp: torch.Tensor) -> torch.Tensor:
    """Vertex offset in [-0.5, 0.5] steps of a parabola through (-1, cm), (0, c0), (1, cp) (0 if not a max)."""
    den = cm - 2 * c0 + cp
    off = torch.where(den < 0, 0.5 * (cm - cp) / torch.where(den < 0, den, -torch.ones_like(den)),
                      torch.zeros_like(den))
    return off.clamp(-0.5, 0.5)


def _num_fft(t: torch.Tensor, batch: _Batch, coef: _Coefficients, window: torch.Tensor, upsample: int,
             chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Translational search by FFT: (B, L, K) templates -> best numerator (B, L) over the shifts of ``window``
    (a (Dg, Dg) mask of offsets from the batch centre, Dg = upsample·D) and its sub-pixel shift (B, L, 2)."""
    b, l, k = t.shape
    dg = coef.box * upsample
    pos = ((coef.ky[:k].long() % dg) * dg + coef.kx[:k].long() % dg)
    yc = batch.y[:, :k] * coef.phase(batch.centre, k)  # (B, K)
    best = torch.empty((b, l), device=t.device)
    shift = torch.empty((b, l, 2), device=t.device)
    widx = torch.nonzero(window.reshape(-1))[:, 0]
    step = max(1, chunk // (l * dg * dg))
    f = freq_1d(dg, t.device).roll(-(dg // 2))  # position p -> signed offset (in 1/upsample px)
    for lo in range(0, b, step):
        z = torch.conj(t[lo:lo + step]) * yc[lo:lo + step, None]  # (b', L, K)
        grid = torch.zeros((z.shape[0] * l, dg * dg), dtype=z.dtype, device=z.device)
        grid[:, pos] = z.reshape(-1, k)
        c = torch.fft.fft2(grid.reshape(-1, dg, dg)).real  # c[py, px] = num at offset (px, py)/upsample
        val, a = c.reshape(c.shape[0], -1)[:, widx].max(-1)
        arg = widx[a]
        py, px = arg // dg, arg % dg
        idx = torch.arange(c.shape[0], device=c.device)
        ox = _parabola(c[idx, py, (px - 1) % dg], val, c[idx, py, (px + 1) % dg])
        oy = _parabola(c[idx, (py - 1) % dg, px], val, c[idx, (py + 1) % dg, px])
        best[lo:lo + step] = val.reshape(-1, l)
        s = torch.stack([f[px] + ox, f[py] + oy], -1) / upsample
        shift[lo:lo + step] = s.reshape(-1, l, 2) + batch.centre[lo:lo + step, None]
    return best, shift


def _window(box: int, upsample: int, max_shift_px: float, device) -> torch.Tensor:
    dg = box * upsample
    f = freq_1d(dg, device).roll(-(dg // 2)) / upsample
    return (f[:, None] ** 2 + f[None, :] ** 2) <= max_shift_px**2 + 1e-6


# ------------------------------------------------------------------------------------------ searches


@dataclasses.dataclass
class _Settings:
    r_max: float
    max_shift_px: float
    chunk: int  # elements per intermediate tensor
    group: torch.Tensor  # (G, 4) symmetry quaternions


def _resolution_for(step_rad: float, s: _Settings) -> float:
    return float(min(s.r_max, max(min(MIN_RADIUS_PX, s.r_max), PEAK_WIDTH / max(step_rad, 1e-6))))


def _local(slices: _Slices, coef: _Coefficients, batch: _Batch, q0: torch.Tensor, radius: torch.Tensor,
           s: _Settings, groups: int = 1, units1: int = 3):
    """Coarse-to-fine local search from (B, 4) starts within (B,) radii (radians). With ``groups`` > 1 the rows
    are consecutive groups of candidates for one particle: after level 1 only each group's best continues.
    Returns quat (B', 4), shift (B', 2) (the last level's, before the final FFT search), confidence (B',) and the
    batch (B' rows), B' = B / groups."""
    dev = q0.device
    q_start = q0
    final = FINAL_STEP / s.r_max
    n_levels, h_max = 1, float(radius.max()) / units1
    while h_max > final and n_levels < 8:
        h_max /= 2
        n_levels += 1
    q = q0
    shift = batch.centre.clone()
    conf = None
    for j in range(n_levels):
        units = units1 if j == 0 else FINE_BALL
        h = radius / (units1 * 2.0**j)
        grid = torch.as_tensor(_ball(units), dtype=torch.float32, device=dev)  # (L, 3)
        l = grid.shape[0]
        r = _resolution_for(float(h.max()), s) if j < n_levels - 1 else s.r_max
        k = coef.count(r)
        dq = _rotvec_to_quat(grid[None] * h[:, None, None])  # (B, L, 4)
        cand = geometry.quat_mul(dq, q[:, None])  # dq ⊗ q
        t = slices.sample(_quat_to_matrix(cand).reshape(-1, 3, 3), coef.kvec[:k], r).reshape(len(q), l, k)
        den = (t.real**2 + t.imag**2) @ batch.c2w[:, :k, None]  # (B, L, 1)
        den = den[..., 0].clamp(min=1e-30)
        if j == 0:
            num, shifts = _num_fft(t, batch, coef, _window(coef.box, 1, s.max_shift_px, dev), 1, s.chunk)
        else:
            step = max(0.125, min(0.5, coef.box / (8.0 * r)))
            off = torch.stack(torch.meshgrid(*[torch.tensor([-step, 0.0, step], device=dev)] * 2, indexing="xy"),
                              -1).reshape(-1, 2)
            cand_shift = shift[:, None] + off  # (B, 9, 2)
            inside = ((cand_shift - batch.centre[:, None]) ** 2).sum(-1) <= s.max_shift_px**2 + 1e-6
            nums = _num_explicit(t, batch, coef, cand_shift)  # (B, L, 9)
            nums = nums.masked_fill(~inside[:, None], float("-inf"))
            num, si = nums.max(-1)
            shifts = torch.gather(cand_shift[:, None].expand(-1, l, -1, -1), 2,
                                  si[..., None, None].expand(-1, -1, 1, 2))[:, :, 0]
        ll = num.clamp(min=0) ** 2 / den
        if j == 0:
            conf = _local_confidence(ll, grid)
            if groups > 1:  # keep each particle's best candidate
                g = ll.max(-1).values.reshape(-1, groups).argmax(-1)
                keep = torch.arange(len(g), device=dev) * groups + g
                ll, num, den, shifts, cand, t = ll[keep], num[keep], den[keep], shifts[keep], cand[keep], t[keep]
                batch, h, radius, conf = batch.take(keep), h[keep], radius[keep], conf[keep]
                q_start = q_start[keep]
        best = ll.argmax(-1)
        rows = torch.arange(len(best), device=dev)
        q, shift = cand[rows, best], shifts[rows, best]
        if j == n_levels - 1:  # parabola per rotation axis around the best
            q = _parabolic_rotation(num / den.sqrt(), grid, units, best, h, q, rows)
    # a pose that moved to the rim of the searched ball may have its optimum outside: halve the confidence
    moved = geometry.geodesic(q, q_start)
    conf = torch.where(moved > 0.9 * radius, conf * 0.5, conf)
    return q, shift, conf, batch


def _local_confidence(ll: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(ll, -1)
    best = ll.argmax(-1)
    near = ((grid[None] - grid[best][:, None]) ** 2).sum(-1) <= 1.5**2 + 1e-6  # (B, L)
    return (p * near).sum(-1)


@functools.cache
def _neighbours(units: float) -> np.ndarray:
    """(L, 3, 2) indices into _ball(units) of each point's neighbours -e_a and +e_a (-1 where outside)."""
    g = _ball(units).round().astype(int)
    index = {tuple(p): i for i, p in enumerate(g)}
    out = np.full((len(g), 3, 2), -1, np.int64)
    for i, p in enumerate(g):
        for a in range(3):
            e = np.eye(3, dtype=int)[a]
            out[i, a, 0] = index.get(tuple(p - e), -1)
            out[i, a, 1] = index.get(tuple(p + e), -1)
    return out


def _parabolic_rotation(cc, grid, units, best, h, q_best, rows):
    """Refine the best of a level by a parabola along each axis of the rotation-vector grid ((B, L) scores)."""
    nb = torch.as_tensor(_neighbours(units), device=cc.device)[best]  # (B, 3, 2)
    ok = (nb >= 0).all(-1)
    c0 = cc[rows, best][:, None]
    cm = torch.gather(cc, 1, nb[..., 0].clamp(min=0))
    cp = torch.gather(cc, 1, nb[..., 1].clamp(min=0))
    delta = torch.where(ok, _parabola(cm, c0, cp), torch.zeros_like(cm))  # (B, 3) in grid steps
    gb = grid[best]
    # the candidate was dq(h·gb) ⊗ q_prev: move to dq(h·(gb + delta)) ⊗ q_prev
    q_prev = geometry.quat_mul(geometry.quat_conj(_rotvec_to_quat(gb * h[:, None])), q_best)
    return geometry.quat_mul(_rotvec_to_quat((gb + delta) * h[:, None]), q_prev)


def _global(slices: _Slices, coef: _Coefficients, batch: _Batch, grid_q: torch.Tensor, spacing: float,
            s: _Settings, n_cand: int):
    """Exhaustive search over the global grid: (B, n_cand, 4) separated candidates and (B,) confidence."""
    dev = grid_q.device
    r = _resolution_for(spacing, s)
    k = coef.count(r)
    key = ("bank", r, grid_q.shape[0])
    if key not in slices.banks:
        t = slices.sample(_quat_to_matrix(grid_q), coef.kvec[:k], r)  # (G, K)
        slices.banks[key] = (torch.cat([t.real, t.imag], -1).T.contiguous(), (t.real**2 + t.imag**2).T.contiguous())
    tc, t2 = slices.banks[key]
    n_grid = grid_q.shape[0]
    step = max(0.5, coef.box / (GLOBAL_SHIFT_STEP * r))
    m = math.floor(s.max_shift_px / step)
    o = torch.arange(-m, m + 1, device=dev, dtype=torch.float32) * step
    off = torch.stack(torch.meshgrid(o, o, indexing="xy"), -1).reshape(-1, 2)
    off = off[(off**2).sum(-1) <= s.max_shift_px**2 + 1e-6]  # (S, 2)
    n_s = off.shape[0]
    b = len(batch)
    ll = torch.empty((b, n_grid), device=dev)
    g_chunk = max(256, min(n_grid, s.chunk // max(1, 4 * n_s)))
    b_chunk = max(1, s.chunk // (n_s * g_chunk))
    for lo in range(0, b, b_chunk):
        sl = slice(lo, lo + b_chunk)
        ys = batch.y[sl, None, :k] * coef.phase(batch.centre[sl, None] + off, k)  # (b', S, K)
        yc = torch.cat([ys.real, ys.imag], -1).reshape(-1, 2 * k)
        for g0 in range(0, n_grid, g_chunk):
            gs = slice(g0, g0 + g_chunk)
            num = (yc @ tc[:, gs]).reshape(-1, n_s, tc[:, gs].shape[1]).max(1).values  # (b', g)
            den = (batch.c2w[sl, :k] @ t2[:, gs]).clamp(min=1e-30)
            ll[sl, gs] = num.clamp(min=0) ** 2 / den
    # candidates: greedy non-maximum suppression among the 64 best grid points
    top = ll.topk(min(64, n_grid), dim=-1)
    tq = grid_q[top.indices]  # (B, 64, 4)
    cos_sep = math.cos(1.5 * spacing / 2)
    free = torch.ones(top.indices.shape, dtype=torch.bool, device=dev)
    rows = torch.arange(b, device=dev)
    picks = []
    for _ in range(int(n_cand)):
        i = torch.where(free.any(-1), free.float().argmax(-1), torch.zeros(b, dtype=torch.long, device=dev))
        picks.append(i)
        dots = _sym_dot(tq, tq[rows, i][:, None], s.group)  # (B, 64)
        free &= dots < cos_sep
    cand = torch.stack([tq[rows, i] for i in picks], 1)  # (B, n_cand, 4)
    # confidence: posterior mass within 1.5 grid steps of the best
    p = torch.softmax(ll, -1)
    dots = _sym_dot(grid_q[None], grid_q[top.indices[:, 0]][:, None], s.group)  # (B, G)
    conf = (p * (dots >= math.cos(1.5 * spacing / 2))).sum(-1)
    return cand, conf


def _global_refine(slices: _Slices, coef: _Coefficients, data: _Batch, grid_q: torch.Tensor, s: _Settings):
    """Global grid search, local refinement of its candidates, final shift: quat, shift, cc, ll, confidence."""
    spacing = math.radians(GLOBAL_SPACING_DEG)
    cand, conf = _global(slices, coef, data, grid_q, spacing, s, GLOBAL_CANDIDATES)
    m = cand.shape[1]
    rep = torch.arange(len(data), device=cand.device).repeat_interleave(m)
    q, _, _, data_k = _local(slices, coef, data.take(rep), cand.reshape(-1, 4),
                             torch.full((len(data) * m,), spacing, device=cand.device), s, groups=m, units1=2)
    shift, cc, ll = _finish(slices, coef, data_k, q, s)
    return q, shift, cc, ll, conf


def _sym_dot(a: torch.Tensor, b: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """|<a, b ⊗ g>| maximised over the group: cos of half the symmetry-aware geodesic; shapes broadcast (..., 4)."""
    best = None
    for g in group:
        d = (a * geometry.quat_mul(b, g.expand_as(b))).sum(-1).abs()
        best = d if best is None else torch.maximum(best, d)
    return best


def _finish(slices: _Slices, coef: _Coefficients, batch: _Batch, q: torch.Tensor, s: _Settings):
    """Final shift (2x-upsampled FFT, parabolic peak, whole window) and score at full resolution."""
    k = coef.count(s.r_max)
    t = slices.sample(_quat_to_matrix(q), coef.kvec[:k], s.r_max)[:, None]  # (B, 1, K)
    _, shift = _num_fft(t, batch, coef, _window(coef.box, 2, s.max_shift_px, q.device), 2, s.chunk)
    shift = shift[:, 0]
    num = _num_explicit(t, batch, coef, shift[:, None])[:, 0, 0]
    den = ((t[:, 0].real**2 + t[:, 0].imag**2) * batch.c2w[:, :k]).sum(-1).clamp(min=1e-30)
    cc = num / (den * batch.xw[:, k - 1].clamp(min=1e-30)).sqrt()
    ll = num.clamp(min=0) ** 2 / den
    return shift, cc, ll


# ------------------------------------------------------------------------------------------ reference


def _prepare_reference(reference, reference_pixel_size: float, box: int, apix: float, device) -> dict:
    """{1: map, 2: map} on the particles' grid (box³ at their pixel size)."""
    if isinstance(reference, dict):
        missing = [k for k in ("half1", "half2") if k not in reference]
        if missing:
            raise CryoforumError(f"the reference dict lacks {', '.join(missing)}.",
                                 fix="pass one map, or {'half1': map, 'half2': map} for gold-standard refinement.")
        maps = {1: reference["half1"], 2: reference["half2"]}
    else:
        maps = {1: reference, 2: reference}
    if not reference_pixel_size or not np.isfinite(reference_pixel_size) or reference_pixel_size <= 0:
        raise CryoforumError(f"invalid reference pixel size {reference_pixel_size}.",
                             fix="pass the map's pixel size in Å (reference_pixel_size).")
    def on_grid(vol):
        return map_on_particle_grid(vol, box, apix, reference_pixel_size, device, what="reference")

    out = {1: on_grid(maps[1])}
    out[2] = out[1] if maps[2] is maps[1] else on_grid(maps[2])
    return out


# ------------------------------------------------------------------------------------------ driver


def refine(ps: ParticleSet, reference, *, reference_pixel_size: float, sym: str = "C1",
           max_shift_A: float | None = None, global_search: str = "auto", uncertain: np.ndarray | None = None,
           start_error_deg: np.ndarray | None = None, noise_spectrum: np.ndarray | None = None,
           resolution_A: float | None = None, batch: int = 128, device=None, progress: bool = True,
           abort_check=None, events=None) -> RefineResult:
    """Refine the poses and shifts of ``ps`` against ``reference`` (a (D, D, D) map or {'half1', 'half2'}:
    particles of half-set 1/2 use their half-map, RELION's gold standard: each half is matched against the map
    reconstructed from that half only; particles without a half-set get ``particles.half_sets``'s, the one the
    reconstruction gives them too).

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
        return RefineResult(np.zeros((0, 4)), np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0, bool), 0.0)
    apix, box = ps.require_one_sampling("refinement")
    maps = _prepare_reference(reference, reference_pixel_size, box, apix, dev)
    filt = None
    if maps[2] is not maps[1]:  # gold standard: Wiener-filter each half-map by the half-map FSC
        filt = np.clip(fsc_curve(maps[1].cpu(), maps[2].cpu()), 1e-3, 1.0)
        filt = np.concatenate([filt, [filt[-1]] * 2])
        filt[0] = 1.0
    finest = max(2 * apix, 2 * float(reference_pixel_size), float(resolution_A or 0.0))
    r_max = min(box * apix / finest, box / 2 - 1)
    max_shift_px = (0.2 * box) if max_shift_A is None else float(max_shift_A) / apix
    max_shift_px = float(min(max(max_shift_px, 0.0), box / 2 - 1))
    group = torch.as_tensor(symmetry.group_quats(sym), dtype=torch.float32, device=dev)
    settings = _Settings(r_max, max_shift_px, (1 << 24) if dev.type == "cuda" else (1 << 21), group)
    coef = _Coefficients(box, r_max, dev)

    for name, arr in (("uncertain", uncertain), ("start_error_deg", start_error_deg)):
        if arr is not None and np.shape(arr) != (n,):
            raise CryoforumError(f"{name} has shape {np.shape(arr)}; one value per particle ({n}) is needed.",
                                 fix=f"pass a ({n},) array or None.")
    # who goes where
    has_pose = ps.has_poses
    hint = np.full(n, DEFAULT_RADIUS_DEG) if start_error_deg is None else np.asarray(start_error_deg, float).copy()
    hint[~np.isfinite(hint)] = MAX_RADIUS_DEG * 2
    glob = ~has_pose
    if global_search == "all":
        glob[:] = True
    elif global_search == "auto":
        if uncertain is not None:
            glob |= np.asarray(uncertain, bool)
        glob |= hint > MAX_RADIUS_DEG
    radius = np.radians(np.clip(hint * RADIUS_MARGIN, 0.5, MAX_RADIUS_DEG))
    half = half_sets(ps)
    centre = np.nan_to_num(np.asarray(ps.shift_A, float) / apix)
    q_start = np.where(has_pose[:, None], np.nan_to_num(ps.quat), np.array([1.0, 0, 0, 0]))

    out_q = np.zeros((n, 4))
    out_s = np.zeros((n, 2))
    out_cc = np.zeros(n)
    out_ll = np.full(n, -np.inf)
    out_conf = np.zeros(n)
    grid_cache = []

    def grid_q():  # the global grid, made on first use
        if not grid_cache:
            grid_cache.append(torch.as_tensor(symmetry.so3_grid(GLOBAL_SPACING_DEG, sym), dtype=torch.float32, device=dev))
        return grid_cache[0]

    def run(rows_sel: np.ndarray, is_global: bool, label: str) -> None:
        """Refine ``rows_sel`` (half by half, in batches); a global pass keeps a row's previous result when that
        has the higher likelihood."""
        bar = Progress(len(rows_sel), label, enabled=progress, events=events)
        slices = None
        for h in (1, 2):
            sel = rows_sel[half[rows_sel] == h]
            if not len(sel):
                continue
            if slices is None or maps[2] is not maps[1]:
                slices = _Slices(maps[h], chunk=settings.chunk, shell_weight=filt)
            if not is_global:  # similar radii in one batch: the levels' resolutions suit them all
                sel = sel[np.argsort(radius[sel], kind="stable")]
            for lo in range(0, len(sel), batch):
                if abort_check is not None:
                    abort_check()
                rows = sel[lo:lo + batch]
                data = _load(ps, reader, rows, coef, whiten, centre, dev)
                with torch.no_grad():
                    if is_global:
                        q, shift, cc, ll, conf = _global_refine(slices, coef, data, grid_q(), settings)
                    else:
                        q0 = torch.as_tensor(q_start[rows], dtype=torch.float32, device=dev)
                        rad = torch.as_tensor(radius[rows], dtype=torch.float32, device=dev)
                        units1 = 3 if float(rad.max()) > math.radians(SMALL_RADIUS_DEG) else 2
                        q, _, conf, data_k = _local(slices, coef, data, q0, rad, settings, units1=units1)
                        shift, cc, ll = _finish(slices, coef, data_k, q, settings)
                ll = ll.double().cpu().numpy()
                better = ll > out_ll[rows]
                r = rows[better]
                out_q[r] = q.double().cpu().numpy()[better]
                out_s[r] = shift.double().cpu().numpy()[better]
                out_cc[r] = cc.double().cpu().numpy()[better]
                out_ll[r] = ll[better]
                out_conf[r] = conf.double().cpu().numpy()[better]
                glob[rows] |= is_global
                bar.update(len(rows))
        bar.close()

    reader = StackReader()
    try:
        whiten = _noise_weights(ps, reader, noise_spectrum, coef, box, dev)
        run(np.nonzero(glob)[0], True, "refine global")
        run(np.nonzero(~glob)[0], False, "refine local")
        plausible = _plausibility(out_cc, out_conf)
        if global_search == "auto":  # doubtful local results: search globally too, keep the better
            retry = np.nonzero(~glob & ((out_conf < FALLBACK_CONFIDENCE) | (plausible < 1)))[0]
            if len(retry):
                run(retry, True, "refine retry")
                plausible = _plausibility(out_cc, out_conf)
    finally:
        reader.close()
    out_conf = out_conf * plausible
    return RefineResult(geometry.normalize(out_q), out_s * apix, out_cc, np.clip(out_conf, 0.0, 1.0), glob,
                        time.time() - t_start)


def _plausibility(cc: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """1 for scores within 2 robust SDs (1.4826 MAD) below the median score of the confident particles, falling
    linearly to 0 at 4 SDs below: a wrong pose or a junk particle matches much worse than its peers."""
    ref = cc[conf >= FALLBACK_CONFIDENCE] if (conf >= FALLBACK_CONFIDENCE).sum() >= 20 else cc
    med = float(np.median(ref))
    sd = max(1.4826 * float(np.median(np.abs(ref - med))), 0.05 * abs(med), 1e-6)
    return np.clip((cc - (med - 4 * sd)) / (2 * sd), 0.0, 1.0)


def _load(ps: ParticleSet, reader: StackReader, rows: np.ndarray, coef: _Coefficients, whiten: torch.Tensor,
          centre: np.ndarray, dev) -> _Batch:
    box = coef.box
    images = torch.from_numpy(ps.read_images(reader, rows)).to(dev)
    x = fft2c(images).reshape(len(rows), -1)[:, coef.flat]  # (B, K)
    if ps.ctf is None:
        c = torch.ones_like(x.real)
    else:
        c = ctf_2d(ps.ctf, rows, box, ps.pixel_size[rows], dev).reshape(len(rows), -1)[:, coef.flat]
    y = x * (c * whiten)
    c2w = c * c * whiten
    xw = torch.cumsum((x.real**2 + x.imag**2) * whiten, -1)
    return _Batch(y, c2w, xw, torch.as_tensor(centre[rows], dtype=torch.float32, device=dev))


def _noise_weights(ps: ParticleSet, reader: StackReader, spectrum, coef: _Coefficients, box: int, dev):
    """1/N on the coefficient list. The shape comes from ``spectrum`` (or, without one, the mean power spectrum
    of up to 512 particles); the level is set so that the data's power over the outer half of the used shells
    averages N there (noise-dominated at cryo-EM SNR), so the log-likelihood has its natural scale."""
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(ps), min(len(ps), 512), replace=False))
    power = np.zeros(box // 2 + 1)
    for lo in range(0, len(rows), 128):
        r = rows[lo:lo + 128]
        images = torch.from_numpy(ps.read_images(reader, r)).to(dev)
        power += radial_power(images).cpu().numpy() * len(r)
    power /= len(rows)
    if spectrum is None:
        shape = power
    else:
        shape = np.asarray(spectrum, dtype=np.float64).reshape(-1)
        if shape.shape != (box // 2 + 1,) or not np.all(np.isfinite(shape)) or shape.max() <= 0:
            raise CryoforumError(f"the noise spectrum must have {box // 2 + 1} finite values (one per shell of a "
                                 f"{box}-px box), got shape {shape.shape}.",
                                 fix="pass noise.estimate_noise_spectrum(...).spectrum for these particles.")
        shape = np.maximum(shape, shape.max() * 1e-6)
    hi = np.arange(box // 2 + 1)
    sel = (hi >= coef.r_max / 2) & (hi <= coef.r_max)
    level = float(np.mean(power[sel] / shape[sel])) if sel.any() else 1.0
    return _whitening(shape * level, coef.shell, box)
