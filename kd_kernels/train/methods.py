"""Training methods, chosen by name (``kd-train METHOD``).

A method decides two things: which responses the student trains on (``train_responses``) and the loss of
a batch (``loss``). Methods that train on their own samples (MiniLLM, DistiLLM, a later issue) also
override ``batch`` to produce on-policy data; the trainer only calls these three hooks, so a new method is
one class with ``@register("name")``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .data import shift_targets
from .losses import Head, ce_loss, kd_mix_loss
from .models import final_hidden, output_head

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Run

METHODS: dict[str, type[Method]] = {}


def register(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method {name!r} is unknown; use one of {sorted(METHODS)}")
    return METHODS[name]()


def head(model, batch: dict[str, torch.Tensor]) -> Head:
    """The model's final hidden states for positions 0 … T−2 (each predicts the next token) and its
    lm_head."""
    h = final_hidden(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
    w, b = output_head(model)
    return Head(h, w, b)


class Method:
    name = ""

    def train_responses(self, run: Run) -> dict[str, list[int]]:
        """Response token ids per train-prompt id; default: the teacher's greedy references."""
        return run.references("train")

    def batch(self, run: Run, step: int) -> dict[str, torch.Tensor]:
        """This rank's batch for ``step`` (off-policy: drawn from the fixed training examples)."""
        return run.offline_batch(step)

    def loss(self, student, teacher, batch: dict[str, torch.Tensor], run: Run
             ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


@register("sft")
class SFT(Method):
    """Cross-entropy on the teacher's reference responses (prompt tokens masked)."""

    def loss(self, student, teacher, batch, run):
        targets, mask = shift_targets(batch["labels"])
        ce = ce_loss(head(student, batch), targets, mask, chunk_size=run.cfg.chunk_size)
        return ce, {"ce": float(ce.detach())}


@register("kd")
class WordKD(Method):
    """Word-level KD (MiniLLM's baseline): ``(1 − r)·CE + r·forward KL`` on the references."""

    def loss(self, student, teacher, batch, run):
        targets, mask = shift_targets(batch["labels"])
        s = head(student, batch)
        with torch.no_grad():
            t = head(teacher, batch)
        cfg = run.cfg
        return kd_mix_loss(s, t, targets, mask, ratio=cfg.kd_ratio, temperature=cfg.temperature,
                           chunk_size=cfg.chunk_size, backend=cfg.backend)


@register("seqkd")
class SeqKD(WordKD):
    """The KD mix on responses sampled from the teacher (temperature ``--seqkd-temperature``), cached.
    ``--kd-ratio 0`` gives classic sequence-level KD (CE only on the teacher's samples)."""

    def train_responses(self, run):
        return run.teacher_samples("train", temperature=run.cfg.seqkd_temperature, seed=run.cfg.seed)
