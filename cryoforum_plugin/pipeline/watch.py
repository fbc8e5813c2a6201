"""Poses and clean-up for particles as they arrive (``cryoforum watch``, the RELION External job re-run on a growing
STAR): every particle of a stream (``stream.ParticleFiles``) is processed exactly once with an existing model,
batch by batch, through the job's steps (``steps.predict``, ``steps.refine`` against the reference with the
network's confidence deciding who gets a global search, a selection), and the outputs of the output directory
always hold every particle so far (``ledger.Ledger``: per-batch results, outputs rebuilt from them, the ledger
written last; a restart after a kill goes on where it stopped).

Outputs: predicted, refined, confident, rejected (.star, and .cs for a .cs stream), confident_map.mrc with its
half-maps and confident_fsc.csv (the running map of the confident particles, every ``map_every`` particles and
at the end of a run), status.json (``Watcher.status``).

Selection: with ``--threshold`` every particle is judged by the same threshold; with ``--drop`` (the default) a
new particle is rejected when its statistic is in the ``drop`` most uncertain fraction of every particle so far
(this batch included), so the threshold firms up as the stream grows and earlier decisions are never revised.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.atomic import atomic_path, write_text
from cryoforum_plugin.formats.files import read_particles
from cryoforum_plugin.formats.mrc import write_mrc
from cryoforum_plugin.infer.select import keep_by_quantile, read_uncertainty, resolve_statistic, uncertainty_score
from cryoforum_plugin.physics.fsc import fsc_table
from cryoforum_plugin.physics.running_map import RunningMap
from cryoforum_plugin.pipeline import steps
from cryoforum_plugin.pipeline.ledger import Ledger
from cryoforum_plugin.pipeline.stream import Batch, ParticleFiles
from cryoforum_plugin.progress import Events
from cryoforum_plugin.runtime import resolve_device, set_threads

MAP_NAME = "confident_map.mrc"


@dataclasses.dataclass
class WatchSettings:
    """How a stream is run: ``batch_size`` particles at most per batch, ``settle`` s a file must be quiet,
    ``poll`` s between looks, ``until_idle`` s without anything new before the run ends (None: until stopped),
    ``map_every`` particles between updates of the running map (0: at the end of a run only), ``reconstruct``
    (False: no map)."""

    batch_size: int = 1000
    settle: float = 3.0
    poll: float = 2.0
    until_idle: float | None = None
    map_every: int = 5000
    reconstruct: bool = True


class StepEvents(Events):
    """The events the steps of the batches report to: their progress bars only on a terminal (a log gets one line
    per batch instead), their messages (each once while it stays the same) and the abort poll passed on."""

    def __init__(self, parent: Events):
        super().__init__(parent.stream)
        self.parent, self.said = parent, None

    @property
    def interactive(self) -> bool:
        return self.parent.interactive

    def progress(self, text: str, final: bool = False) -> None:
        if self.parent.interactive:
            self.parent.progress(text, final)

    def message(self, text: str) -> None:
        if text != self.said:  # a step saying the same for every batch (e.g. the domain check) says it once
            self.parent.message(text)
        self.said = text

    def check_abort(self) -> None:
        self.parent.check_abort()


class Watcher:
    """One stream into one output directory. ``run(stop)`` processes batches until ``stop()`` is true (checked
    between batches), or the stream has been idle for ``settings.until_idle`` seconds; returns the status."""

    def __init__(self, source: ParticleFiles, out_dir, model_dir, reference: steps.Reference | None, opts,
                 settings: WatchSettings, events: Events | None = None, project_dir=None, input_name=None):
        self.source, self.out, self.model_dir = source, Path(out_dir), Path(model_dir)
        # a one-map reference is FSC-weighted by the model's training half-maps (as in the job that trained it)
        self.reference = None if reference is None else reference.with_model_half_maps(model_dir)
        self.opts, self.settings = opts, settings
        self.events = events or Events()
        self.step_events = StepEvents(self.events)
        self.project_dir, self.input_name = project_dir, str(input_name or source.path)
        self.ledger = Ledger(self.out)
        self.map: RunningMap | None = None
        self.map_batches: list[int] = []  # the committed batches the running map holds
        self.map_written = 0  # particles in the map when it was last written
        self.since_map = 0  # particles processed since the map was last written
        self.resolution: float | None = None
        self.session = {"particles": 0, "seconds": 0.0}
        self.last: dict = {}

    # ------------------------------------------------------------------------------------------ the loop

    def run(self, stop=None) -> dict:
        stop = stop or (lambda: False)
        self.out.mkdir(parents=True, exist_ok=True)
        with self.ledger.locked():
            self._resume()
            idle_since, announced = time.monotonic(), False
            while not stop():
                batch = self.source.next_batch(self.ledger.done)
                if batch is not None:
                    self._process(batch)
                    idle_since, announced = time.monotonic(), False
                    continue
                if self.source.waiting:
                    idle_since = time.monotonic()  # a file is still being written: something is coming
                until = self.settings.until_idle
                if until is not None and time.monotonic() - idle_since >= until:
                    break
                if not announced:
                    self.events.message(f"[watch] waiting for particles in {self.source.path} "
                                        f"({self.ledger.particles:,} done)")
                    self._write_status()
                    announced = True
                end = time.monotonic() + self.settings.poll
                while time.monotonic() < end and not stop():
                    time.sleep(min(0.2, self.settings.poll))
            self._finish()
        return self.status()

    def _resume(self) -> None:
        """Read the ledger, rebuild the outputs from the committed batches (a kill may have left newer ones) and
        bring the running map up to them."""
        set_threads(self.opts.threads)
        self.ledger.load()
        self.ledger.rebuild_outputs()
        if not self.ledger.batches:
            return
        self.events.message(f"[watch] resuming {self.out}: {self.ledger.particles:,} particles in "
                            f"{len(self.ledger.batches)} batches already processed")
        if self.settings.reconstruct:
            self._restore_map()

    def _process(self, batch: Batch) -> None:
        """One batch: predict, refine, select, write it, rebuild the outputs, commit; update the map when due. A
        CryoforumError before the batch is written (an unreadable stack, a column missing) skips the rest of its
        file until the file changes (``ParticleFiles.skip``)."""
        start = time.time()
        try:
            sets, scores, info = self._compute(batch)
            number = self.ledger.next_batch()
            dropped = self.ledger.write_batch(number, sets, batch.keys, scores, info, source=batch.path,
                                              project_dir=self.project_dir)
        except CryoforumError as exc:
            self.source.skip(batch, exc)
            return
        if dropped:
            self.events.message(f"[watch] {batch.path}: columns {', '.join(dropped)} are not in the earlier "
                                "batches' outputs and were left out")
        self.ledger.rebuild_outputs(extra=[number])
        self.ledger.commit(number, batch.keys, scores, {"confident": len(sets["confident"]),
                                                         "rejected": len(sets["rejected"])})
        seconds = time.time() - start
        info.update(batch=number, seconds=round(seconds, 2),
                    particles_per_second=round(len(batch.keys) / max(seconds, 1e-9), 2),
                    latency_s=round(time.time() - batch.mtime, 2))  # since its file last changed
        self.session["particles"] += len(batch.keys)
        self.session["seconds"] += seconds
        self.last = info
        if self.settings.reconstruct:
            self._add_to_map([number], sets["confident"])
            self.since_map += len(batch.keys)
            if self.settings.map_every and self.since_map >= self.settings.map_every:
                self._write_map()
        self._write_status()
        totals = self.ledger.totals
        self.events.message(
            f"[watch] batch {number}: {len(batch.keys):,} particles of {batch.path.name} -> {info['confident']:,} "
            f"confident, {info['rejected']:,} rejected ({info['global_searched']:,} global searches) in "
            f"{seconds:.1f} s; {self.ledger.particles:,} done ({totals.get('confident', 0):,} confident) at "
            f"{self.session['particles'] / max(self.session['seconds'], 1e-9):.1f} particles/s")

    def _compute(self, batch: Batch) -> tuple[dict, np.ndarray, dict]:
        """(output name -> the batch's particles, the selection statistic (N,), batch.json's content)."""
        set_threads(self.opts.threads)
        ps = batch.ps.with_half_sets()
        if self.reference is not None:
            ps.require_one_sampling("refinement")
        if self.settings.reconstruct:
            ps.require_one_sampling("the running map")
            if self.map is not None:
                self.map.check(ps)
        o = self.opts
        predicted, prediction = steps.predict(ps, self.model_dir, device=o.device, tta=o.tta, workers=o.workers,
                                              events=self.step_events, rewhiten=o.rewhiten)
        self.events.check_abort()
        sets = {"predicted": predicted}
        final, searched = predicted, 0
        if self.reference is not None:
            final, refinement = steps.refine(
                predicted, self.reference, sym=o.sym, global_search=o.global_search, trust=o.trust,
                search_radius=o.search_radius, max_shift=o.max_shift, resolution=o.resolution, device=o.device,
                events=self.step_events)
            sets["refined"], searched = final, int(refinement.global_searched.sum())
        keep, scores, selection = self._select(final)
        sets.update(confident=final.subset(keep), rejected=final.subset(~keep))
        info = {"input": str(batch.path), "particles": len(ps), "confident": int(keep.sum()),
                "rejected": int((~keep).sum()), "global_searched": searched, "selection": selection,
                "network_particles_per_second": round(prediction.particles_per_second, 1),
                "domain_check": getattr(prediction, "domain_check", None),
                "rewhitening": getattr(prediction, "rewhitening", None)}
        return sets, scores, info

    def _select(self, ps) -> tuple[np.ndarray, np.ndarray, dict]:
        """(keep (N,) bool, the statistic (N,), how): a fixed --threshold, or the running --drop quantile. A
        rank-based statistic (mismatch, refine_trace, both) ranks within the batch."""
        o = self.opts
        unc = read_uncertainty(ps)
        statistic = resolve_statistic(unc, o.statistic, o.threshold)
        scores = uncertainty_score(unc, statistic)
        if o.threshold is not None or o.target_error is not None:
            chosen = steps.select(ps, statistic=statistic, drop=o.drop, threshold=o.threshold,
                                  target_error=o.target_error, model_dir=self.model_dir)
            return chosen.keep, scores, chosen.summary
        history = self.ledger.scores
        self._check_same_statistic(statistic)
        keep = keep_by_quantile(np.concatenate([history, scores]), o.drop)[len(history):]
        return keep, scores, {"mode": "running_quantile", "drop": o.drop, "statistic": statistic,
                              "particles_ranked": len(history) + len(scores)}

    def _check_same_statistic(self, statistic: str) -> None:
        """The running quantile ranks every committed particle's score: a stream whose committed batches were
        selected by another statistic (another --statistic, or ``auto`` resolving otherwise: a reference given
        or dropped on a restart) would mix two scales. One clear error instead."""
        if not self.ledger.batches:
            return
        info = self.ledger.batch_dir(self.ledger.batches[-1]) / "batch.json"
        before = json.loads(info.read_text()).get("selection", {}).get("statistic") if info.exists() else None
        if before is not None and before != statistic:
            raise CryoforumError(
                f"this stream's committed batches were selected by the statistic '{before}', this batch would be "
                f"by '{statistic}': their scores cannot be ranked together.", path=self.out,
                fix=f"restart with --statistic {before} (and the same reference), or write to a new output directory.")

    # ------------------------------------------------------------------------------------------ the map

    def _add_to_map(self, batches: list[int], confident) -> None:
        """Insert the confident particles of the committed ``batches`` into the running map (made by the first)."""
        if self.map is None and len(confident):
            apix, box = confident.require_one_sampling("the running map")
            self.map = RunningMap(box, apix, self.opts.sym, resolve_device(self.opts.device))
        if self.map is not None:
            self.map.insert(confident)
        self.map_batches += batches

    def _write_map(self) -> None:
        """confident_map.mrc (+ _half1, _half2), confident_fsc.csv and the sums behind them (running_map.pt)."""
        self.since_map = 0
        if self.map is None or self.map.particles == self.map_written:
            return
        maps = self.map.maps()
        path = self.out / MAP_NAME
        write_mrc(path, maps["full"], self.map.pixel_size)
        for half in ("half1", "half2"):
            write_mrc(path.with_name(f"{path.stem}_{half}.mrc"), maps[half], self.map.pixel_size)
        rows = fsc_table(maps["fsc"], self.map.box, self.map.pixel_size)
        write_text(self.out / "confident_fsc.csv", "shell,frequency_invA,resolution_A,fsc\n" + "".join(
            f"{r['shell']},{r['frequency_invA']:.6f},{r['resolution_A']:.3f},{r['fsc']:.5f}\n" for r in rows))
        self.map_written, self.resolution = self.map.particles, float(maps["resolution_A"])
        with atomic_path(self.ledger.root / "running_map.pt") as tmp:
            torch.save({**self.map.state_dict(), "batches": list(self.map_batches),
                        "resolution_A": self.resolution}, tmp)
        self.events.message(f"[watch] map of {self.map.particles:,} confident particles: half-map FSC 0.143 at "
                            f"{self.resolution:.2f} Å -> {path}")

    def _restore_map(self) -> None:
        """The saved sums, plus the confident particles of the committed batches they do not hold (read back from
        the rebuilt confident output); writes the map when it changed."""
        saved = self.ledger.root / "running_map.pt"
        state = torch.load(saved, weights_only=False) if saved.exists() else None
        committed = set(self.ledger.batches)
        if state is not None and set(state["batches"]) <= committed:
            self.map = RunningMap.from_state(state, resolve_device(self.opts.device))
            self.map_batches = list(state["batches"])
            self.map_written, self.resolution = self.map.particles, state["resolution_A"]
        missing = [b for b in self.ledger.batches if b not in set(self.map_batches)]
        merged = self.out / "confident.star"
        if missing and merged.exists():
            keys = np.concatenate([np.load(self.ledger.batch_dir(b) / "keys.npy") for b in missing])
            confident = read_particles(merged)
            confident = confident.subset(np.isin(np.asarray(confident.uid, np.uint64), keys))
            self._add_to_map(missing, confident)
            self._write_map()

    # ------------------------------------------------------------------------------------------ status

    def _finish(self) -> None:
        if self.settings.reconstruct and self.map is not None and self.map.particles != self.map_written:
            self._write_map()
        self._write_status()

    def status(self) -> dict:
        """What status.json holds: the counts so far, the speed, the last batch, the map's resolution."""
        session = self.session
        return {
            "input": self.input_name, "out": str(self.out), "model": str(self.model_dir),
            "reference": self.reference.source if self.reference is not None else None,
            "particles_done": self.ledger.particles, "batches": len(self.ledger.batches),
            "confident": self.ledger.totals.get("confident", 0), "rejected": self.ledger.totals.get("rejected", 0),
            "particles_per_second": round(session["particles"] / session["seconds"], 2) if session["seconds"] else None,
            "this_run": {"particles": session["particles"], "processing_seconds": round(session["seconds"], 1)},
            "last_update": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "resolution_A": self.resolution, "map_particles": self.map.particles if self.map is not None else 0,
            "domain_check": self.last.get("domain_check"), "last_batch": self.last,
            "waiting_for": [str(p) for p in self.source.waiting], "problems": dict(self.source.problems)}

    def _write_status(self) -> None:
        """status.json, and predict.json's domain check (and --rewhiten's spectra: each batch re-estimates its own)
        of the last batch next to predicted.star (as a job's)."""
        write_text(self.out / "status.json", json.dumps(self.status(), indent=2, default=str))
        record = {k: self.last[k] for k in ("domain_check", "rewhitening") if self.last.get(k) is not None}
        if record:
            steps.write_predict_json(self.out, record)
