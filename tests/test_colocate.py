"""train-policy's placement: split (each role on its own CPUs) or colocate (one CPU node, the
roles take turns with every core)."""

import pytest
from conftest import REPO
from omegaconf import OmegaConf

from dprm_ray.config import ConfigError
from dprm_ray.jobs.train_policy import actor_env
from dprm_ray.policy_config import TrainPolicyConfig


def typed(**overrides) -> TrainPolicyConfig:
    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainPolicyConfig), {"reward": {"model": "rm"}}, overrides
    )
    return OmegaConf.to_object(cfg)


def test_placement_is_split_or_colocate_and_colocate_is_cpu_only():
    typed(placement="colocate").validate()
    with pytest.raises(ConfigError, match="placement: must be split or colocate, got 'fused'"):
        typed(placement="fused").validate()
    with pytest.raises(ConfigError, match="placement=colocate: built for CPU nodes only"):
        typed(placement="colocate", learner={"gpus_per_rank": 1}).validate()


def test_colocated_rollout_workers_sample_their_share_of_a_step_in_one_call():
    split = typed(prompts_per_step=8, chunk_size=2)
    assert split.rollout_chunk_size() == 2
    one = typed(placement="colocate", prompts_per_step=8, chunk_size=2)
    assert one.rollout_chunk_size() == 8
    groups = typed(
        placement="colocate",
        prompts_per_step=3,
        ppo={"samples_per_prompt": 2},
        rollout={"num_workers": 4},
    )
    assert groups.rollout_chunk_size() == 2  # 6 samples over 4 workers: at most 2 each


def test_colocated_actors_get_the_nodes_cores(ray_local):
    assert actor_env(typed()) is None
    assert actor_env(typed(actor_threads=3)) == {"env_vars": {"OMP_NUM_THREADS": "3"}}
    # The session's cluster is one node of 2 CPUs. OpenMP's default wait policy is kept
    # (PASSIVE made a colocated step 1.3x slower: train_policy.actor_env).
    assert actor_env(typed(placement="colocate")) == {"env_vars": {"OMP_NUM_THREADS": "2"}}
    assert actor_env(typed(placement="colocate", actor_threads=1)) == {
        "env_vars": {"OMP_NUM_THREADS": "1"}
    }


def test_the_laptop_preset_colocates_and_concurrent_quickstart_ppo_runs_split(tmp_path):
    from dprm_ray.config import load_config
    from dprm_ray.jobs.quickstart import QuickstartConfig, _ppo_args, resolve
    from dprm_ray.policy_config import TrainPolicyConfig

    ppo = load_config(TrainPolicyConfig, REPO / "configs" / "ppo.yaml", ["reward.model=rm"])
    assert ppo.placement == "colocate"

    def ppo_args(**values) -> list[str]:
        plan = resolve(OmegaConf.merge(OmegaConf.structured(QuickstartConfig), values))
        return _ppo_args(plan, tmp_path, "ot", "disabled")

    # The default size runs its two PPO runs one after the other: each gets the node.
    assert not any(a.startswith("placement=") for a in ppo_args())
    # tiny runs them at the same time; a user's own train_policy_args still win (last).
    assert "placement=split" in ppo_args(size="tiny")
    assert ppo_args(size="tiny", train_policy_args=["placement=colocate"])[-1] == (
        "placement=colocate"
    )
