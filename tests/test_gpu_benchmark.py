"""Issue 23 on a CPU: the GPU benchmark's smoke run (benchmarks/gpu.py --quick) and the refinement's memory and
chunking fixes (the projector keeps one spectrum crop, not one per search radius; the GPU chunk size follows the
free memory and does not change results)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.formats.files import read_particles
from cryoforum_plugin.physics.resample import resized_map
from cryoforum_plugin.refine import driver, scoring
from cryoforum_plugin.sim.dataset import simulate
from test_refinement import rotate_by

ROOT = Path(__file__).resolve().parents[1]
SMOKE_PHASES = ("eigh", "forward", "prediction", "training_step", "resume", "refinement")


def _numbers(value):
    """Every int/float inside a JSON value (bools excluded)."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_quick_gpu_benchmark_on_the_cpu_writes_every_phase(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["device"] == "cpu" and data["quick"] is True
    assert set(SMOKE_PHASES) <= set(data["phases"])
    for name in SMOKE_PHASES:
        phase = data["phases"][name]
        assert phase["rows"] and phase["seconds"] >= 0, name
        for row in phase["rows"]:
            assert row["rate"] > 0 and math.isfinite(row["rate"]), (name, row)
    assert all(math.isfinite(v) for v in _numbers(data))
    assert data["phases"]["forward"]["skipped_cases"] == [{"case": "qcqp compile", "skipped": "cpu"},
                                                          {"case": "grid compile", "skipped": "cpu"}]
    assert {r["case"].split(" batch")[0] for r in data["phases"]["refinement"]["rows"]} == {"local 32 px",
                                                                                           "global 32 px"}
    # the numbers are the product's: the refinement improves on its 10° starts and finds random ones
    for row in data["phases"]["refinement"]["rows"]:
        assert row["median_error_deg"] < (5.0 if row["case"].startswith("local") else 15.0), row
    resume = data["phases"]["resume"]["rows"][0]
    assert resume["continues"] is True and resume["resumed_at_step"] == 2
    assert resume["last_step"] == resume["total_steps"]
    assert "prediction" in proc.stdout and str(tmp_path / "gpu.json") in proc.stdout  # the printed table


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """24 particles of the embedded map at 32 px, their starts 10° off, and the reference."""
    d = tmp_path_factory.mktemp("gpu_refine")
    vol, apix = resized_map(DEFAULT_MAP, 32)
    simulate(DEFAULT_MAP, d, n=24, box=32, snr=1.0, max_shift=apix, seed=5, progress=False)
    truth = read_particles(d / "particles.star")
    starts = dataclasses.replace(truth, quat=rotate_by(truth.quat, 10.0, np.random.default_rng(0)),
                                 shift_A=np.zeros((len(truth), 2)))
    return {"starts": starts, "vol": vol, "apix": apix}


def test_the_projector_keeps_one_crop_across_batches(small_set, monkeypatch):
    """Per-particle radii ask the projector for many crop sizes; it holds only the last one at any time (before:
    one per size, ~4 GB at 128 px)."""

    class Spy(driver.Projector):
        made = []

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.sizes, self.held = set(), []
            Spy.made.append(self)

        def sample_slices(self, mats, kvec, radius, chunk=1 << 21):
            out = super().sample_slices(mats, kvec, radius, chunk)
            self.sizes.add(self._crop(radius)[1])
            self.held.append(sum(t.numel() * t.element_size() for t in self._crops.values()))
            return out

    monkeypatch.setattr(driver, "Projector", Spy)
    n = len(small_set["starts"])
    driver.refine(small_set["starts"], small_set["vol"], reference_pixel_size=small_set["apix"],
                  global_search="none", start_error_deg=np.linspace(1.0, 40.0, n), batch=4, progress=False)
    (proj,) = Spy.made
    assert len(proj.sizes) >= 4  # several batches, several crop sizes
    largest = (2 * max(proj.sizes) + 1) ** 3 * 2 * 4  # one (2m+1)³ cube, real and imaginary float32
    assert max(proj.held) == largest and len(proj._crops) == 1


def test_gpu_chunk_follows_free_memory(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 80 * gib))
    cuda = torch.device("cuda")
    free = [78 * gib]
    assert scoring.chunk_elements(cuda) == scoring.GPU_CHUNK_MAX == 1 << 28
    free = [16 * gib]  # 16 GiB / 8 / 32 B = 2**26
    assert scoring.chunk_elements(cuda) == 1 << 26
    free = [gib // 2]  # too little: the old fixed size stays the floor
    assert scoring.chunk_elements(cuda) == scoring.GPU_CHUNK_MIN == 1 << 24
    assert scoring.chunk_elements(torch.device("cpu")) == scoring.CPU_CHUNK == 1 << 21


def test_refinement_results_do_not_depend_on_the_chunk_size(small_set, monkeypatch):
    results = []
    for chunk in (1 << 21, 1 << 26, 1 << 15):
        monkeypatch.setattr(driver, "chunk_elements", lambda device, c=chunk: c)
        for mode in ("none", "all"):
            res = driver.refine(small_set["starts"], small_set["vol"], reference_pixel_size=small_set["apix"],
                                global_search=mode, start_error_deg=np.full(len(small_set["starts"]), 10.0),
                                batch=8, progress=False)
            results.append(np.concatenate([res.quat, res.shift_A, res.score[:, None]], 1))
    np.testing.assert_allclose(results[2], results[0], atol=1e-5)
    np.testing.assert_allclose(results[4], results[0], atol=1e-5)
    np.testing.assert_allclose(results[3], results[1], atol=1e-5)
    np.testing.assert_allclose(results[5], results[1], atol=1e-5)
