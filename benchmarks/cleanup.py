#!/usr/bin/env python3
"""Clean-up benchmark (issue 'Uncertainty-driven 3D clean-up'): asymmetric map, SNR 0.1, 10 % simulated junk,
cpu scale. Trains, predicts, and runs `cryoforum report` on the held-out test split: Spearman of each statistic with
the error, median error after dropping 25 %, junk detected, FSC before and after filtering, weighted reconstruction.

  python benchmarks/cleanup.py --epochs 30                      # section 4a (the network's uncertainty)
  python benchmarks/cleanup.py --epochs 30 --refine             # + refinement against the training split's map,
                                                                #   clean-up by the refinement's confidence
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryoforum_plugin.cli import main as cli  # noqa: E402
from cryoforum_plugin.data import DEFAULT_MAP  # noqa: E402
from cryoforum_plugin.formats.mrc import write_mrc  # noqa: E402
from cryoforum_plugin.physics.resample import resized_map  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="paper", help="training preset (paper: the configuration of section 4a)")
    ap.add_argument("--refine", action="store_true", help="refine the test particles against half-maps of the "
                                                            "training split and select by the refinement's confidence")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "cleanup")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = args.work
    sim = w / f"sim_snr{args.snr:g}"
    if not (sim / "truth.star").exists():
        assert cli(["simulate", str(DEFAULT_MAP), "--out", str(sim), "--n", str(args.n), "--box", str(args.box),
                    "--snr", str(args.snr), "--max-shift", "8", "--junk-fraction", "0.1", "--seed", "21"]) == 0
    vol, apix = resized_map(DEFAULT_MAP, args.box)
    write_mrc(w / "true_map.mrc", vol.numpy(), apix)
    model = w / "model"
    assert cli(["train", "--particles", str(sim / "particles.star"), "--out", str(model), "--box", str(args.box),
                "--width", "0.25", "--epochs", str(args.epochs), "--batch", "64", "--lr", "0.003", "--augment-psi",
                "--qcqp-param", "symmetric", "--threads", str(args.threads), "--preset", args.preset]) == 0
    assert cli(["predict", "--model", str(model), "--particles", str(sim / "particles.star"), "--out", str(w / "pred"),
                "--threads", str(args.threads)]) == 0
    extra = []
    if args.refine:
        import time

        import numpy as np

        from cryoforum_plugin.pipeline import options as pipeline_options
        from cryoforum_plugin.pipeline import steps
        from cryoforum_plugin.pipeline import job as pipeline_job
        from cryoforum_plugin.train.model_dir import ModelDir
        from cryoforum_plugin.formats.files import read_particles
        from cryoforum_plugin.progress import Events

        parts = read_particles(sim / "particles.star")
        train = parts.subset(np.isin(parts.uid, ModelDir(model).split_uids("train")))
        reference = pipeline_job.training_reference(train, w / "reference", pipeline_options.options(device="cpu"),
                                                    Events())
        pred = read_particles(w / "pred" / "predicted.star")
        test = pred.subset(np.isin(pred.uid, ModelDir(model).split_uids("test")))
        t0 = time.time()
        refined, result = steps.refine(test, reference, device="cpu")
        steps.write_refined(refined, result, w / "refined", w / "pred" / "predicted.star", "star")
        print(f"refined {len(test)} test particles in {time.time() - t0:.0f} s "
              f"({int(result.global_searched.sum())} by global search)")
        extra = ["--refined", str(w / "refined" / "refined.star"), "--statistic", "refine"]
    assert cli(["report", "--predicted", str(w / "pred" / "predicted.star"), "--truth", str(sim / "truth.star"),
                "--out", str(w / ("report_refined" if args.refine else "report")), "--map", str(w / "true_map.mrc"),
                "--model", str(model), "--split", "test", *extra]) == 0
    rep = json.loads((w / ("report_refined" if args.refine else "report") / "report.json").read_text())
    print(json.dumps({"headline": rep["headline"], "statistics": rep["statistics"], "junk": rep["junk"],
                      "errors_refined_good": rep.get("errors_refined_good"),
                      "shift_error_refined_px": rep.get("shift_error_refined_px"),
                      "reconstructions": rep.get("reconstructions")}, indent=1, default=float))


if __name__ == "__main__":
    main()
