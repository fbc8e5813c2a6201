"""The training configuration (names and defaults of plugin.yaml's ``train`` job) and the modules it builds."""

from __future__ import annotations

import dataclasses

from cryoforum_plugin import manifest
from cryoforum_plugin.nn.model import OrientationNet
from cryoforum_plugin.nn.preprocess import Preprocess

_D = manifest.defaults("train")


@dataclasses.dataclass
class TrainConfig:
    """Every option that shapes a trained model; each default is plugin.yaml's (one declaration)."""

    box: int = _D["box"]
    blur: str = _D["blur"]
    pooling: str = _D["pooling"]
    head: str = _D["head"]
    qcqp_param: str = _D["qcqp_param"]
    grid_spacing: float = _D["grid_spacing"]
    width: float = _D["width"]
    drop_last: bool = _D["drop_last"]
    dropout: float = _D["dropout"]
    l2: float = _D["l2"]
    loss: str = _D["loss"]
    pairs: str = _D["pairs"]
    pairs_per_batch: int = _D["pairs_per_batch"]
    sym: str = _D["sym"]
    restrict_to_asu: bool = _D["restrict_to_asu"]
    epochs: int = _D["epochs"]
    batch: int = _D["batch"]
    lr: float = _D["lr"]
    val_fraction: float = _D["val_fraction"]
    test_fraction: float = _D["test_fraction"]
    split: str = _D["split"]
    seed: int = _D["seed"]
    augment_psi: bool = _D["augment_psi"]
    augment_shift: float = _D["augment_shift"]
    max_particles: int = _D["max_particles"]
    from_map: str | None = _D["from_map"]
    pretrain_steps: int = _D["pretrain_steps"]
    pretrain_log_every: int = _D["pretrain_log_every"]
    time_budget: float = _D["time_budget"]
    synthetic_snr: float | None = _D["synthetic_snr"]
    synthetic_snr_start: float | None = _D["synthetic_snr_start"]
    synthetic_snr_anneal: float = _D["synthetic_snr_anneal"]
    beta1_floor: float = _D["beta1_floor"]
    distance_loss: str = _D["distance_loss"]
    l2_head: bool = _D["l2_head"]
    phase_flip: bool = _D["phase_flip"]
    whiten: str = _D["whiten"]
    balance_views: bool = _D["balance_views"]
    precision: str = _D["precision"]

    def __post_init__(self):
        if self.from_map is not None:
            self.from_map = str(self.from_map)

    @classmethod
    def from_args(cls, args) -> "TrainConfig":
        """From an argparse namespace or a dict with the option names (others ignored). An option counts as given
        when its value is not None: the front ends leave the options the user did not give at None
        (``manifest.preset_options``: their command lines, ``options.options``). Each field is the user's value when
        given, else the value of ``preset`` (cpu, gpu, paper, auto = gpu on a GPU else cpu) when it sets one, else
        plugin.yaml's default, so a value the user gives is kept even when it equals the default. A
        --pretrain-steps the user gave turns the preset's --time-budget off (the user's step count is run)."""
        values = dict(vars(args) if not isinstance(args, dict) else args)
        given = {f.name: values[f.name] for f in dataclasses.fields(cls) if values.get(f.name) is not None}
        preset = dict(PRESETS[resolve_preset(values["preset"], values.get("device"))]) if values.get("preset") else {}
        if "pretrain_steps" in given and "time_budget" not in given:
            preset.pop("time_budget", None)  # the user's step count, not the preset's time budget
        return cls(**{**preset, **given})

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """From a stored configuration (config.json, a checkpoint); ``training`` (the loss mode's name before
        version 0.2) is read as ``loss``."""
        values = dict(values)
        if "training" in values:
            values.setdefault("loss", values.pop("training"))
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # the paper's configuration (Supplementary Table 1): plugin.yaml's defaults
    "paper": {},
    # measured best within ~30 min on 2 CPU cores at 64 px (benchmarks/RESULTS.md 3b, realistic set, 2,000
    # particles; the paper's configuration: 97°): the SO(3) grid head (7.6° held-out after 3,000 pre-training
    # steps, QCQP 15.7-16.6° with the same steps), pre-training sized to a 28-minute training on the machine
    "cpu": dict(box=64, width=0.25, batch=64, lr=3e-3, epochs=5, head="grid", augment_psi=True,
                qcqp_param="symmetric", pretrain_steps=3000, time_budget=28.0, pretrain_log_every=250,
                synthetic_snr_start=1.0, synthetic_snr_anneal=0.75, beta1_floor=0.25, l2_head=False),
    # the cpu preset's levers at the paper's scale (128 px, full width); not yet measured on a GPU
    "gpu": dict(box=128, width=1.0, batch=256, lr=1e-3, epochs=10, head="grid", augment_psi=True,
                qcqp_param="symmetric", pretrain_steps=20000, pretrain_log_every=1000, synthetic_snr_start=1.0,
                synthetic_snr_anneal=0.75, beta1_floor=0.25, l2_head=False),
}
"""Training presets: values of the options a user did not give (``--preset``; ``TrainConfig.from_args``). Every
name must be in ``manifest.preset_options()`` (tests/test_model_dir.py)."""


def resolve_preset(preset: str, device=None) -> str:
    """'auto' -> 'gpu' when training runs on a CUDA device, else 'cpu'; other names as given."""
    if preset != "auto":
        if preset not in PRESETS:
            from cryoforum_plugin.errors import CryoforumError

            raise CryoforumError(f"unknown preset '{preset}'.", fix="use auto, cpu, gpu or paper.")
        return preset
    from cryoforum_plugin.runtime import resolve_device

    return "gpu" if resolve_device(device).type == "cuda" else "cpu"


def build(config: TrainConfig, mean: float = 0.0, std: float = 1.0) -> tuple[Preprocess, OrientationNet]:
    """The preprocessing module and the network for a configuration."""
    pre = Preprocess(config.box, config.blur, mean, std, phase_flip=config.phase_flip)
    net = OrientationNet(pre.channels, config.head, config.pooling, config.width, config.drop_last, config.dropout,
                         config.qcqp_param, grid_spacing=config.grid_spacing, sym=config.sym)
    return pre, net
