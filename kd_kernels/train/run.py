"""What a training run holds, below the loop, the methods and the evaluation (imports run one way:
``run`` ← ``methods`` / ``evaluate`` ← ``trainer``).

``Run`` holds the models, the tokenized data, the cached teacher responses and the distributed context;
``head`` turns a model and a batch into the final hidden states, lm_head and logit scale / softcap the
fused losses take (through ``kd_kernels.hf``, the library's one model path).
"""

from __future__ import annotations

import copy
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from kd_kernels import hf

from .config import TrainConfig
from .data import (
    Example,
    batch_indices,
    build_example,
    collate,
    lm_blocks,
    load_prompts,
    prompt_token_ids,
    split_prompts,
)
from .generate import cached_responses
from .losses import Head
from .models import Models, decoder_layers, load_models

# ------------------------------------------------------------------------------------------ distributed


def init_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Starts a process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local if world > 1 else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # long timeout: rank 0 may generate teacher responses for minutes while the others wait
        dist.init_process_group(backend, timeout=timedelta(hours=3))
    return rank, world, device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ---------------------------------------------------------------------------------------------- FSDP2


class HiddenStates(nn.Module):
    """``forward(input_ids, attention_mask)`` → the model's final hidden states: the FSDP2 root of the
    sharded teacher (``head`` calls it, so its embeddings and final norm are gathered by FSDP2 there)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return hf.head_inputs(self.model, input_ids=input_ids, attention_mask=attention_mask).hidden


def _tied(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def shard_fsdp(
    root: nn.Module, student: nn.Module, teacher: nn.Module, world: int, device: torch.device
) -> HiddenStates:
    """FSDP2 over all ``world`` processes (a 1-D DeviceMesh): ``fully_shard`` on each of the student's
    decoder layers, then on ``root`` (which holds the student and computes the loss in its forward, so the
    student's embeddings, final norm and lm_head are plain gathered tensors there and their gradients are
    reduce-scattered); the frozen teacher's layers, an untied teacher lm_head, then the teacher's root
    (a ``HiddenStates``, returned). The teacher's head stays a sharded DTensor outside that forward: the
    fused losses gather it (``kd_kernels/_dtensor.py``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for layer in decoder_layers(student):
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    for layer in decoder_layers(teacher):
        fully_shard(layer, mesh=mesh)
    if not _tied(teacher):  # used by the loss only, not in the teacher's forward: its own group
        fully_shard(teacher.get_output_embeddings(), mesh=mesh)
    teacher_root = HiddenStates(teacher)
    # a frozen model has no backward to reshard its root after: reshard right after the forward
    fully_shard(teacher_root, mesh=mesh, reshard_after_forward=True)
    return teacher_root


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective under FSDP2 (every rank calls it): ``model``'s full state dict as plain CPU tensors on
    rank 0 (empty on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def plain_copy(model: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A new, unsharded model of ``model``'s architecture (from its config) holding ``state``."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    dtype = next(iter(state.values())).dtype
    with torch.random.fork_rng(
        devices=[]
    ):  # its random init is overwritten; keep the run's RNG stream
        plain = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    plain.load_state_dict(state)
    plain.requires_grad_(False)
    return plain.to(device)


# ------------------------------------------------------------------------------------------------ run


class Run:
    """Models, tokenized data and cached teacher responses of one run."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.is_main = rank == 0
        self.progress = cfg.progress and self.is_main
        torch.manual_seed(cfg.seed)
        self.models: Models = load_models(cfg, device)
        tok = self.models.tokenizer
        self.tokenizer = tok
        self.pad_id, self.eos_id = int(tok.pad_token_id), int(tok.eos_token_id)
        prompts = load_prompts(cfg.prompts, cfg.max_prompts)
        self.splits = split_prompts(prompts, cfg.valid_frac, cfg.test_frac)
        self.prompt_ids = {
            p.id: prompt_token_ids(tok, p.text, cfg.max_prompt_tokens) for p in prompts
        }
        self._responses: dict[tuple, dict[str, list[int]]] = {}
        self._examples: dict[str, list[Example]] = {}
        self.train_examples: list[Example] = []
        self._lm_blocks: list[Example] | None = None

    # --- data -------------------------------------------------------------------------------------

    def split_prompts(self, split: str):
        return self.splits[split]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _teacher_responses(
        self, split: str, *, do_sample: bool, temperature: float, seed: int
    ) -> dict[str, list[int]]:
        key = (split, do_sample, temperature, seed)
        if key in self._responses:
            return self._responses[key]
        prompts = [(p.id, self.prompt_ids[p.id]) for p in self.splits[split]]
        kind = f"sampled T={temperature} seed={seed}" if do_sample else "greedy"
        kwargs = {
            "teacher_id": self.models.teacher_id,
            "cache_dir": self.cfg.cache_dir,
            "pad_id": self.pad_id,
            "eos_id": self.eos_id,
            "max_new_tokens": self.cfg.max_new_tokens,
            "do_sample": do_sample,
            "temperature": temperature,
            "seed": seed,
            "batch_size": self.cfg.gen_batch_size,
            "device": self.device,
            "progress": self.progress,
            "desc": f"teacher {kind} {split}",
        }
        # rank 0 generates and writes the cache; the others then read the same file
        if self.is_main:
            responses, hit = cached_responses(self.models.teacher, prompts, **kwargs)
            if self.progress:
                print(
                    f"[kd-train] {split}: {len(responses)} teacher responses ({kind}) "
                    f"{'from cache' if hit else 'generated and cached'}",
                    file=sys.stderr,
                )
        barrier(self.world)
        if not self.is_main:
            responses, hit = cached_responses(self.models.teacher, prompts, **kwargs)
        self._responses[key] = responses
        return responses

    def references(self, split: str) -> dict[str, list[int]]:
        """The teacher's greedy responses for ``split`` (cached on disk)."""
        return self._teacher_responses(split, do_sample=False, temperature=1.0, seed=0)

    def teacher_samples(self, split: str, *, temperature: float, seed: int) -> dict[str, list[int]]:
        """Responses sampled from the teacher for ``split`` (cached on disk)."""
        return self._teacher_responses(split, do_sample=True, temperature=temperature, seed=seed)

    def examples(self, split: str, responses: dict[str, list[int]] | None = None) -> list[Example]:
        """Prompt + response + EOS examples (prompt masked); default responses: the references."""
        if responses is None and split in self._examples:
            return self._examples[split]
        resp = self.references(split) if responses is None else responses
        ex = [
            build_example(self.prompt_ids[p.id], resp[p.id], self.eos_id)
            for p in self.splits[split]
        ]
        if responses is None:
            self._examples[split] = ex
        return ex

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def offline_batch(self, step: int) -> dict[str, torch.Tensor]:
        idx = batch_indices(
            len(self.train_examples),
            step,
            self.cfg.batch_size,
            self.cfg.seed,
            self.rank,
            self.world,
        )
        batch = collate([self.train_examples[i] for i in idx], self.pad_id)
        batch["example_index"] = torch.tensor(idx)  # which training examples (teacher caches)
        return self.to_device(batch)

    def lm_block_len(self) -> int:
        """Pre-training blocks are as long as the longest training example: prompt (cut to
        ``--max-prompt-tokens``) + response (``--max-new-tokens``) + EOS."""
        return self.cfg.max_prompt_tokens + self.cfg.max_new_tokens + 1

    def lm_batch(self, step: int) -> dict[str, torch.Tensor]:
        """This rank's ``--batch-size`` pre-training blocks of ``--lm-data`` for ``step`` (the file is
        read and tokenized on first use); the blocks are visited in seeded epochs, as training
        examples are (``batch_indices``), so a resumed run sees the same blocks."""
        if self._lm_blocks is None:
            text = Path(self.cfg.lm_data).read_text(encoding="utf-8")
            self._lm_blocks = lm_blocks(self.tokenizer, text, self.lm_block_len(), self.eos_id)
            if not self._lm_blocks:
                raise ValueError(f"--lm-data {self.cfg.lm_data!r} holds no text to train on")
        idx = batch_indices(
            len(self._lm_blocks), step, self.cfg.batch_size, self.cfg.seed, self.rank, self.world
        )
        return self.to_device(collate([self._lm_blocks[i] for i in idx], self.pad_id))


def head(model, batch: dict[str, torch.Tensor]) -> Head:
    """The model's final hidden states for positions 0 … T−2 (each predicts the next token), its lm_head
    and logit scale / softcap, all from ``kd_kernels.hf`` (``head_inputs``): the losses on them equal the
    losses on the model's own ``.logits``. ``model`` may be a ``HiddenStates`` (the FSDP2-sharded
    teacher)."""
    if isinstance(model, HiddenStates):
        h = model(batch["input_ids"], batch["attention_mask"])
        return Head(h[:, :-1], *hf.lm_head(model.model))
    x = hf.head_inputs(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return Head(x.hidden[:, :-1], x.weight, x.bias, x.logit_scale, x.softcap)
