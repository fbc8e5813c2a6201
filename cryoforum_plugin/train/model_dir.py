"""The model directory: the one reader and writer of a trained model's files.

Layout of MODEL_DIR (every file written atomically):
  config.json   {"cryoforum_version", "config": TrainConfig as a dict, "particles", "n_particles", "input_box",
                 "input_pixel_size", "model_pixel_size", "device", "torch"; with --whiten on|auto "whitening":
                 {"option", "applied", "colour", "spectrum"}; with --balance-views "view_balance"}
  split.json    {"train"|"val"|"test": {"rows": [...], "uids": [...]}}  rows of the training file, uids to match
  best.pt       torch dict: config, preprocess (state dict, with the whitening's noise_spectrum), model (state
                dict), epoch, best (validation median error, rad), trace_scale (median |eq. 7 trace| on the
                validation set, for the figure of merit)
  last.pt       best.pt's keys plus optimizer, scheduler, scaler (GradScaler), log and the random generators'
                states (RNG_STATES: gen, torch_rng, cuda_rng on a GPU, sim_gen with pre-training) for --resume
  log.csv       one row per epoch (epoch, loss, train/val median error, lr, beta1, beta2, seconds, grad norm,
                step = optimiser steps so far, synthetic = 1 for pre-training rows, skipped_steps = steps whose
                gradients were not finite (update skipped), snr = their simulated SNR, sim_seconds = time spent
                simulating); pre-training rows (every --pretrain-log-every steps) have
                fractional epoch <= 0: epochs' worth of steps before the first real epoch
  synthetic.json  with --pretrain-steps: what the synthetic particles were made from: {"map": the map's path or
                "reconstruction of the training split", "map_file" (the reconstruction, training_map.mrc),
                "half_map_fsc_0.143_A", "data_snr" (measured), "snr" (simulated), "snr_start", "noise_model"
                (noise.NoiseModel.to_dict()), ...}
  training_map.mrc  the FSC-weighted reconstruction of the training split (when no map was given)
  domain.json   statistics of the validation particles for the domain check (infer.domain.domain_reference)
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch

from cryoforum_plugin.formats.atomic import atomic_path, write_text
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.train.config import TrainConfig, build

CONFIG, SPLIT, BEST, LAST, LOG = "config.json", "split.json", "best.pt", "last.pt", "log.csv"
SYNTHETIC, TRAINING_MAP = "synthetic.json", "training_map.mrc"
DOMAIN = "domain.json"
RNG_STATES = ("gen", "torch_rng", "cuda_rng", "sim_gen")
"""last.pt's states of random generators: CPU ByteTensors (torch's generators take no other), whatever the device."""
RESUME_ONLY = ("optimizer", "scheduler", "scaler", "log", "gen", "torch_rng", "cuda_rng")
"""last.pt's keys that best.pt leaves out."""


def _to_device(value, device):
    """``value`` (a tensor, or dicts / lists / tuples holding tensors, as a state dict) with its tensors on
    ``device``; other values as they are; everything as it is for ``device`` None."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


class ModelDir:
    """``ModelDir(path)``: read and write one model directory (see the module docstring for the layout)."""

    def __init__(self, path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ writing (training)
    def create(self) -> "ModelDir":
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def write_meta(self, meta: dict) -> None:
        write_text(self.path / CONFIG, json.dumps(meta, indent=2))

    def write_split(self, split: dict[str, np.ndarray], uids: np.ndarray) -> None:
        """``split``: name -> row indices into the training set; ``uids``: (N,) uids of the training set."""
        data = {k: {"rows": np.asarray(v).tolist(), "uids": [int(u) for u in uids[v]]} for k, v in split.items()}
        write_text(self.path / SPLIT, json.dumps(data))

    def save_checkpoint(self, state: dict, best: bool) -> None:
        """``state``: the full training state (written as last.pt); with ``best`` also best.pt without the
        optimiser, scheduler, log and RNG entries."""
        with atomic_path(self.path / LAST) as tmp:
            torch.save(state, tmp)
        if best:
            slim = {k: v for k, v in state.items() if k not in RESUME_ONLY}
            with atomic_path(self.path / BEST) as tmp:
                torch.save(slim, tmp)

    def write_log(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        fields = list(dict.fromkeys(k for row in rows for k in row))  # rows of older versions lack newer columns
        writer = csv.DictWriter(buf, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.path / LOG, buf.getvalue())

    def write_synthetic(self, info: dict) -> None:
        """What pre-training simulated from (see the layout): JSON-able dict."""
        write_text(self.path / SYNTHETIC, json.dumps(info, indent=1, default=float))

    def write_training_map(self, vol: np.ndarray, pixel_size: float) -> None:
        from cryoforum_plugin.formats.mrc import write_mrc

        write_mrc(self.path / TRAINING_MAP, np.asarray(vol, np.float32), pixel_size)

    # ------------------------------------------------------------------ reading
    @property
    def has_model(self) -> bool:
        return (self.path / BEST).exists()

    @property
    def has_checkpoint(self) -> bool:
        return (self.path / LAST).exists()

    @property
    def best_path(self) -> Path:
        """The trained model (best.pt): what prediction loads and what a job hands on as its model node."""
        return self.path / BEST

    @property
    def domain_path(self) -> Path:
        """domain.json: the validation particles' statistics the domain check compares new particles with."""
        return self.path / DOMAIN

    def write_domain(self, stats: dict) -> None:
        write_text(self.domain_path, json.dumps(stats, indent=1))

    def domain(self) -> dict | None:
        """domain.json, or None for a model trained before the domain check."""
        return json.loads(self.domain_path.read_text()) if self.domain_path.exists() else None

    @property
    def last_path(self) -> Path:
        """The resumable checkpoint (last.pt): what ``--resume`` continues from."""
        return self.path / LAST

    def last_state(self, device=None) -> dict | None:
        """The resumable state (last.pt), or None when there is none: its tensors on ``device`` (default the CPU),
        except the random generators' states (RNG_STATES), which stay CPU ByteTensors (a generator's set_state and
        torch.set_rng_state refuse a state on a GPU)."""
        if not self.has_checkpoint:
            return None
        state = torch.load(self.path / LAST, map_location="cpu", weights_only=False)
        return {k: v if k in RNG_STATES else _to_device(v, device) for k, v in state.items()}

    def best_state(self, device=None) -> dict:
        if not self.has_model:
            raise CryoforumError("no trained model (best.pt) in the model directory.", path=self.path,
                                 fix="pass the --out directory of a finished `cryoforum train` run.")
        return torch.load(self.path / BEST, map_location=device or "cpu", weights_only=False)

    def config(self) -> TrainConfig:
        """The training configuration (from config.json, else best.pt)."""
        if (self.path / CONFIG).exists():
            return TrainConfig.from_dict(json.loads((self.path / CONFIG).read_text())["config"])
        return TrainConfig.from_dict(self.best_state()["config"])

    def meta(self) -> dict:
        path = self.path / CONFIG
        if not path.exists():
            raise CryoforumError("no config.json in the model directory.", path=self.path,
                                 fix="pass the --out directory of a `cryoforum train` run.")
        return json.loads(path.read_text())

    def grid(self, default_pixel: float, default_box: int) -> tuple[float, int]:
        """(pixel size in Å, box in px) of the images the model was trained on (config.json's input_pixel_size
        and input_box): prediction brings every particle to this grid. Models without a record: the defaults."""
        path = self.path / CONFIG
        meta = json.loads(path.read_text()) if path.exists() else {}
        if "input_pixel_size" not in meta or "input_box" not in meta:
            return default_pixel, default_box
        return float(meta["input_pixel_size"]), int(meta["input_box"])

    def split_uids(self, name: str) -> np.ndarray:
        """(M,) uint64 uids of one part ('train', 'val' or 'test') of the model's split."""
        path = self.path / SPLIT
        if not path.exists():
            raise CryoforumError("no split.json in the model directory.", path=self.path,
                                 fix="pass the --out directory of a `cryoforum train` run.")
        split = json.loads(path.read_text())
        if name not in split:
            raise CryoforumError(f"the model's split has no part '{name}'.", path=path, fix="use train, val or test.")
        return np.array(split[name]["uids"], dtype=np.uint64)

    def synthetic(self) -> dict | None:
        """synthetic.json (what pre-training simulated from), None without pre-training."""
        path = self.path / SYNTHETIC
        return json.loads(path.read_text()) if path.exists() else None

    def noise_model(self):
        """The noise.NoiseModel measured on the training particles for pre-training, or None."""
        info = self.synthetic()
        if info is None:
            return None
        from cryoforum_plugin.physics.noise import NoiseModel

        return NoiseModel.from_dict(info["noise_model"])

    def training_map(self) -> tuple[np.ndarray, float] | None:
        """(map, pixel size) of the stored reconstruction used for pre-training, or None."""
        path = self.path / TRAINING_MAP
        if not path.exists():
            return None
        from cryoforum_plugin.formats.mrc import read_map

        return read_map(path)

    def log(self) -> list[dict]:
        path = self.path / LOG
        if not path.exists():
            return []
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(path.open())]

    def load(self, device=None):
        """(preprocess, network in eval mode, best state) on ``device``."""
        state = self.best_state(device)
        pre, net = build(TrainConfig.from_dict(state["config"]))
        pre.load_state_dict(state["preprocess"])
        net.load_state_dict(state["model"])
        return pre.to(device).eval(), net.to(device).eval(), state

    def trace_scale(self, state: dict | None = None) -> float | None:
        """The stored uncertainty scale (median |eq. 7 trace| on the validation set), None if absent."""
        state = state if state is not None else self.best_state()
        value = state.get("trace_scale")
        return float(value) if value else None

    def write_untrained(self, config: TrainConfig) -> None:
        """A best.pt of an untrained network (benchmarks of speed need no training)."""
        pre, net = build(config)
        self.create()
        with atomic_path(self.path / BEST) as tmp:
            torch.save({"config": config.to_dict(), "preprocess": pre.state_dict(), "model": net.state_dict(),
                        "epoch": 0, "best": 0.0, "trace_scale": 1.0}, tmp)
