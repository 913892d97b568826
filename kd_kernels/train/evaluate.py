"""Evaluation: Rouge-L against the teacher's references, and token-level KL to the teacher.

- Rouge-L F (``rouge-score``, Porter stemmer on) of sampled generations against the teacher's greedy
  references on the test prompts, for each seed of ``--eval-seeds``; reported as the mean over seeds and
  the standard deviation across seeds. The teacher's own samples are scored the same way, for scale.
- Forward KL(p‖q), reverse KL(q‖p) and the student's cross-entropy, token means over the reference
  responses (prompt masked), computed with the fused-linear functions.
"""

from __future__ import annotations

import statistics

import torch

from ._optional import available, missing_message, progress_bar
from .data import collate, shift_targets
from .generate import generate
from .losses import token_divergences
from .run import Run, head


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean Rouge-L F-measure (in [0, 1], stemmer on) of each prediction against its reference."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(
        scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)
    ) / len(predictions)


def mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


@torch.no_grad()
def token_metrics(run: Run, split: str, batch_size: int, progress: bool) -> dict[str, float]:
    """Token-mean forward KL, reverse KL and CE of the student against the teacher on ``split``'s
    references, pooled exactly over batches."""
    examples = run.examples(split)
    student = run.models.student
    was_training = student.training
    student.eval()
    sums = {"forward_kl": 0.0, "reverse_kl": 0.0, "ce": 0.0}
    tokens = 0
    for start in progress_bar(
        range(0, len(examples), batch_size),
        desc=f"eval kl {split}",
        leave=False,
        disable=not progress,
    ):
        batch = run.to_device(collate(examples[start : start + batch_size], run.pad_id))
        targets, mask = shift_targets(batch["labels"])
        d = token_divergences(
            head(student, batch),
            head(run.models.teacher, batch),
            targets,
            mask,
            chunk_size=run.cfg.chunk_size,
            backend=run.cfg.backend,
        )
        tokens += d["tokens"]
        for k in sums:
            sums[k] += d[k + "_sum"]
    student.train(was_training)
    n = max(tokens, 1)
    return {f"{split}_{k}": v / n for k, v in sums.items()} | {f"{split}_tokens": tokens}


def rouge_eval(run: Run, progress: bool) -> dict[str, float]:
    """Rouge-L of student (and teacher) samples against the references, per seed, then mean and spread."""
    cfg = run.cfg
    if not available("rouge_score"):  # the samples would only feed Rouge-L: skip them too
        return {"rougeL_skipped": missing_message("rouge_score")}
    prompts = run.split_prompts("test")
    if cfg.eval_prompts > 0:
        prompts = prompts[: cfg.eval_prompts]
    refs = run.references("test")
    ref_text = [run.decode(refs[p.id]) for p in prompts]
    prompt_ids = [run.prompt_ids[p.id] for p in prompts]
    out: dict[str, float] = {"test_prompts": len(prompts)}
    per_seed: dict[str, list[float]] = {"student": [], "teacher": []}
    for seed in cfg.seeds():
        gen = generate(
            run.models.student,
            prompt_ids,
            pad_id=run.pad_id,
            eos_id=run.eos_id,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=True,
            temperature=1.0,
            seed=seed,
            batch_size=cfg.gen_batch_size,
            device=run.device,
            progress=progress,
            desc=f"eval student seed {seed}",
        )
        per_seed["student"].append(rouge_l([run.decode(g) for g in gen], ref_text))
        if cfg.eval_teacher:
            samples = run.teacher_samples("test", temperature=1.0, seed=seed)
            per_seed["teacher"].append(
                rouge_l([run.decode(samples[p.id]) for p in prompts], ref_text)
            )
    for who, vals in per_seed.items():
        if vals:
            ms = mean_std(vals)
            out[f"rougeL_{who}"] = ms["mean"]
            out[f"rougeL_{who}_std"] = ms["std"]
            out[f"rougeL_{who}_per_seed"] = vals
    return out


def evaluate(run: Run, progress: bool = True) -> dict[str, float]:
    metrics = token_metrics(run, "test", run.cfg.batch_size, progress)
    metrics |= rouge_eval(run, progress)
    return metrics
