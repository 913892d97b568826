"""What a training run holds, below the loop, the methods and the evaluation (imports run one way:
``run`` ← ``methods`` / ``evaluate`` ← ``trainer``).

``Run`` holds the models, the tokenized data, the cached teacher responses and the distributed context;
``head`` turns a model and a batch into the final hidden states and lm_head the fused losses take.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import TrainConfig
from .data import (
    Example,
    batch_indices,
    build_example,
    collate,
    load_prompts,
    prompt_token_ids,
    split_prompts,
)
from .generate import cached_responses
from .losses import Head
from .models import Models, final_hidden, load_models, output_head

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
        self.prompt_ids = {p.id: prompt_token_ids(tok, p.text, cfg.max_prompt_tokens) for p in prompts}
        self._responses: dict[tuple, dict[str, list[int]]] = {}
        self._examples: dict[str, list[Example]] = {}
        self.train_examples: list[Example] = []

    # --- data -------------------------------------------------------------------------------------

    def split_prompts(self, split: str):
        return self.splits[split]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _teacher_responses(self, split: str, *, do_sample: bool, temperature: float, seed: int
                           ) -> dict[str, list[int]]:
        key = (split, do_sample, temperature, seed)
        if key in self._responses:
            return self._responses[key]
        prompts = [(p.id, self.prompt_ids[p.id]) for p in self.splits[split]]
        kind = f"sampled T={temperature} seed={seed}" if do_sample else "greedy"
        kwargs = {
            "teacher_id": self.models.teacher_id, "cache_dir": self.cfg.cache_dir,
            "pad_id": self.pad_id, "eos_id": self.eos_id, "max_new_tokens": self.cfg.max_new_tokens,
            "do_sample": do_sample, "temperature": temperature, "seed": seed,
            "batch_size": self.cfg.gen_batch_size, "device": self.device, "progress": self.progress,
            "desc": f"teacher {kind} {split}",
        }
        # rank 0 generates and writes the cache; the others then read the same file
        if self.is_main:
            responses, hit = cached_responses(self.models.teacher, prompts, **kwargs)
            if self.progress:
                print(f"[kd-train] {split}: {len(responses)} teacher responses ({kind}) "
                      f"{'from cache' if hit else 'generated and cached'}", file=sys.stderr)
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
        ex = [build_example(self.prompt_ids[p.id], resp[p.id], self.eos_id) for p in self.splits[split]]
        if responses is None:
            self._examples[split] = ex
        return ex

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def offline_batch(self, step: int) -> dict[str, torch.Tensor]:
        idx = batch_indices(len(self.train_examples), step, self.cfg.batch_size, self.cfg.seed,
                            self.rank, self.world)
        batch = collate([self.train_examples[i] for i in idx], self.pad_id)
        batch["example_index"] = torch.tensor(idx)  # which training examples (teacher caches)
        return self.to_device(batch)


def head(model, batch: dict[str, torch.Tensor]) -> Head:
    """The model's final hidden states for positions 0 … T−2 (each predicts the next token) and its
    lm_head."""
    h = final_hidden(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
    w, b = output_head(model)
    return Head(h, w, b)
