"""One training step's student gradient for the cross-rank normalization test (test_train_dist.py).

``gradient(method, rank_examples, rank, world)`` is the gradient of ``method``'s loss on this rank's
examples, averaged over the ranks by DistributedDataParallel when ``world > 1``; the test computes
the one-process references with the same function (``world = 1``). Run under torchrun as a script:
``python -m torch.distributed.run --nproc_per_node 2 tests/_dist_grads.py M1,M2 OUT.pt`` writes
rank 0's gradients, ``{method: {parameter: gradient}}``, to ``OUT.pt``.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch

# Uneven on purpose: rank 0's two responses hold 9 and 7 tokens, rank 1's 2 and 1 (EOS included).
RANK_EXAMPLES = (
    ([[5, 6, 7], [8, 9]], [[20, 21, 22, 23, 24, 25, 26, 27], [30, 31, 32, 33, 34, 35]]),
    ([[10, 11, 12, 13], [14]], [[40], []]),
)


def examples(prompts_responses, eos_id: int):
    from kd_kernels.train.data import build_example

    prompts, responses = prompts_responses
    return [build_example(p, r, eos_id) for p, r in zip(prompts, responses)]


def gradient(method_name: str, rank_examples, rank: int, world: int) -> dict[str, torch.Tensor]:
    """The student's gradient after one backward of ``method_name``'s loss (off-policy batch)."""
    from kd_kernels.train.config import TrainConfig
    from kd_kernels.train.data import collate, shift_targets
    from kd_kernels.train.methods import get_method
    from kd_kernels.train.models import load_tiny, make_student
    from kd_kernels.train.trainer import DistillModule

    teacher, tok, _ = load_tiny(0)
    teacher.eval()
    student = make_student(teacher, [0, 2])
    cfg = TrainConfig(method=method_name, preset="tiny", backend="torch", minillm_pt=False)
    run = SimpleNamespace(cfg=cfg, rank=rank, world=world, device=torch.device("cpu"))
    method = get_method(method_name)
    method._info = {"on_policy": 0.0}  # the methods that sample: this is an off-policy step
    batch = collate(rank_examples, tok.pad_token_id)
    if method_name == "minillm":  # a PPO minibatch: q_old, w and the advantages given by hand
        targets, mask = shift_targets(batch["labels"])
        zeros = torch.zeros(mask.shape)
        batch |= {
            "targets": targets,
            "mask": mask,
            "old_logp": zeros,
            "log_w": zeros,
            "adv": torch.where(mask, 0.5, zeros),
        }
    model = DistillModule(student, teacher, method, run)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    loss, _ = model(batch)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in student.named_parameters()}


def main(methods: str, out: str) -> None:
    import torch.distributed as dist

    from kd_kernels.train.models import tiny_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    eos = tiny_tokenizer().eos_token_id
    mine = examples(RANK_EXAMPLES[rank], eos)
    grads = {m: gradient(m, mine, rank, world) for m in methods.split(",")}
    if rank == 0:
        torch.save(grads, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
