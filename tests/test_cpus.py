"""Work that runs alone uses every CPU it was given (dprm_ray/cpus.py), and batching by length."""

import pytest
import torch

from dprm_ray.cpus import assigned_cpus, use_assigned_cpus
from dprm_ray.models import load_model
from dprm_ray.reward_models import embed_texts


def test_outside_ray_the_process_gets_every_core_it_may_run_on():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert use_assigned_cpus() == assigned_cpus() == len(__import__("os").sched_getaffinity(0))
        assert torch.get_num_threads() == assigned_cpus()
    finally:
        torch.set_num_threads(before)


def test_a_ray_task_gets_as_many_torch_threads_as_its_cpus(ray_local):
    def threads_after(call: bool) -> tuple[int, int]:  # defined here: pickled by value
        import torch

        from dprm_ray.cpus import assigned_cpus, use_assigned_cpus

        if call:
            use_assigned_cpus()
        return torch.get_num_threads(), assigned_cpus()

    task = ray_local.remote(threads_after)
    # A 1-CPU task first: Ray may reuse its worker process, whose torch kept one thread.
    assert ray_local.get(task.options(num_cpus=1).remote(False))[1] == 1
    threads, cpus = ray_local.get(task.options(num_cpus=2).remote(True))
    assert (threads, cpus) == (2, 2)
    threads, cpus = ray_local.get(task.options(num_cpus=0.5).remote(True))
    assert (threads, cpus) == (1, 1)


@pytest.mark.parametrize(
    ("spec", "kind", "pooling"),
    [("tiny-encoder:1", "encoder", "mean"), ("tiny", "causal-lm", "last")],
)
def test_embedding_in_length_sorted_batches_gives_each_text_its_own_features(spec, kind, pooling):
    model, tok = load_model(spec, kind=kind)
    if kind == "causal-lm":
        model = model.get_decoder()
    prompts = [f"question {i}" + " and more" * (i % 5) for i in range(11)]
    responses = ["short", "a much longer answer " * 4, "mid answer here"] * 3 + ["x", "y y"]
    batched = embed_texts(model, tok, prompts, responses, 64, batch_size=4, pooling=pooling)
    for i in (0, 1, 5, 10):
        alone = embed_texts(model, tok, [prompts[i]], [responses[i]], 64, pooling=pooling)
        assert torch.allclose(batched[i], alone[0], atol=1e-5), i


# train-reward's whole-node features task (a frozen backbone on 2 workers, embedded in one task
# on both CPUs with 2 torch threads under `ray job submit`) is checked in test_job_submit.py.
