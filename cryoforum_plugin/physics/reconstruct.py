"""Direct Fourier reconstruction of a particle set from its poses, shifts and CTFs (batched, bounded memory)."""

from __future__ import annotations

import numpy as np
import torch

from cryoforum_plugin.physics import symmetry
from cryoforum_plugin.physics.ctf import ctf_images
from cryoforum_plugin.runtime import resolve_device
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.mrc import StackReader
from cryoforum_plugin.formats.particles import ParticleSet, half_sets
from cryoforum_plugin.progress import Progress
from cryoforum_plugin.physics.projector import Backprojector


def reconstruct(ps: ParticleSet, sym: str = "C1", weights=None, halves: bool = False, batch: int = 256,
                device=None, regularization: float = 1e-3, progress: bool = True,
                events=None):
    """Reconstruct (D, D, D) map(s) from ``ps``. Returns ``{'full': map}`` plus ``'half1'``/``'half2'`` with
    ``halves`` (split by ``particles.half_sets``: the set's own half-sets, and for particles without one the
    uid-keyed assignment the refinement uses too, so that a particle is always in the same half).
    ``weights``: optional (N,) per-particle weights (0 drops a particle)."""
    if not ps.has_poses.all():
        r = int(np.argmax(~ps.has_poses))
        raise CryoforumError("a particle has no pose; reconstruction needs poses for all.", path=ps.path, row=r,
                             fix="predict poses first (cryoforum predict) or select the particles with poses.")
    device = resolve_device(device)
    apix, box = ps.require_one_sampling("reconstruction")
    group = symmetry.group_quats(sym) if symmetry.order(sym) > 1 else None
    w_all = np.ones(len(ps)) if weights is None else np.asarray(weights, dtype=np.float64)
    half = half_sets(ps)
    accumulators = {1: Backprojector(box, device=device), 2: Backprojector(box, device=device)}
    bar = Progress(len(ps), "reconstruct", enabled=progress, events=events)
    with StackReader() as reader:
        for lo in range(0, len(ps), batch):
            rows = np.arange(lo, min(len(ps), lo + batch))
            rows = rows[w_all[rows] > 0]
            if len(rows):
                images = ps.read_images(reader, rows)
                c = None if ps.ctf is None else ctf_images(ps.ctf, rows, box, ps.pixel_size[rows], device)
                for h in (1, 2):
                    sel = half[rows] == h
                    if sel.any():
                        accumulators[h].insert(images[sel], ps.quat[rows[sel]], ps.shift_A[rows[sel]] / apix,
                                               None if c is None else c[torch.as_tensor(sel, device=device)],
                                               weights=w_all[rows[sel]], group=group)
            bar.update(min(batch, len(ps) - lo))
    bar.close()
    maps = {}
    if halves:
        maps["half1"] = accumulators[1].reconstruct(regularization).cpu().numpy()
        maps["half2"] = accumulators[2].reconstruct(regularization).cpu().numpy()
    accumulators[1].merge(accumulators[2])
    maps["full"] = accumulators[1].reconstruct(regularization).cpu().numpy()
    return maps
