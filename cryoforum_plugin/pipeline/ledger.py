"""The state of a particle stream in its output directory (``OUT/watch_state/``): which particles were processed,
the per-batch results every output is rebuilt from, the running map's sums and the lock that keeps one writer.

    OUT/watch_state/lock                  the pid of the process writing OUT (held with flock while it runs)
    OUT/watch_state/ledger.json           the committed batches, in order (written atomically, LAST)
    OUT/watch_state/batches/NNNNNN/       one batch: keys.npy (uint64 particle keys), scores.npy (the selection
                                          statistic), predicted/refined/confident/rejected.star (+ .cs), batch.json
    OUT/watch_state/running_map.pt        the running map's sums and the batches they hold

A batch is written in full to ``NNNNNN.part/`` and renamed into place, then every output of OUT is rebuilt from the
committed batches plus this one, and only then is the batch appended to ledger.json. A kill at any moment leaves
either a committed batch whose outputs are written, or an uncommitted one that the next start deletes (its
particles are processed again, and OUT's outputs are rebuilt without it first): no particle is lost or written
twice, and every output file is whole (each is replaced atomically).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.atomic import write_text
from cryoforum_plugin.formats.stream_files import StarLayout, merge_cs, merge_star, write_batch_cs, write_batch_star

OUTPUTS = ("predicted", "refined", "confident", "rejected")
"""The particle outputs of a stream, each the union of its batches' files of the same name."""


class StreamLock:
    """One writer per output directory: an exclusive flock on ``path`` (released by the kernel when its process
    dies, even by kill -9, so a stale lock of a dead process is simply taken over), with the holder's pid and host
    written in it for the error a second writer gets."""

    def __init__(self, path: Path):
        self.path, self.fd = Path(path), None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = os.read(fd, 200).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            busy = False
        except BlockingIOError:
            busy = True
        except OSError:  # a file system without flock (some NFS mounts): the pid written in the file decides
            busy = _alive(holder)
        if busy:
            os.close(fd)
            raise CryoforumError("another cryo-forum watcher is writing this output directory "
                                 f"({holder or 'unknown'}).", path=self.path.parent.parent,
                                 fix="stop that one first, or give this one its own --out (if that process is gone, "
                                     f"remove {self.path}).")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock; the file stays (the next writer reuses it)
            self.fd = None


def _alive(holder: str) -> bool:
    """Whether the lock text 'pid N on HOST' names a running process (one on another host is taken as running)."""
    words = holder.split()
    if len(words) != 4 or not words[1].isdigit():
        return False
    if words[3] != socket.gethostname():
        return True
    try:
        os.kill(int(words[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Ledger:
    """The committed batches of one output directory and the keys they hold. ``load`` reads them (deleting what
    a kill left uncommitted); ``write_batch`` + ``rebuild_outputs`` + ``commit`` add one (in that order)."""

    def __init__(self, out_dir):
        self.out = Path(out_dir)
        self.root = self.out / "watch_state"
        self.batch_root = self.root / "batches"
        self.formats: tuple[str, ...] | None = None  # set by the first batch: ("star",), or ("star", "cs")
        self.totals: dict[str, int] = {}  # counts summed over the committed batches (e.g. confident, rejected)
        self.batches: list[int] = []
        self.keys = np.zeros(0, np.uint64)  # sorted keys of every committed particle
        self.scores = np.zeros(0)  # the selection statistic of every committed particle (batch order)
        self.layouts: dict[str, StarLayout] = {}
        self.lock = StreamLock(self.root / "lock")

    # ------------------------------------------------------------------------------------------ reading

    def batch_dir(self, batch: int) -> Path:
        return self.batch_root / f"{batch:06d}"

    def load(self) -> None:
        """Read ledger.json and the committed batches' keys and scores; delete batch directories it does not
        list (a kill before their commit)."""
        path = self.root / "ledger.json"
        ledger = json.loads(path.read_text()) if path.exists() else {"batches": [], "formats": None}
        self.batches, self.formats = ledger["batches"], ledger["formats"] and tuple(ledger["formats"])
        self.totals = ledger.get("totals", {})
        committed = {self.batch_dir(b).name for b in self.batches}
        if self.batch_root.exists():
            for d in self.batch_root.iterdir():
                if d.name not in committed:
                    shutil.rmtree(d, ignore_errors=True)
        lost = [b for b in self.batches if not (self.batch_dir(b) / "keys.npy").exists()]
        if lost:
            raise CryoforumError(f"batch {lost[0]} of the ledger is missing from {self.batch_root}.",
                                 path=self.root / "ledger.json",
                                 fix="restore it, or start again: a new --out (or this one without watch_state/ "
                                     "and its outputs) processes every particle again.")
        keys = [np.load(self.batch_dir(b) / "keys.npy") for b in self.batches]
        self.keys = np.sort(np.concatenate(keys)) if keys else np.zeros(0, np.uint64)
        scores = [np.load(self.batch_dir(b) / "scores.npy") for b in self.batches]
        self.scores = np.concatenate(scores) if scores else np.zeros(0)
        if self.batches:
            last = self.batch_dir(self.batches[-1])
            self.layouts = {name: StarLayout.of_file(last / f"{name}.star") for name in OUTPUTS
                            if (last / f"{name}.star").exists()}

    def done(self, keys: np.ndarray) -> np.ndarray:
        """(N,) bool: which of ``keys`` are in a committed batch (a binary search in the sorted keys: O(N log K))."""
        keys = np.asarray(keys, np.uint64)
        if not len(self.keys):
            return np.zeros(len(keys), bool)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return self.keys[pos] == keys

    @property
    def particles(self) -> int:
        return len(self.keys)

    def next_batch(self) -> int:
        return (self.batches[-1] + 1) if self.batches else 1

    # ------------------------------------------------------------------------------------------ writing

    def write_batch(self, batch: int, sets: dict, keys: np.ndarray, scores: np.ndarray, info: dict,
                    source=None, project_dir=None) -> list[str]:
        """Write batch ``batch`` (``sets``: output name -> ParticleSet, ``OUTPUTS`` that exist) into
        ``NNNNNN.part/`` and rename it into place; returns the particle columns dropped to keep the stream's
        layout (see ``stream_files.conform``). The first batch sets the stream's formats: STAR, and .cs too when it
        came from a .cs (``source``)."""
        if self.formats is None:
            self.formats = ("star", "cs") if Path(source or "").suffix.lower() == ".cs" else ("star",)
        final, part = self.batch_dir(batch), self.batch_root / f"{batch:06d}.part"
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        dropped = set()
        layouts = dict(self.layouts)
        for name, ps in sets.items():
            if "star" in self.formats:
                layouts[name], lost = write_batch_star(ps, part / f"{name}.star", self.out.resolve(),
                                                       layouts.get(name, StarLayout()), source)
                dropped.update(lost)
            if "cs" in self.formats:
                write_batch_cs(ps, part / f"{name}.cs", self.out, project_dir)
        np.save(part / "keys.npy", np.asarray(keys, np.uint64))
        np.save(part / "scores.npy", np.asarray(scores, np.float64))
        write_text(part / "batch.json", json.dumps(info, indent=2, default=str))
        os.replace(part, final)
        self.layouts = layouts
        return sorted(dropped)

    def rebuild_outputs(self, extra: list[int] = ()) -> dict[str, int]:
        """Rewrite every output of OUT (OUTPUTS × formats) from the committed batches and ``extra`` (the batch
        about to be committed), removing those no batch has; returns {file name: rows}."""
        batches = [*self.batches, *extra]
        rows = {}
        for name in OUTPUTS:
            for fmt, merge in (("star", merge_star), ("cs", merge_cs)):
                parts = [self.batch_dir(b) / f"{name}.{fmt}" for b in batches]
                parts = [p for p in parts if p.exists()]
                target = self.out / f"{name}.{fmt}"
                if fmt in (self.formats or ()) and parts:
                    rows[target.name] = merge(parts, target)
                else:  # no batch has it (a kill before the first commit may have left one)
                    target.unlink(missing_ok=True)
        return rows

    def commit(self, batch: int, keys: np.ndarray, scores: np.ndarray, counts: dict[str, int]) -> None:
        """Append ``batch`` to ledger.json (atomically): from now on its particles are processed. ``counts`` are
        added to ``totals``."""
        self.batches.append(batch)
        self.totals = {k: self.totals.get(k, 0) + int(counts.get(k, 0)) for k in {*self.totals, *counts}}
        write_text(self.root / "ledger.json", json.dumps({"batches": self.batches, "formats": self.formats,
                                                          "totals": self.totals}))
        new = np.sort(np.asarray(keys, np.uint64))
        self.keys = np.insert(self.keys, np.searchsorted(self.keys, new), new)  # stays sorted, O(K) copy
        self.scores = np.concatenate([self.scores, np.asarray(scores, np.float64)])

    @contextlib.contextmanager
    def locked(self):
        """Hold the output directory's lock for the block (``StreamLock``)."""
        self.lock.acquire()
        try:
            yield self
        finally:
            self.lock.release()
