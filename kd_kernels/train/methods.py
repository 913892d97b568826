"""Training methods, chosen by name (``kd-train METHOD``).

A method decides two things: which responses the student trains on (``train_responses``) and the loss of
a batch (``loss``). Methods that train on their own samples (MiniLLM, DistiLLM, a later issue) also
override ``batch`` to produce on-policy data; the trainer only calls these three hooks, so a new method is
one class with ``@register("name")``.
"""

from __future__ import annotations

import math
import random

import torch

from .data import Example, batch_indices, build_example, collate, shift_targets
from .distillm import GENERATE, SOURCES, ReplayBuffer, ThresholdSchedule, choose_source
from .losses import Head, ce_loss, kd_mix_loss, sparse_mix_loss
from .minillm import (
    importance_log_weights,
    minillm_loss,
    mixed_rollouts,
    normalized_returns,
    token_rewards,
    whiten,
)
from .run import Run, head

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

    def state_dict(self) -> dict:
        """Method state saved in checkpoints (e.g. DistiLLM's buffer and threshold)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state


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
        cfg = run.cfg
        if cfg.teacher_cache:  # every step's batch is from the cached responses: no teacher forward
            return _cached_teacher_loss(s, batch, targets, mask, run)
        with torch.no_grad():
            t = head(teacher, batch)
        return kd_mix_loss(s, t, targets, mask, ratio=cfg.kd_ratio, temperature=cfg.temperature,
                           chunk_size=cfg.chunk_size, backend=cfg.backend)


@register("seqkd")
class SeqKD(WordKD):
    """The KD mix on responses sampled from the teacher (temperature ``--seqkd-temperature``), cached.
    ``--kd-ratio 0`` gives classic sequence-level KD (CE only on the teacher's samples)."""

    def train_responses(self, run):
        return run.teacher_samples("train", temperature=run.cfg.seqkd_temperature, seed=run.cfg.seed)


def _cached_teacher_loss(s: Head, batch, targets, mask, run, *, ratio: float | None = None,
                         divergence: str = "forward_kl", alpha: float = 0.1):
    """The KD mix against the run's offline teacher cache (``--teacher-cache``)."""
    from .teacher_cache import cache_for

    cfg = run.cfg
    ids, lps = cache_for(run).lookup(batch["example_index"], targets, mask)
    return sparse_mix_loss(s, ids, lps, targets, mask, ratio=cfg.kd_ratio if ratio is None else ratio,
                           tail=cfg.sparse_tail, temperature=cfg.temperature,
                           chunk_size=cfg.chunk_size, backend=cfg.backend, divergence=divergence,
                           alpha=alpha)


# ------------------------------------------------------------------------------------------- MiniLLM


def _stream_seed(seed: int, *parts: int) -> int:
    """A generator seed from the run seed and integers (round, step, rank ...), stable across runs."""
    h = seed
    for p in parts:
        h = (h * 1_000_003 + p + 1) % (2**63 - 1)
    return h


@register("minillm")
class MiniLLM(Method):
    """MiniLLM: PPO-clipped policy gradient on teacher-mixed rollouts + single-step reverse KL
    (+ 0.5 CE + 0.5 forward KD on the references with ``--minillm-pt``); MATH.md "MiniLLM".

    Steps come in rounds: a round samples ``--minillm-rollouts`` responses (prompts and sampling seeds
    are a function of (seed, round, rank)), scores them once with the round's starting student
    (``q_old``) and the teacher, and then takes ``--minillm-ppo-epochs`` shuffled passes over them in
    minibatches of ``--batch-size``, one optimizer step each. Resuming mid-round regenerates that
    round with the resumed student (its rollouts then differ from an uninterrupted run's)."""

    def __init__(self) -> None:
        self._round: tuple[int, list[dict[str, torch.Tensor]], dict[str, float]] | None = None

    @staticmethod
    def steps_per_round(cfg) -> int:
        return cfg.minillm_ppo_epochs * math.ceil(cfg.minillm_rollouts / cfg.batch_size)

    def batch(self, run, step):
        cfg = run.cfg
        rnd, k = divmod(step, self.steps_per_round(cfg))
        if self._round is None or self._round[0] != rnd:
            self._round = (rnd, *self.make_round(run, rnd))
        b = dict(self._round[1][k])
        if cfg.minillm_pt:
            b |= {"pt_" + key: v for key, v in run.offline_batch(step).items()}
        return b

    @torch.no_grad()
    def make_round(self, run, rnd: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, float]]:
        """Sample, score and cut one round into its minibatches (already in training order)."""
        cfg = run.cfg
        student, teacher = run.models.student, run.models.teacher
        _no_dropout(student)  # MiniLLM trains without dropout: q_old and q_θ are the same function
        train_prompts = run.split_prompts("train")
        idx = batch_indices(len(train_prompts), rnd, cfg.minillm_rollouts, cfg.seed, run.rank,
                            run.world)
        prompts = [run.prompt_ids[train_prompts[i].id] for i in idx]
        gen = torch.Generator().manual_seed(_stream_seed(cfg.seed, rnd, run.rank))
        rollouts = []
        for start in range(0, len(prompts), cfg.gen_batch_size):
            rollouts += mixed_rollouts(
                student, teacher, prompts[start:start + cfg.gen_batch_size],
                alpha=cfg.minillm_alpha, temperature=cfg.minillm_temperature,
                top_k=cfg.minillm_top_k, top_p=cfg.minillm_top_p,
                max_new_tokens=cfg.max_new_tokens, eos_id=run.eos_id, pad_id=run.pad_id,
                generator=gen, device=run.device)
        examples = [Example(p + r.tokens, [-100] * len(p) + r.tokens) for p, r in zip(prompts, rollouts)]
        data = run.to_device(collate(examples, run.pad_id))
        targets, mask = shift_targets(data["labels"])
        mix = torch.zeros(mask.shape, dtype=torch.float32)
        for i, r in enumerate(rollouts):
            pos = mask[i].nonzero().squeeze(1).cpu()
            mix[i, pos] = torch.tensor(r.mix_logp, dtype=torch.float32)
        mix = mix.to(run.device)
        old = torch.zeros_like(mix)
        tlp = torch.zeros_like(mix)
        was_training = student.training
        student.eval()
        for start in range(0, len(examples), cfg.batch_size):
            sl = slice(start, start + cfg.batch_size)
            sub = {k: v[sl] for k, v in data.items()}
            tg, m = targets[sl], mask[sl]
            safe = torch.where(m, tg, torch.zeros_like(tg))
            for model, dst in ((student, old), (teacher, tlp)):
                h = head(model, sub)
                dst[sl] = _logprobs(h, safe, m, cfg)
        student.train(was_training)
        rewards = token_rewards(tlp, old, mask)
        adv = whiten(normalized_returns(rewards, mask, cfg.minillm_gamma), mask)
        log_w = importance_log_weights(old, mix, mask)
        rows = {**data, "targets": targets, "mask": mask, "old_logp": old, "log_w": log_w,
                "adv": adv}
        n = int(mask.sum())
        stats = {"reward": float(rewards.sum()) / max(n, 1),
                 "response_len": n / max(len(examples), 1)}
        order: list[int] = []
        for epoch in range(cfg.minillm_ppo_epochs):
            g = torch.Generator().manual_seed(_stream_seed(cfg.seed, rnd, run.rank, epoch + 7))
            perm = torch.randperm(len(examples), generator=g).tolist()
            order += [perm[i:i + cfg.batch_size] for i in range(0, len(perm), cfg.batch_size)]
        minibatches = []
        for group in order:
            sel = torch.tensor(group, device=run.device)
            mb = {k: v.index_select(0, sel) for k, v in rows.items()}
            width = int(mb["attention_mask"].sum(1).max())  # trim right padding
            mb = {k: v[:, :width] if k in ("input_ids", "attention_mask", "labels") else v[:, :width - 1]
                  for k, v in mb.items()}
            minibatches.append(mb)
        return minibatches, stats

    def loss(self, student, teacher, batch, run):
        cfg = run.cfg
        s = head(student, batch)
        with torch.no_grad():
            t = head(teacher, batch)
        loss, parts = minillm_loss(
            s, t, batch["targets"], batch["mask"], batch["old_logp"], batch["log_w"], batch["adv"],
            clip=cfg.minillm_clip, rollout_temperature=cfg.minillm_temperature,
            temperature=cfg.temperature, chunk_size=cfg.chunk_size or None, backend=cfg.backend)
        if cfg.minillm_pt:
            pt = {k[3:]: v for k, v in batch.items() if k.startswith("pt_")}
            pt_targets, pt_mask = shift_targets(pt["labels"])
            ps = head(student, pt)
            with torch.no_grad():
                pt_t = head(teacher, pt)
            pt_loss, pt_parts = kd_mix_loss(ps, pt_t, pt_targets, pt_mask, ratio=0.5,
                                            temperature=cfg.temperature,
                                            chunk_size=cfg.chunk_size, backend=cfg.backend)
            loss = loss + pt_loss
            parts |= {"pt": float(pt_loss.detach()), "ce": pt_parts["ce"], "kd": pt_parts["kd"]}
        if self._round is not None:
            parts |= self._round[2]
        return loss, parts


def _no_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def _logprobs(h: Head, tokens: torch.Tensor, mask: torch.Tensor, cfg) -> torch.Tensor:
    import kd_kernels

    return kd_kernels.fused_linear_logprobs(h.hidden, h.weight, tokens, bias=h.bias,
                                            temperature=cfg.minillm_temperature, mask=mask,
                                            chunk_size=cfg.chunk_size or None)


# ------------------------------------------------------------------------------------------ DistiLLM


@torch.no_grad()
def valid_ce(run) -> float:
    """The student's token-mean CE on the validation references (DistiLLM's schedule signal)."""
    examples = run.examples("valid")
    if not examples:
        raise ValueError("distillm needs a non-empty validation split; raise --valid-frac or "
                         "--max-prompts")
    student = run.models.student
    was_training = student.training
    student.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), run.cfg.batch_size):
        batch = run.to_device(collate(examples[start:start + run.cfg.batch_size], run.pad_id))
        targets, mask = shift_targets(batch["labels"])
        n = int(mask.sum())
        total += float(ce_loss(head(student, batch), targets, mask, chunk_size=run.cfg.chunk_size)) * n
        tokens += n
    student.train(was_training)
    return total / max(tokens, 1)


@register("distillm")
class DistiLLM(Method):
    """DistiLLM: skew reverse (or forward) KL, α = 0.1, on batches from the adaptive off-policy
    schedule (fresh student samples, replayed samples or the references); MATH.md "DistiLLM".

    Every rank draws the same ``r`` and measures the same validation CE, so the schedule agrees
    across processes; generated samples and replays are per rank."""

    def __init__(self) -> None:
        self.schedule = ThresholdSchedule()
        self.buffer: ReplayBuffer | None = None
        self.checked_step = -1
        self._info: dict[str, float] = {}

    def check_every(self, run) -> int:
        cfg = run.cfg
        if cfg.distillm_check_every > 0:
            return cfg.distillm_check_every
        return max(1, math.ceil(len(run.train_examples) / (cfg.batch_size * run.world)))

    def batch(self, run, step):
        cfg = run.cfg
        if self.buffer is None:
            self.buffer = ReplayBuffer(cfg.distillm_capacity)
        if step % self.check_every(run) == 0 and self.checked_step != step:
            ce = valid_ce(run)
            self.schedule.update(ce)
            self.checked_step = step
            self._info["valid_ce_check"] = ce
        r = random.Random(_stream_seed(cfg.seed, step)).random()
        source = choose_source(r, self.schedule.threshold, step, cfg.steps, self.buffer.full)
        if source == GENERATE:
            from .generate import generate

            idx = batch_indices(len(run.train_examples), step, cfg.batch_size, cfg.seed, run.rank,
                                run.world)
            train_prompts = run.split_prompts("train")
            prompts = [run.prompt_ids[train_prompts[i].id] for i in idx]
            samples = generate(run.models.student, prompts, pad_id=run.pad_id, eos_id=run.eos_id,
                               max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=1.0,
                               seed=_stream_seed(cfg.seed, step, run.rank), batch_size=cfg.gen_batch_size,
                               device=run.device, progress=False)
            examples = [build_example(p, s, run.eos_id) for p, s in zip(prompts, samples)]
            self.buffer.push(examples)
            batch = run.to_device(collate(examples, run.pad_id))
        elif source == "replay":
            rng = random.Random(_stream_seed(cfg.seed, step, run.rank, 1))
            batch = run.to_device(collate(self.buffer.sample(cfg.batch_size, rng), run.pad_id))
        else:
            batch = run.offline_batch(step)
        self._info |= {"threshold": self.schedule.threshold, "source": float(SOURCES.index(source)),
                       "buffer": float(len(self.buffer))}
        return batch

    def loss(self, student, teacher, batch, run):
        cfg = run.cfg
        targets, mask = shift_targets(batch["labels"])
        s = head(student, batch)
        div = "skew_reverse_kl" if cfg.distillm_loss == "srkl" else "skew_forward_kl"
        if cfg.teacher_cache and "example_index" in batch:
            # a batch of references comes from the cache; fresh / replayed student samples are not
            # in it and still take the teacher's forward pass below
            loss, parts = _cached_teacher_loss(s, batch, targets, mask, run, ratio=1.0 - cfg.distillm_ce,
                                               divergence=div, alpha=cfg.distillm_alpha)
            return loss, parts | self._info
        with torch.no_grad():
            t = head(teacher, batch)
        loss, parts = kd_mix_loss(s, t, targets, mask, ratio=1.0 - cfg.distillm_ce,
                                  temperature=cfg.temperature, chunk_size=cfg.chunk_size,
                                  backend=cfg.backend, divergence=div, alpha=cfg.distillm_alpha)
        return loss, parts | self._info

    def state_dict(self):
        buf = self.buffer.state_dict() if self.buffer is not None else None
        if buf is not None:
            buf["items"] = [(e.input_ids, e.labels) for e in buf["items"]]
        return {"schedule": self.schedule.state_dict(), "buffer": buf,
                "checked_step": self.checked_step}

    def load_state_dict(self, state):
        if not state:
            return
        self.schedule.load_state_dict(state["schedule"])
        self.checked_step = int(state["checked_step"])
        if state["buffer"] is not None:
            buf = dict(state["buffer"])
            buf["items"] = [Example(list(a), list(b)) for a, b in buf["items"]]
            self.buffer = ReplayBuffer(buf["capacity"])
            self.buffer.load_state_dict(buf)
