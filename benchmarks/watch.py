#!/usr/bin/env python3
"""``cryoforum watch`` on a stream of batches (issue 22): latency, memory and the cost of rewriting the outputs.

Two measurements, printed as tables and written to --json:

- stream (needs --model and --reference): --batches files of --batch-size new particles (simulated from the
  embedded map at the model's box, SNR --snr, CTF, shifts) are handed over one at a time (written under a hidden
  name, then renamed into the watched directory, the next one as soon as the previous batch is committed) to a
  Watcher running in this process with the job's defaults (--global-search auto: the network's confidence decides
  who gets a global search). Per batch: the time from the file appearing to every output updated (latency), the
  processing time, the part of it spent rewriting the merged outputs, and the resident memory (VmRSS) after it.
- rewrite (synthetic, no images read): for each N of --rewrite-rows, N rows in per-batch STAR files of
  --batch-size rows (one real batch file written by the stream's writer, hard-linked N / batch-size times) for each
  output (predicted and refined N rows, confident 3N/4, rejected N/4), then the rebuild of the four merged outputs
  timed as the stream does it after every batch, with the memory it needs (VmHWM above the RSS before it), and the
  ledger's share (which of a batch's keys are new among N, and the commit of the new ones).

  python benchmarks/watch.py --model demo_out/model --reference map64.mrc --box 64 --batches 100 \\
      --rewrite-rows 100000 1000000 --json benchmarks/data/watch.json              # the issue's sizes
  python benchmarks/watch.py --model M32 --reference ref32.mrc --box 32 --batch-size 100 --batches 5 \\
      --rewrite-rows 10000 100000                                                    # a small run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import _status_gb, reset_peak  # noqa: E402  (VmRSS / VmHWM of this process)


def stream(args, work: Path) -> list[dict]:
    """The stream measurement (see the module docstring): one row per batch."""
    from cryoforum_plugin.data import DEFAULT_MAP
    from cryoforum_plugin.formats.star import read_star, write_star
    from cryoforum_plugin.pipeline import options as pipeline_options
    from cryoforum_plugin.pipeline import steps
    from cryoforum_plugin.pipeline.ledger import Ledger
    from cryoforum_plugin.pipeline.stream import ParticleFiles
    from cryoforum_plugin.pipeline.watch import Watcher, WatchSettings
    from cryoforum_plugin.progress import Events
    from cryoforum_plugin.sim.dataset import simulate

    n = args.batches * args.batch_size
    from cryoforum_plugin.sim.realism import REALISTIC

    real = {k: v for k, v in REALISTIC.items() if k not in ("junk_fraction", "junk_kinds")} if args.realistic else {}
    simulate(DEFAULT_MAP, work / "sim", n=n, box=args.box, snr=args.snr, max_shift=args.max_shift, seed=3,
             progress=False, **real)
    ps = read_star(work / "sim" / "particles.star")
    staged, incoming = work / "staged", work / "incoming"
    staged.mkdir()
    incoming.mkdir()
    for b in range(args.batches):  # written beforehand: the measurement starts when a file appears
        rows = np.arange(b * args.batch_size, (b + 1) * args.batch_size)
        write_star(ps.subset(rows), staged / f"b{b:05d}.star", relative_to=incoming.resolve())
    del ps
    rebuild_seconds = []
    real_rebuild = Ledger.rebuild_outputs

    def timed_rebuild(self, extra=()):
        start = time.perf_counter()
        rows = real_rebuild(self, extra)
        rebuild_seconds.append(time.perf_counter() - start)
        return rows

    Ledger.rebuild_outputs = timed_rebuild
    settings = WatchSettings(batch_size=args.batch_size, settle=args.settle, poll=0.2, until_idle=None,
                             map_every=args.map_every)
    source = ParticleFiles(incoming, batch_size=args.batch_size, settle=args.settle)
    opts = pipeline_options.options(device=args.device, threads=args.threads)
    watcher = Watcher(source, work / "out", args.model, steps.Reference.from_files(args.reference), opts, settings,
                      events=Events(open(os.devnull, "w")) if args.quiet else None)
    rows, done = [], threading.Event()

    def feed():
        for b in range(args.batches):
            os.replace(staged / f"b{b:05d}.star", incoming / f"b{b:05d}.star")  # renamed in: read at once
            appeared = time.time()
            while len(watcher.ledger.batches) <= b and not done.is_set():
                time.sleep(0.02)
            latency = time.time() - appeared  # every output rewritten and the batch committed
            while watcher.last.get("batch", 0) <= b and not done.is_set():
                time.sleep(0.01)
            if done.is_set():
                return
            info = watcher.last
            rows.append({"batch": b + 1, "particles": info["particles"], "latency_s": round(latency, 2),
                         "seconds": info["seconds"], "rewrite_s": round(rebuild_seconds[-1], 3),
                         "global_searched": info["global_searched"], "rss_gb": round(_status_gb("VmRSS"), 3)})
            print(f"batch {b + 1:4d}: latency {latency:6.1f} s, rewrite {rebuild_seconds[-1]:6.3f} s, "
                  f"RSS {rows[-1]['rss_gb']:.3f} GB", flush=True)
        done.set()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        watcher.run(stop=done.is_set)
    finally:
        done.set()
        Ledger.rebuild_outputs = real_rebuild
    feeder.join()
    return rows


def synthetic_batch(path: Path, rows: int, out_dir: Path, fmt: str = "star") -> None:
    """One batch STAR of ``rows`` synthetic particles with every column a refined.star carries (poses, shifts, CTF,
    the three pose sets, uncertainty, figure of merit, refinement score and confidence, half-set, uid), written by
    the stream's writer (``fmt`` 'star' or 'cs')."""
    from cryoforum_plugin.formats.columns import REFINE_STAR
    from cryoforum_plugin.formats.particles import ParticleSet
    from cryoforum_plugin.formats.stream_files import StarLayout, write_batch_cs, write_batch_star
    from cryoforum_plugin.physics.rotations import random_quats

    rng = np.random.default_rng(0)
    ctf = {"defocus_u": rng.uniform(8e3, 2e4, rows), "defocus_v": rng.uniform(8e3, 2e4, rows),
           "defocus_angle": rng.uniform(0, 180, rows), "voltage": np.full(rows, 300.0), "cs": np.full(rows, 2.7),
           "amp_contrast": np.full(rows, 0.1), "phase_shift": np.zeros(rows)}
    ps = ParticleSet(image_path=np.array([str(out_dir / "Extract/job005/Movies/mic_0001.mrcs")] * rows, dtype=object),
                     image_index=np.arange(rows), quat=random_quats(rows, rng), shift_A=rng.normal(0, 2, (rows, 2)),
                     pixel_size=np.full(rows, 1.1), box=np.full(rows, 64), ctf=ctf, optics_group=np.ones(rows, int),
                     half_set=rng.integers(1, 3, rows), uid=rng.integers(0, 2**62, rows).astype(np.uint64),
                     uncertainty={"max": -rng.random(rows), "trace": -rng.random(rows)}, fom=rng.random(rows),
                     prior_quat=random_quats(rows, rng), predicted_quat=random_quats(rows, rng),
                     numeric={REFINE_STAR["score"]: rng.random(rows), REFINE_STAR["confidence"]: rng.random(rows)})
    if fmt == "cs":
        write_batch_cs(ps, path, out_dir)
    else:
        write_batch_star(ps, path, out_dir, StarLayout())


def rewrite(args, work: Path) -> list[dict]:
    """The rewrite measurement (see the module docstring): one row per N."""
    from cryoforum_plugin.formats.stream_files import merge_cs, merge_star
    from cryoforum_plugin.pipeline.ledger import Ledger

    out = work / "rewrite"
    out.mkdir()
    fmt = args.rewrite_format
    merge = merge_cs if fmt == "cs" else merge_star
    template = out / f"template.{fmt}"
    synthetic_batch(template, args.batch_size, out, fmt)
    results = []
    for total in args.rewrite_rows:
        batches = total // args.batch_size
        parts = out / f"parts_{total}"
        parts.mkdir()
        files = []
        for b in range(batches):
            files.append(parts / f"{b:07d}.{fmt}")
            os.link(template, files[-1])
        shares = {"predicted": 1.0, "refined": 1.0, "confident": 0.75, "rejected": 0.25}
        rss = _status_gb("VmRSS")
        reset_peak()
        start = time.perf_counter()
        written = {name: merge(files[:max(1, int(round(share * batches)))], out / f"{name}.{fmt}")
                   for name, share in shares.items()}
        seconds = time.perf_counter() - start
        size_gb = sum((out / f"{name}.{fmt}").stat().st_size for name in shares) / 1e9
        memory = _status_gb("VmHWM") - rss
        rng = np.random.default_rng(1)  # the ledger's share of a batch: which keys are new, then the commit
        ledger_of = Ledger(out / "ledger")
        ledger_of.keys = np.sort(rng.integers(0, 2**62, total).astype(np.uint64))
        new = rng.integers(0, 2**62, args.batch_size).astype(np.uint64)
        start = time.perf_counter()
        fresh = new[~ledger_of.done(new)]
        ledger_of.commit(1, fresh, np.zeros(len(fresh)), {})
        ledger = time.perf_counter() - start
        results.append({"format": fmt, "rows": total, "batch_files": batches, "rows_written": sum(written.values()),
                        "rewrite_s": round(seconds, 3), "written_gb": round(size_gb, 3),
                        "gb_per_s": round(size_gb / seconds, 3), "memory_gb": round(memory, 3),
                        "ledger_s": round(ledger, 4)})
        print(f"rewrite at {total:,} rows: {seconds:.2f} s for {size_gb:.2f} GB", flush=True)
        shutil.rmtree(parts)
    return results


def table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (trained at --box); without it the stream is skipped")
    parser.add_argument("--reference", help="reference map for the refinement (the consensus map)")
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--max-shift", type=float, default=8.0, help="Å")
    parser.add_argument("--settle", type=float, default=0.5, help="s")
    parser.add_argument("--map-every", type=int, default=5000)
    parser.add_argument("--realistic", action="store_true", help="particles like `cryoforum simulate --realistic` "
                        "without its junk (coloured noise, ice, micrograph levels, normalisation, B-factors, views)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rewrite-format", choices=("star", "cs"), default="star",
                        help="the merged outputs' format in the rewrite measurement (a .cs stream writes both)")
    parser.add_argument("--rewrite-rows", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--work", help="work directory (default: a temporary one, removed)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--quiet", action="store_true", help="no per-batch lines from the watcher")
    args = parser.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="watch_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"settings": {k: v for k, v in vars(args).items() if k != "json"}}
    try:
        if args.model:
            results["stream"] = stream(args, work)
        if args.rewrite_rows:
            results["rewrite"] = rewrite(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if "stream" in results:
        print(table(results["stream"], ["batch", "particles", "latency_s", "seconds", "rewrite_s",
                                        "global_searched", "rss_gb"]))
    if "rewrite" in results:
        print(table(results["rewrite"], ["format", "rows", "batch_files", "rows_written", "rewrite_s", "written_gb",
                                         "gb_per_s", "memory_gb", "ledger_s"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
