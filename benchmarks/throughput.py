#!/usr/bin/env python3
"""Prediction throughput and peak memory against the pure network forward pass (issue 'Scale').

For each (particles, box): simulate the set (streamed to disk), then in a fresh process run end-to-end `predict`
(read from the memory-mapped stack, preprocess, network, write) and, in the same process, the pure forward pass
on in-memory tensors. Peak RSS is the process maximum. Prints a table and writes JSON.

  python benchmarks/throughput.py --sizes 10000x64,10000x128,100000x64,1000000x32 --width 0.25   # CPU
  python benchmarks/throughput.py --sizes 10000x128,100000x128 --width 1.0 --batch 512            # GPU machine
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(data: str, box: int, width: float, batch: int, out: str) -> dict:
    """Run in a fresh process: end-to-end predict and the pure forward pass."""
    import torch

    from cryoforum_plugin.particles import read_star
    from cryoforum_plugin.prediction import predict
    from cryoforum_plugin.training import TrainConfig, build

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Path(out) / f"model_b{box}_w{width}"
    model.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(box=box, width=width)
    pre, net = build(cfg)
    torch.save({"config": vars(cfg), "preprocess": pre.state_dict(), "model": net.state_dict(), "epoch": 0,
                "best": 0.0, "trace_scale": 1.0}, model / "best.pt")
    ps = read_star(Path(data) / "particles.star")
    pred = predict(ps, model, device=device, batch=batch, progress=False)
    pre, net = pre.to(device).eval(), net.to(device).eval()
    x = torch.randn(batch, pre.channels, box, box, device=device)
    with torch.no_grad():
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
            "predict_particles_per_s": pred.particles_per_second, "forward_particles_per_s": forward,
            "ratio_end_to_end_vs_forward": pred.particles_per_second / forward,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000x64,10000x128")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "throughput")
    ap.add_argument("--measure", nargs=2, metavar=("DATA", "BOX"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]), args.width, args.batch, str(args.work))))
        return
    from cryoforum_plugin.data import DEFAULT_MAP
    from cryoforum_plugin.simulation import simulate

    rows = []
    print(f"{'particles':>10}{'box':>6}{'predict/s':>12}{'forward/s':>12}{'ratio':>8}{'peak RSS GB':>13}  device")
    for spec in args.sizes.split(","):
        n, box = (int(v) for v in spec.split("x"))
        data = args.work / f"sim_{n}_{box}"
        if not (data / "particles.star").exists():
            simulate(DEFAULT_MAP, data, n=n, box=box, snr=0.1, seed=1, progress=False, chunk=2000)
        proc = subprocess.run([sys.executable, __file__, "--measure", str(data), str(box), "--width", str(args.width),
                               "--batch", str(args.batch), "--work", str(args.work)], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-2000:])
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{n:>10}{box:>6}{row['predict_particles_per_s']:>12.0f}{row['forward_particles_per_s']:>12.0f}"
              f"{row['ratio_end_to_end_vs_forward']:>8.2f}{row['peak_rss_gb']:>13.2f}  {row['device']}", flush=True)
        (args.work / "throughput.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
