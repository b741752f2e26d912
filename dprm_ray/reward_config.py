"""The config of reward-model training (`dprm-ray train-reward`, the trials of `dprm-ray sweep`).

Kept apart from `dprm_ray.reward_training`, which needs torch, so that reading the config (and
`dprm-ray train-reward --help`) starts no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dprm_ray.config import MISSING
from dprm_ray.precision import allow_slow_cpu_precision_field, check_precision, precision_field
from dprm_ray.training import OptimConfig, ScaleConfig, WandbConfig

__all__ = ["LOSSES", "BackboneConfig", "LossConfig", "TargetConfig", "TrainRewardConfig"]

LOSSES = ("ce", "w1", "ot", "ot_general", "bt")


# --------------------------------------------------------------------------- config


@dataclass
class LossConfig:
    kind: str = field(default="ot", metadata={"help": "ce, w1, ot, ot_general or bt"})
    mix: float = field(default=0.0, metadata={"min": 0, "help": "weight of CE added to an OT loss"})
    cost_metric: str = field(
        default="grid", metadata={"help": "ot_general ground metric: index, score or grid"}
    )
    method: str = field(default="emd", metadata={"help": "ot_general solver: emd or sinkhorn"})
    reg: float = field(
        default=0.05, metadata={"above": 0, "help": "Sinkhorn entropic regularisation"}
    )


@dataclass
class TargetConfig:
    kappa: float | None = field(
        default=None,
        metadata={
            "min": 0,
            "help": "recompute posteriors with this prior strength (None: use the file's)",
        },
    )
    eps: float | None = field(
        default=None,
        metadata={
            "min": 0,
            "below": 1,
            "help": "label smoothing of unanimous targets (None: use the file's targets)",
        },
    )


@dataclass
class BackboneConfig:
    spec: str = field(default="minilm", metadata={"help": "model spec the loader takes"})
    kind: str = field(default="encoder", metadata={"help": "encoder or causal-lm"})
    freeze: bool = field(default=True, metadata={"help": "train only the head"})
    cache_embeddings: bool = field(
        default=True, metadata={"help": "frozen encoders: embed once, cache on disk"}
    )
    max_length: int = field(default=256, metadata={"min": 1})


@dataclass
class TrainRewardConfig:
    data: str = field(default=MISSING, metadata={"help": "annotations or pairs (.parquet/.jsonl)"})
    eval_data: str = field(default="", metadata={"help": "held-out file ('' = split off data)"})
    val_fraction: float = field(default=0.1, metadata={"above": 0, "below": 1})
    label_space: Any = field(
        default="hh6", metadata={"help": "hh6, likert5, or a mapping {name, labels, scores}"}
    )
    skip_invalid_rows: bool = False
    loss: LossConfig = field(default_factory=LossConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    precision: str = precision_field()
    allow_slow_cpu_precision: bool = allow_slow_cpu_precision_field()
    seed: int = field(default=0, metadata={"min": 0})
    bootstrap: bool = field(
        default=False,
        metadata={"help": "train on a resample with replacement (seeded): ensemble members"},
    )
    checkpoint_every: int = field(
        default=50, metadata={"min": 0, "help": "steps between checkpoints"}
    )
    resume: bool = field(default=True, metadata={"help": "continue from the latest checkpoint"})
    log_every: int = field(default=10, metadata={"min": 1})
    eval_every: int = field(
        default=0,
        metadata={
            "min": 0,
            "help": "steps between held-out evaluations, each reported (0: only at the end)",
        },
    )
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output_dir: str = "outputs/train-reward"

    def validate(self, prefix: str = "", on_gpu: bool | None = None) -> None:
        """ConfigError naming the key; `on_gpu` overrides scale.use_gpu (a sweep's trials take
        their GPUs from the sweep's resources)."""
        gpu = self.scale.use_gpu if on_gpu is None else on_gpu
        check_precision(
            self.precision,
            on_cpu=not gpu,
            allow_slow=self.allow_slow_cpu_precision,
            key=f"{prefix}precision",
            allow_key=f"{prefix}allow_slow_cpu_precision",
            device_key=f"{prefix}scale.use_gpu=false" if on_gpu is None else "resources.gpus=0",
        )
