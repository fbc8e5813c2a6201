#!/usr/bin/env python3
"""Prediction throughput and peak memory against the pure network forward pass (issue 'Scale').

For each (particles, box): simulate the set (streamed to disk, once), then in a fresh process run the `predict`
command as a user would (read the STAR, stream the stack, preprocess on the device, network, write predicted.star)
and, in the same process, the pure forward pass on an in-memory batch. Reported:

- predict/s: particles per second of the prediction loop (reading + preprocessing + network + head);
- command/s: the whole command, including reading the particle file and writing the output STAR;
- forward/s: the network alone on a resident tensor (same batch, same process);
- memory: VmHWM of the measuring process for each phase (reading the particle file, the prediction loop, writing
  the output), the high-water mark being reset between phases; ru_maxrss is not used (Linux carries the parent's
  peak into a forked child, which made earlier rows report the simulation's memory). The loop's peak is what
  streaming bounds; the particle table (read and write) grows with N.

  python benchmarks/throughput.py --sizes 10000x64,100000x64,10000x128,1000000x32 --width 0.25     # CPU
  python benchmarks/throughput.py --sizes 10000x128,100000x128 --width 1.0 --batch 512            # GPU machine
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_gb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def measure(data: str, box: int, width: float, batch: int, workers: int, out: str) -> dict:
    """Run in a fresh process: the predict command's steps end to end (peak memory of each phase), then the pure
    forward pass."""
    import torch

    from cryoforum_plugin.pipeline.steps import write_predictions
    from cryoforum_plugin.formats.loader import auto_workers
    from cryoforum_plugin.formats.files import read_particles
    from cryoforum_plugin.infer.predict import predict, with_predictions
    from cryoforum_plugin.train.model_dir import ModelDir
    from cryoforum_plugin.train.config import TrainConfig, build

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Path(out) / f"model_b{box}_w{width}"
    cfg = TrainConfig(box=box, width=width)
    ModelDir(model).write_untrained(cfg)
    pre, net = build(cfg)
    base = _status_gb("VmRSS")
    t0 = time.time()
    particles = Path(data) / "particles.star"
    ps = read_particles(particles)
    ps.validate_images()
    read_peak, table = _status_gb("VmHWM"), _status_gb("VmRSS")
    reset_peak()
    pred = predict(ps, model, device=device, batch=batch, progress=False, workers=workers)
    loop_peak = _status_gb("VmHWM")
    reset_peak()
    write_predictions(with_predictions(ps, pred), Path(out) / f"pred_{Path(data).name}", particles, "star")
    command_s = time.time() - t0
    write_peak = _status_gb("VmHWM")
    pre, net = pre.to(device).eval(), net.to(device).eval()
    x = torch.randn(batch, pre.channels, box, box, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for _ in range(3):
            net(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, n = time.time(), 0
        while time.time() - t0 < 20 and n < len(ps):
            net(x)
            n += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
        forward = n / (time.time() - t0)
    return {"particles": len(ps), "box": box, "width": width, "batch": batch, "device": str(device),
            "workers": auto_workers(device) if workers < 0 else workers, "threads": torch.get_num_threads(),
            "predict_particles_per_s": pred.particles_per_second, "command_particles_per_s": len(ps) / command_s,
            "forward_particles_per_s": forward, "ratio_end_to_end_vs_forward": pred.particles_per_second / forward,
            "rss_after_imports_gb": base, "rss_with_particle_table_gb": table,
            "peak_rss_read_gb": read_peak, "peak_rss_predict_loop_gb": loop_peak, "peak_rss_write_gb": write_peak,
            "peak_rss_gb": max(read_peak, loop_peak, write_peak),
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000x64,10000x128")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", default="-1", help="comma-separated loader process counts to compare (-1 = auto)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "throughput")
    ap.add_argument("--json", type=Path, default=None, help="output JSON (default WORK/throughput.json)")
    ap.add_argument("--measure", nargs=3, metavar=("DATA", "BOX", "WORKERS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        data, box, workers = args.measure
        print(json.dumps(measure(data, int(box), args.width, args.batch, int(workers), str(args.work))))
        return
    from cryoforum_plugin.data import DEFAULT_MAP
    from cryoforum_plugin.sim.dataset import simulate

    out_json = args.json or args.work / "throughput.json"
    rows = json.loads(out_json.read_text()) if out_json.exists() else []
    print(f"{'particles':>10}{'box':>6}{'workers':>8}{'predict/s':>11}{'command/s':>11}{'forward/s':>11}"
          f"{'ratio':>7}{'loop GB':>9}{'table GB':>10}{'peak GB':>9}  device")
    for spec in args.sizes.split(","):
        n, box = (int(v) for v in spec.split("x"))
        data = args.work / f"sim_{n}_{box}"
        if not (data / "particles.star").exists():
            t0 = time.time()
            simulate(DEFAULT_MAP, data, n=n, box=box, snr=0.1, seed=1, progress=False, chunk=2000)
            print(f"simulated {n} x {box} px in {time.time() - t0:.0f} s", flush=True)
        for workers in args.workers.split(","):
            proc = subprocess.run([sys.executable, __file__, "--measure", str(data), str(box), workers, "--width",
                                   str(args.width), "--batch", str(args.batch), "--work", str(args.work)],
                                  capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-2000:])
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{n:>10}{box:>6}{row['workers']:>8}{row['predict_particles_per_s']:>11.0f}"
                  f"{row['command_particles_per_s']:>11.0f}{row['forward_particles_per_s']:>11.0f}"
                  f"{row['ratio_end_to_end_vs_forward']:>7.2f}{row['peak_rss_predict_loop_gb']:>9.2f}"
                  f"{row['rss_with_particle_table_gb']:>10.2f}{row['peak_rss_gb']:>9.2f}  {row['device']}",
                  flush=True)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
