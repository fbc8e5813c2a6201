"""The score of a pose and shift in projection matching (torch): the coefficient list, the particle-side terms,
the likelihood numerators (at given shifts, or the best shift by FFT) and the resolution of a search level.

Model and score. A particle's centred transform is ``X = C·P(q)·exp(+2πi k·o/D) + noise`` (the projector's
convention: ``P(q)`` the central slice of the map at ``Aᵀ·k``, ``o`` the RELION origin in pixels, ``C`` the
particle's CTF). With noise power ``N(k)`` per shell, the amplitude-free log-likelihood of a pose and shift is
``ll = max(num, 0)² / den`` with, over the half plane of Fourier coefficients (kx > 0, or kx = 0 and ky > 0; the
other half is the complex conjugate), ``num = Re Σ conj(P)·[C·X/N]·exp(-2πi k·o/D)`` and ``den = Σ |P|²·[C²/N]``.
The CTF sits on the particle side, so one bank of templates ``P`` serves every particle and both sums are
matrix products. The reported score is the normalised correlation ``num / sqrt(den · Σ|X|²/N)``.

Frequency marching. Coefficients are sorted by radius: a level at resolution ``r`` (Fourier pixels of the
particle box) uses a prefix of the list. Coarse levels use low ``r`` and wide angular steps, fine levels the
reverse (peak half-width in angle ≈ PEAK_WIDTH / r radians); the last level and the final shift use everything up
to the finest resolution ``r_max``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cryoforum_plugin.physics.fourier import freq_1d

PEAK_WIDTH = 1.5  # angular peak half-width ≈ PEAK_WIDTH / r (radians) at resolution r (Fourier pixels)
MIN_RADIUS_PX = 6  # coarsest resolution used (Fourier pixels)
CPU_CHUNK = 1 << 21  # elements per intermediate tensor on a CPU
GPU_CHUNK_MIN, GPU_CHUNK_MAX = 1 << 24, 1 << 28  # on a GPU: sized by the free memory, within these bounds
GPU_CHUNK_MEMORY_SHARE = 1 / 8  # share of the free GPU memory that the intermediates of one step may take
CHUNK_ELEMENT_BYTES = 32  # bytes per chunk element at a step's peak (e.g. the FFT search: complex64 grid + its FFT
# + gathers; the slice sampling: coordinates, samples and the complex result)


class HalfPlaneCoefficients:
    """The half plane of Fourier coefficients (kx > 0, or kx = 0 and ky > 0) with 1 ≤ |k| ≤ r_max of a ``box``-px
    image, sorted by radius, so that the first ``count(r)`` are those of radius ≤ r. Per coefficient (K,): ``kx``,
    ``ky`` (Fourier pixels), ``radius``, ``flat`` (index into the flattened centred (box, box) transform), ``shell``
    (round(|k|)); ``kvec`` (K, 3) = (kx, ky, 0)."""

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
        """How many coefficients have radius ≤ ``r`` (Fourier pixels)."""
        return int(np.searchsorted(self.radius, r + 1e-9, side="right"))

    def phase(self, shifts: torch.Tensor, k: int) -> torch.Tensor:
        """(..., 2) origins in pixels -> (..., k) exp(-2πi k·o/D) over the first k coefficients."""
        arg = (shifts[..., 0:1] * self.kx[:k] + shifts[..., 1:2] * self.ky[:k]) * (-2 * np.pi / self.box)
        return torch.polar(torch.ones_like(arg), arg)


@dataclasses.dataclass
class ParticleTerms:
    """Particle-side terms of B particles on the coefficient list (K,): ``y`` = C·X/N (B, K) complex, ``c2w`` =
    C²/N (B, K), ``xw`` = cumulative Σ|X|²/N (B, K), ``centre`` = the start shift (B, 2) in pixels around which the
    shift window lies."""

    y: torch.Tensor
    c2w: torch.Tensor
    xw: torch.Tensor
    centre: torch.Tensor

    def take(self, idx: torch.Tensor) -> ParticleTerms:
        """The rows ``idx`` (repeats allowed)."""
        return ParticleTerms(self.y[idx], self.c2w[idx], self.xw[idx], self.centre[idx])

    def __len__(self) -> int:
        return self.y.shape[0]


@dataclasses.dataclass
class SearchSettings:
    """What every search level of one refinement shares."""

    r_max: float  # finest resolution used (Fourier pixels)
    max_shift_px: float  # the shift stays within this distance of the start shift (pixels)
    chunk: int  # elements per intermediate tensor
    group: torch.Tensor  # (G, 4) symmetry quaternions


def chunk_elements(device: torch.device) -> int:
    """Elements per intermediate tensor of the searches (``SearchSettings.chunk``) on ``device``: CPU_CHUNK on a
    CPU; on a GPU the free memory × GPU_CHUNK_MEMORY_SHARE / CHUNK_ELEMENT_BYTES rounded down to a power of two,
    within [GPU_CHUNK_MIN, GPU_CHUNK_MAX]. An H100 with 78 GB free gets 2**28: level 1's FFT search at 256 px
    (123 candidates, a 256² grid each) then takes 33 particles per call, where the fixed 2**24 took 2. The chunks
    only group independent rows: results do not depend on them (tests/test_gpu_benchmark.py)."""
    if device.type != "cuda":
        return CPU_CHUNK
    free, _ = torch.cuda.mem_get_info(device)
    fit = int(free * GPU_CHUNK_MEMORY_SHARE / CHUNK_ELEMENT_BYTES)
    return min(GPU_CHUNK_MAX, max(GPU_CHUNK_MIN, 1 << max(fit, 1).bit_length() - 1))


def resolution_for_step(step_rad: float, s: SearchSettings) -> float:
    """Resolution (Fourier pixels) of a level with angular step ``step_rad``: PEAK_WIDTH / step, within
    [MIN_RADIUS_PX, r_max]."""
    return float(min(s.r_max, max(min(MIN_RADIUS_PX, s.r_max), PEAK_WIDTH / max(step_rad, 1e-6))))


def numerators_at_shifts(t: torch.Tensor, batch: ParticleTerms, coef: HalfPlaneCoefficients,
                         shifts: torch.Tensor) -> torch.Tensor:
    """(B, L, K) templates, (B, S, 2) absolute shifts (pixels) -> (B, L, S) numerators ``num``."""
    k = t.shape[-1]
    ys = batch.y[:, None, :k] * coef.phase(shifts, k)  # (B, S, K)
    tc = torch.cat([t.real, t.imag], -1)
    yc = torch.cat([ys.real, ys.imag], -1)
    return torch.matmul(tc, yc.transpose(1, 2))


def parabola_vertex(cm: torch.Tensor, c0: torch.Tensor, cp: torch.Tensor) -> torch.Tensor:
    """Vertex offset in [-0.5, 0.5] steps of a parabola through (-1, cm), (0, c0), (1, cp) (0 if not a max)."""
    den = cm - 2 * c0 + cp
    off = torch.where(den < 0, 0.5 * (cm - cp) / torch.where(den < 0, den, -torch.ones_like(den)),
                      torch.zeros_like(den))
    return off.clamp(-0.5, 0.5)


def best_numerators_by_fft(t: torch.Tensor, batch: ParticleTerms, coef: HalfPlaneCoefficients, window: torch.Tensor,
                           upsample: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Translational search by FFT: (B, L, K) templates -> best numerator (B, L) over the shifts of ``window``
    (a (Dg, Dg) mask of offsets from the batch centre, Dg = upsample·D) and its sub-pixel shift (B, L, 2) in
    pixels (absolute; a parabola through the peak and its neighbours along x and y)."""
    b, l, k = t.shape
    dg = coef.box * upsample
    pos = ((coef.ky[:k].long() % dg) * dg + coef.kx[:k].long() % dg)
    yc = batch.y[:, :k] * coef.phase(batch.centre, k)  # (B, K)
    best = torch.empty((b, l), device=t.device)
    shift = torch.empty((b, l, 2), device=t.device)
    widx = torch.nonzero(window.reshape(-1))[:, 0].to(t.device)  # a CPU window: no wait for the device here
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
        ox = parabola_vertex(c[idx, py, (px - 1) % dg], val, c[idx, py, (px + 1) % dg])
        oy = parabola_vertex(c[idx, (py - 1) % dg, px], val, c[idx, (py + 1) % dg, px])
        best[lo:lo + step] = val.reshape(-1, l)
        s = torch.stack([f[px] + ox, f[py] + oy], -1) / upsample
        shift[lo:lo + step] = s.reshape(-1, l, 2) + batch.centre[lo:lo + step, None]
    return best, shift


def shift_window(box: int, upsample: int, max_shift_px: float, device) -> torch.Tensor:
    """(Dg, Dg) bool, Dg = upsample·box, in FFT order (offset 0 at index 0): the offsets (1/upsample px) within
    ``max_shift_px`` of the centre."""
    dg = box * upsample
    f = freq_1d(dg, device).roll(-(dg // 2)) / upsample
    return (f[:, None] ** 2 + f[None, :] ** 2) <= max_shift_px**2 + 1e-6
