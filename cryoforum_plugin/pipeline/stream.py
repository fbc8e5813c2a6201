"""Where a stream's particles come from: a directory in which new .star / .cs files appear (each a batch), or one
STAR file that grows (RELION's on-the-fly Extract rewrites it with more rows). ``ParticleFiles.next_batch``
hands out the particles not yet processed, at most ``batch_size`` at a time, from complete files only.

A file is complete when it has not changed for ``settle`` seconds (its modification time is that old and its size
and time are what the previous look saw), so a file renamed into the directory is taken at once and one being
written is left alone until its writer is quiet; a STAR must also end with a newline. Hidden files (``.name``) and
other suffixes (``.part``, ``.tmp``) are ignored: writing to a temporary name and renaming is the safe way to hand
over a batch. A particle is known by its key (``particle_keys``), so a file re-read after it grew, or after a
restart, yields only its new particles.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from pathlib import Path

import numpy as np

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.files import read_particles
from cryoforum_plugin.formats.particles import ParticleSet

SUFFIXES = (".star", ".cs")


def particle_keys(ps: ParticleSet) -> np.ndarray:
    """(N,) uint64 key of each particle: its uid, i.e. cryoSPARC's uid for a .cs, and for a STAR the uid column
    cryo-forum writes (rlnCryoforumUid) or else a hash of the image name as written (rlnImageName): the same
    particle has the same key in every file and every output of the stream."""
    return np.asarray(ps.uid, np.uint64)


@dataclasses.dataclass
class Batch:
    """Particles to process together: ``ps`` (one file's), their ``keys``, the ``path`` they came from and when
    that file last changed (``mtime``, seconds since the epoch: when the particles appeared)."""

    ps: ParticleSet
    keys: np.ndarray
    path: Path
    mtime: float


class ParticleFiles:
    """The particle files of ``path``: a directory's .star / .cs files (not its subdirectories), or the one file
    ``path`` (which may appear later). ``next_batch(done)`` returns the next Batch of particles whose keys ``done``
    does not accept, or None when no complete file has any; ``waiting`` names the files that are still being
    written and ``problems`` the files that could not be used ({path: message}, retried when the file changes)."""

    def __init__(self, path, *, batch_size: int = 1000, settle: float = 3.0, project_dir=None, events=None):
        self.path, self.batch_size, self.settle = Path(path), int(batch_size), float(settle)
        self.project_dir, self.events = project_dir, events
        self.single = self.path.suffix.lower() in SUFFIXES and not self.path.is_dir()  # one file (may appear later)
        if not self.single and not self.path.is_dir():
            raise CryoforumError("the input to watch is neither a directory nor a .star / .cs file.", path=self.path,
                                 fix="give a directory that particle files will appear in, or a particle STAR file "
                                     "(it may not exist yet).")
        self._seen: dict[Path, tuple] = {}  # file -> (size, mtime_ns) at the previous look
        self._read: dict[Path, tuple] = {}  # file -> (size, mtime_ns) when its particles were last taken
        self._queue: Batch | None = None  # the new particles of the file being processed
        self._taken = 0  # how many of them were handed out
        self.waiting: list[Path] = []
        self.problems: dict[str, str] = {}

    def _candidates(self) -> list[Path]:
        """The files to look at, oldest first."""
        if self.single:
            return [self.path]
        files = []
        for p in self.path.iterdir():
            if p.suffix.lower() in SUFFIXES and not p.name.startswith("."):
                try:
                    info = p.stat()
                except FileNotFoundError:  # renamed or removed since the listing
                    continue
                if stat.S_ISREG(info.st_mode):
                    files.append((info.st_mtime_ns, p.name, p))
        return [p for *_, p in sorted(files)]

    def _complete(self, path: Path, info, now: float) -> bool:
        """Whether ``path`` has settled (see the module docstring); with ``settle`` 0 every file is (a finished
        input, as a RELION job's)."""
        if self.settle <= 0:
            return True
        state = (info.st_size, info.st_mtime_ns)
        previous, self._seen[path] = self._seen.get(path), state
        if now - info.st_mtime < self.settle or (previous is not None and previous != state):
            return False
        if path.suffix.lower() == ".star" and info.st_size:
            with open(path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                return fh.read(1) == b"\n"
        return info.st_size > 0

    def _next_file(self, done) -> Batch | None:
        """The new particles of the first complete file that has any."""
        now = time.time()
        self.waiting = []
        for path in self._candidates():
            try:
                info = path.stat()
            except FileNotFoundError:  # renamed or removed since the listing
                continue
            state = (info.st_size, info.st_mtime_ns)
            if self._read.get(path) == state:
                continue
            if not self._complete(path, info, now):
                self.waiting.append(path)
                continue
            self._read[path] = state
            try:
                ps = read_particles(path, project_dir=self.project_dir)
            except CryoforumError as exc:
                self._problem(path, exc)
                continue
            self.problems.pop(str(path), None)
            keys = particle_keys(ps)
            new = np.zeros(len(keys), bool)
            new[np.unique(keys, return_index=True)[1]] = True  # a particle listed twice in the file counts once
            new &= ~done(keys)
            if new.any():
                return Batch(ps.subset(new), keys[new], path, info.st_mtime)
        return None

    def _problem(self, path: Path, exc: Exception) -> None:
        """Report a file that cannot be used (once per version of the file) and go on."""
        if self.problems.get(str(path)) != str(exc) and self.events is not None:
            self.events.message(f"[watch] WARNING: skipping {path} until it changes: {exc}")
        self.problems[str(path)] = str(exc)

    def skip(self, batch: Batch, exc: Exception) -> None:
        """Drop the rest of ``batch``'s file after an error on its particles (retried when the file changes)."""
        self._queue = None
        self._problem(batch.path, exc)

    def next_batch(self, done) -> Batch | None:
        """At most ``batch_size`` particles not yet processed (``done(keys)`` -> bool mask of the processed ones):
        the next rows of the file being processed, else of the next complete file with new particles."""
        if self._queue is None or self._taken >= len(self._queue.keys):
            self._queue, self._taken = self._next_file(done), 0
            if self._queue is None:
                return None
        q, rows = self._queue, np.arange(self._taken, min(self._taken + self.batch_size, len(self._queue.keys)))
        self._taken += len(rows)
        return Batch(q.ps.subset(rows), q.keys[rows], q.path, q.mtime)
