"""Direct Fourier reconstruction of a particle set from its poses, shifts and CTFs (batched, bounded memory)."""

from __future__ import annotations

import numpy as np

from cryoforum_plugin.physics.running_map import RunningMap
from cryoforum_plugin.runtime import resolve_device
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.progress import Progress


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
    running = RunningMap(box, apix, sym, device)
    bar = Progress(len(ps), "reconstruct", enabled=progress, events=events)
    running.insert(ps, batch, weights=np.ones(len(ps)) if weights is None else weights, bar=bar)
    bar.close()
    first, second = running.halves[1], running.halves[2]
    maps = {}
    if halves:
        maps["half1"] = first.reconstruct(regularization).cpu().numpy()
        maps["half2"] = second.reconstruct(regularization).cpu().numpy()
    first.merge(second)
    maps["full"] = first.reconstruct(regularization).cpu().numpy()
    return maps
