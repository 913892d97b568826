"""Training methods, chosen by name (``kd-train METHOD``).

A method decides two things: which responses the student trains on (``train_responses``) and the loss of
a batch (``loss``). Methods that train on their own samples (MiniLLM, DistiLLM, GKD) also
override ``batch`` to produce on-policy data; the trainer only calls these three hooks (through
``step_batch`` / ``step_loss``, which add the optional pre-training CE), so a new method is one class
with ``@register("name")``. Its ``terms`` declare the metrics.jsonl keys its loss parts and state are
logged under, which is what ``loss.png`` draws (``plots.py``).
"""

from __future__ import annotations

import random
import re
import time

import torch

from kd_kernels import hf

from . import distillm
from .data import Example, batch_indices, build_example, collate, shift_targets
from .distillm import GENERATE, SOURCES, ReplayBuffer, ThresholdSchedule, choose_source
from .gkd import full_loss, sampled_token_loss
from .losses import Head, ce_loss, kd_mix_loss, sparse_mix_loss
from .minillm import (
    importance_log_weights,
    minillm_loss,
    mixed_rollouts,
    normalized_returns,
    token_rewards,
    whiten,
    whiten_block,
)
from .plots import EVAL, EVAL_SERIES, LM_TERM, STATE, TOTAL, PlotData, Series, plot_data
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


def method_plot(rows: list[dict], name: str) -> PlotData:
    """What ``loss.png`` shows of a run of method ``name`` (:func:`plots.plot_data`): the total loss,
    the method's declared ``terms`` (with the pre-training CE where it takes an ``--*-lm-coef``) and
    the evaluation metrics; an unregistered method gets the common curves."""
    cls = METHODS.get(name, Method)
    lm = (LM_TERM,) if cls.lm_coef_field else ()
    return plot_data(rows, name, (TOTAL, *cls.terms, *lm, *EVAL_SERIES))


def method_summaries() -> dict[str, str]:
    """Each registered method's one-line description (its docstring's first sentence)."""
    out = {}
    for name in sorted(METHODS):
        text = " ".join((METHODS[name].__doc__ or "").split("\n\n")[0].split()).replace("``", "")
        out[name] = re.split(r"(?<=\.) |; ", text, maxsplit=1)[0]
    return out


class Method:
    name = ""
    # the metrics.jsonl keys of this method's loss terms and per-step state, drawn in loss.png
    terms: tuple[Series, ...] = ()
    # the config field weighting the pre-training CE on --lm-data (None: the method has no such term)
    lm_coef_field: str | None = None

    def lm_coef(self, cfg) -> float:
        return getattr(cfg, self.lm_coef_field) if self.lm_coef_field else 0.0

    def step_batch(self, run: Run, step: int) -> dict[str, torch.Tensor]:
        """``batch``, plus this step's pre-training blocks (keys ``lm_*``) when the lm coefficient is
        on."""
        b = self.batch(run, step)
        if self.lm_coef(run.cfg) > 0:
            b = dict(b) | {"lm_" + k: v for k, v in run.lm_batch(step).items()}
        return b

    def step_loss(
        self, student, teacher, batch: dict[str, torch.Tensor], run: Run
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``loss`` + ``coef × CE`` of the student on the batch's pre-training blocks (logged as
        ``lm``, unweighted) when the lm coefficient is on."""
        loss, parts = self.loss(student, teacher, batch, run)
        coef = self.lm_coef(run.cfg)
        if coef > 0:
            lm = {k[3:]: v for k, v in batch.items() if k.startswith("lm_")}
            targets, mask = shift_targets(lm["labels"])
            ce = ce_loss(head(student, lm), targets, mask, chunk_size=run.cfg.chunk_size)
            loss = loss + coef * ce
            parts = parts | {"lm": float(ce.detach())}
        return loss, parts

    def train_responses(self, run: Run) -> dict[str, list[int]]:
        """Response token ids per train-prompt id; default: the teacher's greedy references."""
        return run.references("train")

    def batch(self, run: Run, step: int) -> dict[str, torch.Tensor]:
        """This rank's batch for ``step`` (off-policy: drawn from the fixed training examples)."""
        return run.offline_batch(step)

    def loss(
        self, student, teacher, batch: dict[str, torch.Tensor], run: Run
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

    terms = (Series("ce", "CE"),)

    def loss(self, student, teacher, batch, run):
        targets, mask = shift_targets(batch["labels"])
        ce = ce_loss(head(student, batch), targets, mask, chunk_size=run.cfg.chunk_size)
        return ce, {"ce": float(ce.detach())}


@register("kd")
class WordKD(Method):
    """Word-level KD (MiniLLM's baseline): ``(1 − r)·CE + r·forward KL`` on the references."""

    terms = (Series("ce", "CE (weight 1 − r)"), Series("kd", "forward KL (weight r)"))

    def loss(self, student, teacher, batch, run):
        targets, mask = shift_targets(batch["labels"])
        s = head(student, batch)
        cfg = run.cfg
        if cfg.teacher_cache:  # every step's batch is from the cached responses: no teacher forward
            return _cached_teacher_loss(s, batch, targets, mask, run)
        with torch.no_grad():
            t = head(teacher, batch)
        return kd_mix_loss(
            s,
            t,
            targets,
            mask,
            ratio=cfg.kd_ratio,
            temperature=cfg.temperature,
            chunk_size=cfg.chunk_size,
            backend=cfg.backend,
        )


@register("seqkd")
class SeqKD(WordKD):
    """The KD mix on responses sampled from the teacher (temperature ``--seqkd-temperature``), cached.
    ``--kd-ratio 0`` gives classic sequence-level KD (CE only on the teacher's samples)."""

    def train_responses(self, run):
        return run.teacher_samples(
            "train", temperature=run.cfg.seqkd_temperature, seed=run.cfg.seed
        )


def _cached_teacher_loss(
    s: Head,
    batch,
    targets,
    mask,
    run,
    *,
    ratio: float | None = None,
    divergence: str = "forward_kl",
    alpha: float = 0.1,
):
    """The KD mix against the run's offline teacher cache (``--teacher-cache``)."""
    from .teacher_cache import cache_for

    cfg = run.cfg
    ids, lps = cache_for(run).lookup(batch["example_index"], targets, mask)
    return sparse_mix_loss(
        s,
        ids,
        lps,
        targets,
        mask,
        ratio=cfg.kd_ratio if ratio is None else ratio,
        tail=cfg.sparse_tail,
        temperature=cfg.temperature,
        chunk_size=cfg.chunk_size,
        backend=cfg.backend,
        divergence=divergence,
        alpha=alpha,
    )


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
    minibatches of ``--batch-size``, one optimizer step each (a last, partial minibatch is dropped,
    as LMOps's ``drop_last=True``). Advantages are whitened as the official
    code does (``--minillm-whiten block``): per minibatch, over its padded ``(B × --max-new-tokens)``
    response block, moments summed over ranks; ``valid`` whitens the valid tokens of this process's
    round instead. The round in progress is saved in the checkpoint, so resuming mid-round continues
    it exactly (on one process; under torchrun the other ranks regenerate theirs)."""

    terms = (
        Series("pg", "policy gradient (PPO-clipped)"),
        Series("single_step", "single-step reverse KL"),
        Series("pt", "pre-training term 0.5 CE + 0.5 KD (--minillm-pt)"),
        Series("reward", "round mean reward", STATE),
        Series("clip_frac", "clipped fraction", STATE),
    )
    lm_coef_field = "minillm_lm_coef"

    def __init__(self) -> None:
        self._round: tuple[int, list[dict[str, torch.Tensor]], dict[str, float]] | None = None
        self._round_rank = 0

    @staticmethod
    def steps_per_round(cfg) -> int:
        """``epochs × floor(rollouts / batch)``: an epoch's last, partial minibatch is dropped."""
        if cfg.minillm_rollouts < cfg.batch_size:
            raise ValueError(
                f"--minillm-rollouts={cfg.minillm_rollouts} is less than --batch-size="
                f"{cfg.batch_size}: a round would hold no full PPO minibatch; raise "
                "--minillm-rollouts or lower --batch-size"
            )
        return cfg.minillm_ppo_epochs * (cfg.minillm_rollouts // cfg.batch_size)

    @staticmethod
    def epoch_minibatches(perm: list[int], batch_size: int) -> list[list[int]]:
        """One PPO epoch's shuffled rollouts cut into minibatches as LMOps's loader does
        (``drop_last=True``: a last, partial minibatch is left out of this epoch)."""
        full = len(perm) - len(perm) % batch_size
        return [perm[i : i + batch_size] for i in range(0, full, batch_size)]

    def batch(self, run, step):
        cfg = run.cfg
        rnd, k = divmod(step, self.steps_per_round(cfg))
        _no_dropout(run.models.student)  # MiniLLM trains without dropout: q_old and q_θ agree
        if self._round is None or self._round[0] != rnd or self._round_rank != run.rank:
            self._round = (rnd, *self.make_round(run, rnd))
            self._round_rank = run.rank
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
        idx = batch_indices(
            len(train_prompts), rnd, cfg.minillm_rollouts, cfg.seed, run.rank, run.world
        )
        prompts = [run.prompt_ids[train_prompts[i].id] for i in idx]
        gen = torch.Generator().manual_seed(_stream_seed(cfg.seed, rnd, run.rank))
        t_rollout = time.perf_counter()
        rollouts = []
        for start in range(0, len(prompts), cfg.gen_batch_size):
            rollouts += mixed_rollouts(
                student,
                teacher,
                prompts[start : start + cfg.gen_batch_size],
                alpha=cfg.minillm_alpha,
                temperature=cfg.minillm_temperature,
                top_k=cfg.minillm_top_k,
                top_p=cfg.minillm_top_p,
                max_new_tokens=cfg.max_new_tokens,
                eos_id=run.eos_id,
                pad_id=run.pad_id,
                generator=gen,
                device=run.device,
            )
        examples = [
            Example(p + r.tokens, [-100] * len(p) + r.tokens) for p, r in zip(prompts, rollouts)
        ]
        data = run.to_device(collate(examples, run.pad_id))
        targets, mask = shift_targets(data["labels"])
        mix = torch.zeros(mask.shape, dtype=torch.float32)
        for i, r in enumerate(rollouts):
            pos = mask[i].nonzero().squeeze(1).cpu()
            mix[i, pos] = torch.tensor(r.mix_logp, dtype=torch.float32)
        mix = mix.to(run.device)
        old = torch.zeros_like(mix)
        tlp = torch.zeros_like(mix)
        t_hidden = None  # the teacher's final hidden states, kept for the single-step term
        was_training = student.training
        student.eval()
        for start in range(0, len(examples), cfg.batch_size):
            sl = slice(start, start + cfg.batch_size)
            sub = {k: v[sl] for k, v in data.items()}
            tg, m = targets[sl], mask[sl]
            safe = torch.where(m, tg, torch.zeros_like(tg))
            for model, dst in ((student, old), (teacher, tlp)):
                h = head(model, sub)
                # the student at the rollout temperature, the teacher's reward at temperature 1
                temp = cfg.minillm_temperature if model is student else 1.0
                dst[sl] = _logprobs(h, safe, m, cfg, temp)
                if model is teacher:
                    if t_hidden is None:
                        t_hidden = h.hidden.new_empty((len(examples), *h.hidden.shape[1:]))
                    t_hidden[sl] = h.hidden
        student.train(was_training)
        rewards = token_rewards(tlp, old, mask)
        returns = normalized_returns(rewards, mask, cfg.minillm_gamma)
        log_w = importance_log_weights(old, mix, mask)
        rows = {
            **data,
            "targets": targets,
            "mask": mask,
            "old_logp": old,
            "log_w": log_w,
            "adv": whiten(returns, mask) if cfg.minillm_whiten == "valid" else returns,
            "teacher_hidden": t_hidden,
        }
        n = int(mask.sum())
        stats = {
            "reward": float(rewards.sum()) / max(n, 1),
            "response_len": n / max(len(examples), 1),
            "round_s": time.perf_counter() - t_rollout,
        }  # sampling + scoring this round
        order: list[int] = []
        for epoch in range(cfg.minillm_ppo_epochs):
            g = torch.Generator().manual_seed(_stream_seed(cfg.seed, rnd, run.rank, epoch + 7))
            perm = torch.randperm(len(examples), generator=g).tolist()
            order += self.epoch_minibatches(perm, cfg.batch_size)
        minibatches = []
        for group in order:
            sel = torch.tensor(group, device=run.device)
            mb = {k: v.index_select(0, sel) for k, v in rows.items()}
            if cfg.minillm_whiten == "block":  # official: per minibatch, the padded block
                mb["adv"] = whiten_block(
                    mb["adv"], mb["mask"], cfg.max_new_tokens, _sum_over_ranks(run.world)
                )
            width = int(mb["attention_mask"].sum(1).max())  # trim right padding
            mb = {
                k: v[:, :width]
                if k in ("input_ids", "attention_mask", "labels")
                else v[:, : width - 1]
                for k, v in mb.items()
            }
            minibatches.append(mb)
        return minibatches, stats

    def state_dict(self):
        """The round in progress (its minibatches, on the CPU), so a resume continues it exactly."""
        if self._round is None:
            return {}
        rnd, minibatches, stats = self._round
        # the teacher's hidden states are not saved (large): the loss recomputes them after a resume
        return {
            "round": rnd,
            "rank": self._round_rank,
            "stats": dict(stats),
            "minibatches": [
                {k: v.detach().cpu() for k, v in mb.items() if k != "teacher_hidden"}
                for mb in minibatches
            ],
        }

    def load_state_dict(self, state):
        if state:
            self._round = (int(state["round"]), list(state["minibatches"]), dict(state["stats"]))
            self._round_rank = int(state["rank"])

    def loss(self, student, teacher, batch, run):
        cfg = run.cfg
        s = head(student, batch)
        if "teacher_hidden" in batch:  # from the round's scoring pass: no teacher forward per step
            t = Head(batch["teacher_hidden"], *hf.lm_head(teacher))
        else:
            with torch.no_grad():
                t = head(teacher, batch)
        loss, parts = minillm_loss(
            s,
            t,
            batch["targets"],
            batch["mask"],
            batch["old_logp"],
            batch["log_w"],
            batch["adv"],
            clip=cfg.minillm_clip,
            rollout_temperature=cfg.minillm_temperature,
            chunk_size=cfg.chunk_size or None,
            backend=cfg.backend,
        )
        if cfg.minillm_pt:
            pt = {k[3:]: v for k, v in batch.items() if k.startswith("pt_")}
            pt_targets, pt_mask = shift_targets(pt["labels"])
            ps = head(student, pt)
            with torch.no_grad():
                pt_t = head(teacher, pt)
            pt_loss, pt_parts = kd_mix_loss(
                ps,
                pt_t,
                pt_targets,
                pt_mask,
                ratio=0.5,
                temperature=cfg.temperature,
                chunk_size=cfg.chunk_size,
                backend=cfg.backend,
            )
            loss = loss + pt_loss
            parts |= {
                "pt": float(pt_loss.detach()),
                "pt_ce": pt_parts["ce"],
                "pt_kd": pt_parts["kd"],
            }
        if self._round is not None:
            parts |= self._round[2]
        return loss, parts


def _no_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def _logprobs(
    h: Head, tokens: torch.Tensor, mask: torch.Tensor, cfg, temperature: float
) -> torch.Tensor:
    import kd_kernels

    return kd_kernels.fused_linear_logprobs(
        h.hidden,
        h.weight,
        tokens,
        bias=h.bias,
        temperature=temperature,
        mask=mask,
        chunk_size=cfg.chunk_size or None,
        **h.transform(),
    )


def _sum_over_ranks(world: int):
    """A function summing a small tensor over the data-parallel ranks (``None`` on one process)."""
    if world == 1:
        return None

    def reduce(t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dev = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        x = t.to(dev)
        dist.all_reduce(x)
        return x.to(t.device)

    return reduce


def _global_token_share(mask: torch.Tensor, world: int) -> float:
    """``world · n_rank / n_all``: turns this rank's token mean into its share of the token mean
    over all ranks' tokens once DDP averages the gradients (1.0 on one process; 0 if no rank has
    a token)."""
    reduce = _sum_over_ranks(world)
    if reduce is None:
        return 1.0
    n_rank = mask.sum().to(torch.float64).reshape(1).cpu()
    n_all = float(reduce(n_rank.clone()))
    return world * float(n_rank) / n_all if n_all > 0 else 0.0


# ----------------------------------------------------------------------------------------------- GKD


@register("gkd")
class GKD(Method):
    """GKD (on-policy distillation as TRL's GKD trainer runs it); MATH.md "GKD / on-policy distillation".

    Each step draws ``u ~ U(0, 1)`` from (seed, step), the same on every rank: ``u < --gkd-lambda`` →
    the student samples responses to this step's prompts (HF ``generate`` with the KV cache,
    temperature ``--gkd-temperature``, top-k 0, top-p 1, seeded by (seed, step, rank), no gradient);
    else the training responses (the teacher's greedy references, or its samples at
    ``--gkd-temperature`` with ``--gkd-seq-kd``, cached). Loss: TRL's generalized JSD(``--gkd-beta``)
    over the full vocabulary per response token (``--gkd-estimator full``) or the sampled-token
    reverse-KL policy gradient on the student's samples (``sampled``; off-policy steps then use the
    exact reverse KL). Batches are a function of (seed, step, rank) and the student, so resume is
    exact."""

    terms = (
        Series("kd", "generalized JSD(β) (--gkd-estimator full)"),
        Series("kl_sampled", "sampled reverse-KL estimate (--gkd-estimator sampled)"),
        Series("on_policy", "on-policy step (1: student samples)", STATE, points=True),
    )

    def __init__(self) -> None:
        self._info: dict[str, float] = {}

    def train_responses(self, run):
        if run.cfg.gkd_seq_kd:
            return run.teacher_samples(
                "train", temperature=run.cfg.gkd_temperature, seed=run.cfg.seed
            )
        return run.references("train")

    def batch(self, run, step):
        from .generate import generate

        cfg = run.cfg
        u = random.Random(_stream_seed(cfg.seed, step, 11)).random()
        if u >= cfg.gkd_lambda:
            self._info = {"on_policy": 0.0}
            return run.offline_batch(step)
        idx = batch_indices(
            len(run.train_examples), step, cfg.batch_size, cfg.seed, run.rank, run.world
        )
        train_prompts = run.split_prompts("train")
        prompts = [run.prompt_ids[train_prompts[i].id] for i in idx]
        samples = generate(
            run.models.student,
            prompts,
            pad_id=run.pad_id,
            eos_id=run.eos_id,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=True,
            temperature=cfg.gkd_temperature,
            seed=_stream_seed(cfg.seed, step, run.rank),
            batch_size=cfg.gen_batch_size,
            device=run.device,
            progress=False,
        )
        examples = [build_example(p, y, run.eos_id) for p, y in zip(prompts, samples)]
        for ex, y in zip(examples, samples):
            # a response cut at --max-new-tokens did not sample the EOS build_example appends: as
            # in TRL, only the sampled tokens are targets (either estimator)
            if len(y) >= cfg.max_new_tokens:
                ex.labels[-1] = -100
        self._info = {
            "on_policy": 1.0,
            "response_len": sum(len(y) for y in samples) / max(len(samples), 1),
        }
        return run.to_device(collate(examples, run.pad_id))

    def loss(self, student, teacher, batch, run):
        """At temperature 1 whatever ``--temperature`` (TRL calls its loss without one), normalized
        by the global token count: this rank's token mean × ``world · n_rank / n_all``, so that
        DDP's average over ranks is the token mean over every rank's tokens."""
        cfg = run.cfg
        targets, mask = shift_targets(batch["labels"])
        s = head(student, batch)
        with torch.no_grad():
            t = head(teacher, batch)
        chunk = cfg.chunk_size or None
        if cfg.gkd_estimator == "sampled" and self._info.get("on_policy"):
            loss, parts = sampled_token_loss(
                s, t, targets, mask, sample_temperature=cfg.gkd_temperature, chunk_size=chunk
            )
        else:
            loss = full_loss(s, t, mask, beta=cfg.gkd_beta, chunk_size=chunk, backend=cfg.backend)
            parts = {"kd": float(loss.detach())}
        return loss * _global_token_share(mask, run.world), parts | self._info


# ------------------------------------------------------------------------------------------ DistiLLM


@torch.no_grad()
def valid_ce(run) -> float:
    """The student's CE on the validation references, DistiLLM's schedule signal as the official
    ``evaluate`` computes it: batches of ``VALID_BATCH_SIZE`` (its ``--eval-batch-size``, not
    ``--batch-size``) laid out over ``run.world`` ranks as its ``DistributedSampler`` does
    (:func:`distillm.valid_batches`); per step the mean over ranks of each batch's token-mean CE,
    then
    the mean over steps (not the token mean over the split: a short batch weighs as much as a long
    one). Every rank computes all ranks' batches, so all agree without a collective."""
    examples = run.examples("valid")
    steps = distillm.valid_batches(len(examples), run.world, distillm.VALID_BATCH_SIZE)
    student = run.models.student
    was_training = student.training
    student.eval()
    means = []
    for ranks in steps:
        per_rank = []
        for chosen in ranks:
            batch = run.to_device(collate([examples[i] for i in chosen], run.pad_id))
            targets, mask = shift_targets(batch["labels"])
            per_rank.append(
                float(ce_loss(head(student, batch), targets, mask, chunk_size=run.cfg.chunk_size))
            )
        means.append(sum(per_rank) / len(per_rank))
    student.train(was_training)
    return sum(means) / len(means)


@register("distillm")
class DistiLLM(Method):
    """DistiLLM: skew reverse (or forward) KL, α = 0.1, on batches from the adaptive off-policy
    schedule (fresh student samples, replayed samples or the references); MATH.md "DistiLLM".

    Every rank draws the same ``r`` and measures the same validation CE, so the schedule agrees
    across processes; generated samples and replays are per rank."""

    terms = (
        Series("ce", "CE (weight --distillm-ce)"),
        Series("kd", "skew KL (α)"),
        Series("valid_ce_check", "valid CE (last schedule check)", EVAL),
        Series("source", "source (0 generate, 1 replay, 2 references)", STATE, points=True),
        Series("threshold", "threshold τ", STATE),
    )
    lm_coef_field = "distillm_lm_coef"

    def __init__(self) -> None:
        self.schedule = ThresholdSchedule()
        self.buffer: ReplayBuffer | None = None
        self.checked_step = -1
        self._info: dict[str, float] = {}

    def check_every(self, run) -> int:
        cfg = run.cfg
        if cfg.distillm_check_every > 0:
            return cfg.distillm_check_every
        # the official train_iters_per_epoch: int(N / (batch · world)), its loader dropping the rest
        return max(1, len(run.train_examples) // (cfg.batch_size * run.world))

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

            idx = batch_indices(
                len(run.train_examples), step, cfg.batch_size, cfg.seed, run.rank, run.world
            )
            train_prompts = run.split_prompts("train")
            prompts = [run.prompt_ids[train_prompts[i].id] for i in idx]
            samples = generate(
                run.models.student,
                prompts,
                pad_id=run.pad_id,
                eos_id=run.eos_id,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=True,
                temperature=1.0,
                seed=_stream_seed(cfg.seed, step, run.rank),
                batch_size=cfg.gen_batch_size,
                device=run.device,
                progress=False,
            )
            examples = [build_example(p, s, run.eos_id) for p, s in zip(prompts, samples)]
            self.buffer.push(examples)
            batch = run.to_device(collate(examples, run.pad_id))
        elif source == "replay":
            rng = random.Random(_stream_seed(cfg.seed, step, run.rank, 1))
            batch = run.to_device(collate(self.buffer.sample(cfg.batch_size, rng), run.pad_id))
        else:
            batch = run.offline_batch(step)
        self._info |= {
            "threshold": self.schedule.threshold,
            "source": float(SOURCES.index(source)),
            "buffer": float(len(self.buffer)),
        }
        return batch

    def loss(self, student, teacher, batch, run):
        cfg = run.cfg
        targets, mask = shift_targets(batch["labels"])
        s = head(student, batch)
        div = "skew_reverse_kl" if cfg.distillm_loss == "srkl" else "skew_forward_kl"
        if cfg.teacher_cache and "example_index" in batch:
            # a batch of references comes from the cache; fresh / replayed student samples are not
            # in it and still take the teacher's forward pass below
            loss, parts = _cached_teacher_loss(
                s,
                batch,
                targets,
                mask,
                run,
                ratio=1.0 - cfg.distillm_ce,
                divergence=div,
                alpha=cfg.distillm_alpha,
            )
            return loss, parts | self._info
        with torch.no_grad():
            t = head(teacher, batch)
        loss, parts = kd_mix_loss(
            s,
            t,
            targets,
            mask,
            ratio=1.0 - cfg.distillm_ce,
            temperature=cfg.temperature,
            chunk_size=cfg.chunk_size,
            backend=cfg.backend,
            divergence=div,
            alpha=cfg.distillm_alpha,
        )
        return loss, parts | self._info

    def state_dict(self):
        buf = self.buffer.state_dict() if self.buffer is not None else None
        if buf is not None:
            buf["items"] = [(e.input_ids, e.labels) for e in buf["items"]]
        return {
            "schedule": self.schedule.state_dict(),
            "buffer": buf,
            "checked_step": self.checked_step,
        }

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
