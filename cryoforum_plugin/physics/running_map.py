"""A reconstruction that grows with its particles: two half-set back-projectors that take particles batch by batch
(``cryoforum watch``: the map of the confident particles, updated while the microscope runs) and whose sums can be
saved and restored, so a restarted stream adds only the particles the saved sums do not hold."""

from __future__ import annotations

import numpy as np
import torch

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.mrc import StackReader
from cryoforum_plugin.formats.particles import ParticleSet, half_sets
from cryoforum_plugin.physics import symmetry
from cryoforum_plugin.physics.ctf import ctf_images
from cryoforum_plugin.physics.fsc import fsc_curve, resolution
from cryoforum_plugin.physics.projector import Backprojector


class RunningMap:
    """Half-set sums of a direct Fourier reconstruction (``projector.Backprojector``, one per half-set of
    ``particles.half_sets``) on one grid: ``box`` px at ``pixel_size`` Å, point group ``sym``. ``particles``: how many
    were inserted. Memory: two (2·box)³ complex64 + float32 grids (50 MB at 64 px, 3.2 GB at 256 px)."""

    def __init__(self, box: int, pixel_size: float, sym: str = "C1", device=None):
        self.box, self.pixel_size, self.sym = int(box), float(pixel_size), sym
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.halves = {h: Backprojector(self.box, device=self.device) for h in (1, 2)}
        self.group = symmetry.group_quats(sym) if symmetry.order(sym) > 1 else None
        self.particles = 0

    def insert(self, ps: ParticleSet, batch: int = 256, weights=None, bar=None) -> None:
        """Add every particle of ``ps`` (poses required; its pixel size and box must be the map's) to the sums of
        its half-set, CTF-weighted (``projector.Backprojector.insert``). ``weights``: optional (N,) per-particle
        weights (0 leaves a particle out); ``bar``: a ``progress.Progress`` advanced by each batch."""
        if len(ps) == 0:
            return
        if not ps.has_poses.all():
            r = int(np.argmax(~ps.has_poses))
            raise CryoforumError("a particle has no pose; the running map needs poses.", path=ps.path, row=r,
                                 fix="insert refined or predicted particles.")
        apix, box = self.check(ps)
        half = half_sets(ps)
        w_all = None if weights is None else np.asarray(weights, dtype=np.float64)
        with StackReader() as reader:
            for lo in range(0, len(ps), batch):
                rows = np.arange(lo, min(len(ps), lo + batch))
                if w_all is not None:
                    rows = rows[w_all[rows] > 0]
                if len(rows):
                    images = ps.read_images(reader, rows)
                    ctf = None if ps.ctf is None else ctf_images(ps.ctf, rows, box, ps.pixel_size[rows], self.device)
                    for h, accumulator in self.halves.items():
                        sel = half[rows] == h
                        if sel.any():
                            accumulator.insert(images[sel], ps.quat[rows[sel]], ps.shift_A[rows[sel]] / apix,
                                               None if ctf is None else ctf[torch.as_tensor(sel, device=self.device)],
                                               weights=None if w_all is None else w_all[rows[sel]], group=self.group)
                if bar is not None:
                    bar.update(min(batch, len(ps) - lo))
        self.particles += len(ps) if w_all is None else int((w_all > 0).sum())

    def check(self, ps: ParticleSet) -> tuple[float, int]:
        """(pixel size Å, box px) of ``ps``; one error naming the file when they are not the map's."""
        apix, box = ps.require_one_sampling("the running map")
        if box != self.box or abs(apix - self.pixel_size) > 1e-3 * self.pixel_size:
            raise CryoforumError(f"these particles are {box} px at {apix:g} Å/px but the running map is {self.box} px "
                                 f"at {self.pixel_size:g} Å/px.", path=ps.path,
                                 fix="stream particles of one box and pixel size into one output directory.")
        return apix, box

    def maps(self, regularization: float = 1e-3) -> dict:
        """{'half1', 'half2', 'full'} (D, D, D) float32 maps, 'fsc' (D//2,) the half-maps' FSC and
        'resolution_A' where it falls below 0.143."""
        out = {f"half{h}": acc.reconstruct(regularization).cpu().numpy() for h, acc in self.halves.items()}
        full = Backprojector(self.box, device=self.device)
        for acc in self.halves.values():
            full.merge(acc)
        out["full"] = full.reconstruct(regularization).cpu().numpy()
        out["fsc"] = fsc_curve(out["half1"], out["half2"])
        out["resolution_A"] = resolution(out["fsc"], self.box, self.pixel_size, 0.143)
        return out

    def state_dict(self) -> dict:
        """The sums and their grid, for ``torch.save`` (``from_state`` restores them)."""
        return {"box": self.box, "pixel_size": self.pixel_size, "sym": self.sym, "particles": self.particles,
                "sums": {h: (acc.num.cpu(), acc.den.cpu()) for h, acc in self.halves.items()}}

    @classmethod
    def from_state(cls, state: dict, device=None) -> "RunningMap":
        running = cls(state["box"], state["pixel_size"], state["sym"], device)
        for h, (num, den) in state["sums"].items():
            running.halves[h].num.copy_(num)
            running.halves[h].den.copy_(den)
        running.particles = int(state["particles"])
        return running
