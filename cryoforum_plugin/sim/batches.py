"""Unlimited synthetic particles from a map that look like the real ones (issue 14): projections at random
orientations with CTFs and shifts drawn from the training particles, signal scaled to a requested SNR, and
coloured noise of the data's spectrum (noise.NoiseModel). Everything is batched on the device and reproducible
from a torch.Generator.
"""

from __future__ import annotations

import numpy as np
import torch

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics.ctf import ctf_images, ctf_table
from cryoforum_plugin.physics.fourier import as_tensor
from cryoforum_plugin.physics.resample import resample
from cryoforum_plugin.physics.noise import NoiseModel, coloured_noise
from cryoforum_plugin.formats.columns import CTF_FIELDS
from cryoforum_plugin.physics.projector import Projector


def snr_at(progress: float, start_snr: float, end_snr: float) -> float:
    """SNR anneal schedule: geometric interpolation from ``start_snr`` (progress 0) to ``end_snr`` (progress 1);
    progress is clipped to [0, 1]."""
    t = min(max(float(progress), 0.0), 1.0)
    return float(start_snr) * (float(end_snr) / float(start_snr)) ** t


def _on_host(device: torch.device) -> bool:
    """Whether a generator on ``device`` draws the simulator's parameters as NumPy arrays (the CPU) rather than
    as tensors kept on the device (a GPU)."""
    return device.type == "cpu"


class MapParticleSimulator:
    """Synthetic particles of a (D, D, D) map (z, y, x) at ``pixel_size`` Å.

    ``box``: Fourier-crop/pad the map to this size first (pixel size scales by D/box); default D.
    ``ctf_pool``: dict of CTF_FIELDS -> (M,) arrays (e.g. ``ps.ctf`` of the training particles); each image takes
    the parameters of one random row. None: no CTF.
    ``shift_pool_A``: (M, 2) origins in Å (RELION sign, e.g. ``ps.shift_A``); each image takes one random row.
    None: centred.
    ``noise``: the data's NoiseModel (resampled to this box and pixel size if it describes another grid); None:
    white noise of unit variance.
    ``orientations``: "uniform" (uniform over SO(3)) or an (M, 4) pool of quaternions (w, x, y, z) of RELION's A.
    ``snr``: float, (lo, hi) for a log-uniform SNR per image, or None for the NoiseModel's SNR.
    ``per_image_snr``: True: each image's clean signal is scaled so that its own variance / noise variance is its
    SNR. False: one amplitude for the whole map (calibrated once on a pilot batch), so the mean over images has the
    SNR and the view-to-view variation of signal power is kept (simulation.py's set-level definition).
    Noise keeps the NoiseModel's level (the data's units); the signal is scaled to it.
    """

    def __init__(self, map, pixel_size: float, *, ctf_pool: dict | None = None, shift_pool_A=None,
                 noise: NoiseModel | None = None, orientations="uniform", snr=None, device=None,
                 box: int | None = None, per_image_snr: bool = True, pilot: int = 256):
        self.device = torch.device(device) if device is not None else (
            map.device if isinstance(map, torch.Tensor) else torch.device("cpu"))
        vol = as_tensor(map, self.device)
        d = vol.shape[-1]
        self.box = int(box) if box is not None else d
        self.pixel_size = float(pixel_size) * d / self.box
        if self.box != d:
            vol = resample(vol, self.box, 3)
        self.projector = Projector(vol, device=self.device)
        if ctf_pool is not None:
            ctf_pool = {k: np.asarray(ctf_pool[k], dtype=np.float64) for k in CTF_FIELDS}
            if len(ctf_pool["defocus_u"]) == 0:
                raise ValueError("empty ctf_pool")
        self.ctf_pool = ctf_pool
        # the pool's CTF parameters on the device, copied once (ctf_images indexes them there)
        self.ctf_table = None if ctf_pool is None else ctf_table(ctf_pool, self.device)
        self._device_pools: dict = {}  # _pools_on's tensors per device
        self.shift_pool_A = None if shift_pool_A is None else np.asarray(shift_pool_A, np.float64).reshape(-1, 2)
        if self.shift_pool_A is not None and len(self.shift_pool_A) == 0:
            raise ValueError("empty shift_pool_A")
        if noise is None:
            k = self.box // 2 + 1
            noise = NoiseModel(np.ones(k), np.zeros(k), float("nan"), self.pixel_size, self.box)
        self.noise = noise.resampled(self.box, self.pixel_size)
        self.noise_var = self.noise.noise_variance
        self._spectrum = as_tensor(np.asarray(self.noise.spectrum, np.float64), self.device)  # copied once
        if isinstance(orientations, str):
            if orientations != "uniform":
                raise ValueError(f"orientations must be 'uniform' or an (M, 4) array, not {orientations!r}")
            self.quat_pool = None
        else:
            self.quat_pool = rotations.normalize(np.asarray(orientations, np.float64).reshape(-1, 4))
        if snr is None:
            snr = self.noise.snr
            if not np.isfinite(snr) or snr <= 0:
                raise ValueError("snr=None needs a NoiseModel with a known SNR")
        if isinstance(snr, (tuple, list)):
            lo, hi = float(snr[0]), float(snr[1])
            if not 0 < lo <= hi:
                raise ValueError(f"an SNR range needs 0 < lo <= hi, got {snr}")
            self.snr_range = (lo, hi)
        else:
            self.snr_range = (float(snr), float(snr))
        self.per_image_snr = per_image_snr
        self._mean_signal_var = None
        if not per_image_snr:  # one amplitude for the map: calibrate the mean clean variance on a fixed pilot
            g = torch.Generator().manual_seed(12345)
            _, _, p = self._draw(pilot, g)
            self._mean_signal_var = float(self._clean(p).var(dim=(-2, -1)).mean())

    @classmethod
    def from_particles(cls, ps, map, pixel_size: float, noise: NoiseModel | None = None, **kwargs):
        """A simulator whose CTF and shift pools are those of the particles with poses in ``ps`` (a ParticleSet);
        ``orientations="data"`` uses their poses as the orientation pool."""
        rows = np.nonzero(np.asarray(ps.has_poses))[0] if len(ps) else np.arange(0)
        if kwargs.get("orientations") == "data":
            kwargs["orientations"] = ps.quat[rows]
        ctf = None if ps.ctf is None else {k: np.asarray(v)[rows] for k, v in ps.ctf.items()}
        return cls(map, pixel_size, ctf_pool=ctf, shift_pool_A=ps.shift_A[rows], noise=noise, **kwargs)

    # ---------------------------------------------------------------- internals

    def _pools_on(self, device: torch.device) -> dict:
        """The orientation and shift pools as float64 tensors on ``device`` (copied once per device)."""
        if device not in self._device_pools:
            self._device_pools[device] = {
                "quat": None if self.quat_pool is None else torch.as_tensor(self.quat_pool, device=device),
                "shift": None if self.shift_pool_A is None else torch.as_tensor(self.shift_pool_A, device=device)}
        return self._device_pools[device]

    def _draw(self, n: int, generator: torch.Generator | None):
        """Random parameters for n images, all drawn from ``generator`` in a fixed order: (quat (n, 4) float64,
        snr (n,), {"quat", "ctf_rows" (n,) pool rows or None, "shift_A" (n, 2) Å}). A CPU generator (or None)
        gives NumPy arrays; a GPU generator gives tensors on its device, the same draws, never copied to the host
        (no wait for the GPU)."""
        gd = generator.device if generator is not None else torch.device("cpu")
        host = _on_host(gd)
        pools = {"quat": self.quat_pool, "shift": self.shift_pool_A} if host else self._pools_on(gd)

        def drawn(t):
            return t.cpu().numpy() if host else t

        def rows(m):
            return drawn(torch.randint(0, m, (n,), generator=generator, device=gd))

        if self.quat_pool is None:
            q = rotations.normalize(drawn(torch.randn((n, 4), generator=generator, device=gd, dtype=torch.float64)))
        else:
            q = pools["quat"][rows(len(self.quat_pool))]
        ctf_rows = rows(len(self.ctf_pool["defocus_u"])) if self.ctf_pool is not None else None
        if self.shift_pool_A is not None:
            shift = pools["shift"][rows(len(self.shift_pool_A))]
        else:
            shift = np.zeros((n, 2)) if host else torch.zeros((n, 2), dtype=torch.float64, device=gd)
        lo, hi = (float(np.log(v)) for v in self.snr_range)
        u = drawn(torch.rand((n,), generator=generator, device=gd, dtype=torch.float64))
        log_snr = lo + u * (hi - lo)  # a tensor stays on its device
        snr = np.exp(log_snr) if host else torch.exp(log_snr)
        return q, snr, {"quat": q, "ctf_rows": ctf_rows, "shift_A": shift}

    def _clean(self, p: dict) -> torch.Tensor:
        c = None if p["ctf_rows"] is None else ctf_images(self.ctf_table, p["ctf_rows"], self.box, self.pixel_size)
        return self.projector.project(p["quat"], as_tensor(p["shift_A"] / self.pixel_size, self.device), c)

    # ---------------------------------------------------------------- public

    def clean(self, quats, shifts_A=None, ctf_rows=None) -> torch.Tensor:
        """Noise-free CTF-modulated images (map units) at given poses, origins (Å) and CTF pool rows."""
        n = len(quats)
        return self._clean({"quat": np.asarray(quats, np.float64),
                            "shift_A": np.zeros((n, 2)) if shifts_A is None else np.asarray(shifts_A, np.float64),
                            "ctf_rows": ctf_rows})

    def batch(self, n: int, generator: torch.Generator | None = None, snr_scale: float = 1.0,
              return_params: bool = False):
        """(images (n, box, box) float32 on the device, quats (n, 4) float32 on the device (w, x, y, z) of A).

        ``snr_scale`` multiplies every image's SNR (for an anneal: ``snr_at(progress, a, b) / base``).
        ``return_params``: also return a dict with ``ctf_rows`` (into the pool, or None), ``shift_A`` (n, 2),
        ``snr`` (n,) and ``quat`` (n, 4) float64: NumPy arrays with a CPU generator, tensors on the generator's
        device with a GPU one (``_draw``).
        """
        q, snr, p = self._draw(n, generator)
        snr = snr * float(snr_scale)
        img = self._clean(p)
        target = torch.as_tensor(snr * self.noise_var, dtype=torch.float32, device=self.device)
        if self.per_image_snr:
            var = img.var(dim=(-2, -1)).clamp(min=1e-30)
        else:
            var = torch.full((n,), self._mean_signal_var, device=self.device)
        img = img * torch.sqrt(target / var)[:, None, None]
        img = img + coloured_noise(n, self.box, self._spectrum, generator, self.device)
        quats = torch.as_tensor(q, dtype=torch.float32, device=self.device)
        if return_params:
            return img, quats, {**p, "snr": snr}
        return img, quats
