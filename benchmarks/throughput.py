#!/usr/bin/env python3
"""Prediction throughput and peak memory against the pure network forward pass (issue 'Scale').

For each (particles, box): simulate the set (streamed to disk, once), then in a fresh process run the `predict`
command as a user would (read the STAR, stream the stack, preprocess on the device, network, write predicted.star)
and, in the same process, the pure forward pass on an in-memory batch. Reported:

- predict/s: particles per second of the prediction loop (reading + preprocessing + network + head);
- command/s: the whole command, including reading the particle file and writing the output STAR;
- forward/s: the network alone on a resident tensor (same batch, same process);
- peak RSS: VmHWM of the measuring process (ru_maxrss is not used: Linux carries the parent's peak into a
  forked child, which made earlier rows report the simulation's memory).

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


def peak_rss_gb() -> float:
    """High-water mark of this process's resident memory (VmHWM), GB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def measure(data: str, box: int, width: float, batch: int, workers: int, out: str) -> dict:
    """Run in a fresh process: the predict command end to end, then the pure forward pass."""
    import torch

    from cryoforum_plugin import manifest
    from cryoforum_plugin.commands import predict as predict_cmd
    from cryoforum_plugin.dataset import auto_workers
    from cryoforum_plugin.training import TrainConfig, build

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Path(out) / f"model_b{box}_w{width}"
    model.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(box=box, width=width)
    pre, net = build(cfg)
    torch.save({"config": vars(cfg), "preprocess": pre.state_dict(), "model": net.state_dict(), "epoch": 0,
                "best": 0.0, "trace_scale": 1.0}, model / "best.pt")
    t0 = time.time()
    args = manifest.namespace("predict", model=str(model), particles=str(Path(data) / "particles.star"),
                              out=str(Path(out) / f"pred_{Path(data).name}"), format="star", batch=batch,
                              workers=workers, device=str(device))
    ps, pred = predict_cmd.run(args)
    command_s = time.time() - t0
    rss_predict = peak_rss_gb()
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
            "workers": auto_workers(device) if workers < 0 else workers,
            "threads": torch.get_num_threads(),
            "predict_particles_per_s": pred.particles_per_second, "command_particles_per_s": len(ps) / command_s,
            "forward_particles_per_s": forward, "ratio_end_to_end_vs_forward": pred.particles_per_second / forward,
            "peak_rss_gb_predict": rss_predict,
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
    from cryoforum_plugin.simulation import simulate

    out_json = args.json or args.work / "throughput.json"
    rows = json.loads(out_json.read_text()) if out_json.exists() else []
    print(f"{'particles':>10}{'box':>6}{'workers':>8}{'predict/s':>11}{'command/s':>11}{'forward/s':>11}"
          f"{'ratio':>7}{'peak RSS GB':>13}  device")
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
                  f"{row['ratio_end_to_end_vs_forward']:>7.2f}{row['peak_rss_gb_predict']:>13.2f}  {row['device']}",
                  flush=True)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
