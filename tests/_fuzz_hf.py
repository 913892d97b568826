"""Fuzzing ``kd_kernels.hf`` on tiny random Hugging Face models (the configs of tests/test_hf.py):
``head_inputs`` against the model's own logits, ``distill_loss`` (dense and sparse teachers) and
``trl_chunked_divergence_loss`` against the float64 reference on the models' ``.logits`` (loss and
every student gradient), invalid calls against their typed errors. ``KDTrainer`` and
``trl_gkd_trainer`` are Trainer classes; tests/test_hf.py and tests/test_hf_trl.py run them.
"""

from __future__ import annotations

import math
import random

import torch
from _fuzz import DIVERGENCES, Report, coef_for, expect_errors

from kd_kernels import reference as R

FAMILIES = ("llama", "qwen2", "gemma2", "cohere", "granite")
_MODELS: dict = {}


def model(family: str, vocab: int, seed: int, hidden: int):
    """A tiny random model, built once per (family, vocab, seed, hidden) and process."""
    from test_hf import make_model

    key = (family, vocab, seed, hidden)
    if key not in _MODELS:
        _MODELS[key] = make_model(family, vocab=vocab, seed=seed, hidden=hidden).eval()
    return _MODELS[key]


def _batch(rng: random.Random, gen: torch.Generator, vocab: int):
    b, t = rng.randint(1, 3), rng.randint(2, 9)
    ids = torch.randint(3, vocab, (b, t), generator=gen)
    am = torch.ones(b, t, dtype=torch.long)
    pad = rng.choice(("none", "right", "left"))
    for i in range(b):
        k = rng.randint(0, t - 1)
        if pad == "right" and k:
            am[i, -k:] = 0
        elif pad == "left" and k:
            am[i, :k] = 0
    labels = None
    if rng.random() < 0.6:
        labels = ids.masked_fill(am == 0, -100)
        labels = labels.masked_fill(torch.rand(b, t, generator=gen) < 0.3, -100)
    return ids, (am if pad != "none" or rng.random() < 0.5 else None), labels, pad


def _student_grads(student, loss):
    params = [p for p in student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


def _compare(report: Report, case: str, loss, grads, ref, ref_grads) -> None:
    err = abs(loss.item() - ref.item())
    report.check(
        loss.dtype == torch.float32 and err <= 1e-5 * max(1.0, abs(ref.item())),
        case,
        f"loss {loss.item():.6g} vs reference {ref.item():.6g}",
    )
    g = torch.cat([x.flatten().double() for x in grads])
    r = torch.cat([x.flatten().double() for x in ref_grads])
    err = (g - r).norm().item()
    report.check(
        err <= 1e-4 * r.norm().item() + 1e-7,
        case,
        f"student gradient error {err:.3g} (reference norm {r.norm().item():.3g})",
    )


def distill_case(seed: int, report: Report) -> None:
    """distill_loss against kd_loss + CE on the models' own logits, in float64."""
    from kd_kernels import hf

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = rng.choice((37, 211))
    s_fam = rng.choice(FAMILIES)
    sparse = rng.random() < 0.3 and s_fam in ("llama", "qwen2")  # no scale / softcap there yet
    t_fam, t_pad = rng.choice(FAMILIES), rng.choice((0, 0, 7))
    student = model(s_fam, vocab, rng.randint(0, 2), 32)
    teacher = model(t_fam, vocab + t_pad, rng.randint(3, 5), rng.choice((32, 48)))
    divergence = rng.choice(DIVERGENCES)
    coef = coef_for(divergence, rng)
    ids, am, labels, pad = _batch(rng, gen, vocab)
    ce_weight = rng.choice((0.0, 0.5)) if labels is not None else 0.0
    temperature = rng.choice((1.0, 1.5, 0.7))
    chunk = rng.choice((None, 1, 5))
    n_items = rng.choice((None, None, rng.randint(1, 30)))
    kw = {
        "divergence": divergence,
        "temperature": temperature,
        "ce_weight": ce_weight,
        "chunk_size": chunk,
        **coef,
    }
    case = (
        f"hf distill_case(seed={seed}) [{s_fam}<-{t_fam} V={vocab}+{t_pad} sparse={sparse} "
        f"{divergence} {coef} T={temperature} ce={ce_weight} ids={tuple(ids.shape)} pad={pad} "
        f"mask={am is not None} labels={labels is not None} chunk={chunk} items={n_items}]"
    )
    inputs = {"input_ids": ids} if am is None else {"input_ids": ids, "attention_mask": am}
    # the reference: the models' own fp32 logits, the loss in float64 from its definition
    s = student(**inputs).logits[:, :-1].double()
    if labels is not None:
        mask = labels[:, 1:] != -100
    elif am is not None:
        mask = am[:, 1:].bool() & am[:, :-1].bool()
    else:
        mask = None
    reduction = "mean" if n_items is None else "sum"
    with torch.no_grad():
        t_logits = teacher(**inputs).logits[..., :vocab].double()
    if sparse:
        t_lp, t_ids = t_logits.log_softmax(-1).float().topk(rng.choice((1, 4, 8)), -1)
        ref = R.sparse_kd_loss(
            divergence,
            s,
            t_ids[:, :-1],
            t_lp[:, :-1].double(),
            mask=mask,
            temperature=temperature,
            reduction=reduction,
            **coef,
        )
        teacher_args = {"teacher": None, "teacher_ids": t_ids, "teacher_logprobs": t_lp}
    else:
        ref = R.kd_loss(
            divergence,
            s,
            t_logits[:, :-1],
            mask=mask,
            temperature=temperature,
            reduction=reduction,
            **coef,
        )
        teacher_args = {"teacher": teacher, "truncate_teacher_vocab": t_pad > 0}
    if labels is not None:
        nll = R.cross_entropy_per_token(s, labels[:, 1:])
        valid = labels[:, 1:] != -100
        ref = ref + ce_weight * (
            nll.sum() / valid.sum().clamp_min(1) if n_items is None else nll.sum()
        )
    if n_items is not None:
        ref = ref / n_items
    ref_grads = _student_grads(student, ref)
    try:
        loss = hf.distill_loss(
            student, labels=labels, num_items_in_batch=n_items, **inputs, **teacher_args, **kw
        )
        grads = _student_grads(student, loss)
    except Exception as e:  # noqa: BLE001
        report.check(False, case, f"raised {type(e).__name__}: {e}")
        return
    _compare(report, case, loss, grads, ref, ref_grads)
    report.check(all(p.grad is None for p in teacher.parameters()), case, "teacher got a gradient")


def head_case(seed: int, report: Report) -> None:
    """head_inputs(...) with the model's transform gives the model's own logits."""
    from kd_kernels import hf

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    fam, vocab = rng.choice(FAMILIES), rng.choice((37, 211))
    m = model(fam, vocab, rng.randint(0, 2), 32)
    ids, am, _, pad = _batch(rng, gen, vocab)
    inputs = {"input_ids": ids} if am is None else {"input_ids": ids, "attention_mask": am}
    case = f"hf head_case(seed={seed}) [{fam} V={vocab} ids={tuple(ids.shape)} pad={pad}]"
    with torch.no_grad():
        h = hf.head_inputs(m, **inputs)
        z = (h.hidden @ h.weight.T + (h.bias if h.bias is not None else 0)) * h.logit_scale
        if h.softcap is not None:
            z = h.softcap * torch.tanh(z / h.softcap)
        err = (z - m(**inputs).logits).abs().max().item()
    report.check(err <= 1e-5, case, f"logits differ by {err:.3g}")


def trl_case(seed: int, report: Report) -> None:
    """trl_chunked_divergence_loss against TRL's definition on the model-exact logits, in float64:
    (Σ_valid D_i / (num_items or count), Σ_valid H_i (student entropy), count)."""
    from kd_kernels import hf

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = rng.choice((37, 211))
    s_fam, t_fam = rng.choice(FAMILIES), rng.choice(FAMILIES)
    student, teacher = model(s_fam, vocab, 0, 32), model(t_fam, vocab, 4, 48)
    ids, am, _, pad = _batch(rng, gen, vocab)
    beta = rng.choice((0.0, 1.0, rng.uniform(0.05, 0.95)))
    temperature = rng.choice((1.0, 0.7, 2.0))
    n_items = rng.choice((None, rng.randint(1, 20)))
    completion = (torch.rand(ids.shape, generator=gen) < 0.7).long()
    case = (
        f"hf trl_case(seed={seed}) [{s_fam}<-{t_fam} V={vocab} beta={beta:.3g} "
        f"T={temperature} items={n_items} ids={tuple(ids.shape)}]"
    )
    sh = hf.head_inputs(student, input_ids=ids)
    with torch.no_grad():
        th = hf.head_inputs(teacher, input_ids=ids)
    s = student(input_ids=ids).logits.double() / temperature
    with torch.no_grad():
        t = teacher(input_ids=ids).logits.double() / temperature
    valid = completion != 0
    if beta == 0.0:
        per = R.per_token("forward_kl", s, t)
    elif beta == 1.0:
        per = R.per_token("reverse_kl", s, t)
    else:
        per = R.per_token("jsd", s, t, beta=beta)
    total = torch.where(valid, per, 0.0).sum()
    ref = total / (valid.sum().clamp_min(1) if n_items is None else n_items)
    lq = s.log_softmax(-1)
    ent = torch.where(valid, -(lq.exp() * lq).sum(-1), 0.0).sum()
    ref_grads = _student_grads(student, ref)
    try:
        loss, entropy, count = hf.trl_chunked_divergence_loss(
            sh.hidden,
            th.hidden,
            sh.weight,
            th.weight,
            completion,
            beta,
            num_items_in_batch=n_items,
            student_lm_head_bias=sh.bias,
            teacher_lm_head_bias=th.bias,
            student_logit_scale=sh.logit_scale,
            teacher_logit_scale=th.logit_scale,
            student_final_logit_softcapping=sh.softcap,
            teacher_final_logit_softcapping=th.softcap,
            temperature=temperature,
        )
        grads = _student_grads(student, loss)
    except Exception as e:  # noqa: BLE001
        report.check(False, case, f"raised {type(e).__name__}: {e}")
        return
    _compare(report, case, loss, grads, ref, ref_grads)
    report.check(
        abs(entropy.item() - ent.item()) <= 1e-4 * max(1.0, ent.item()),
        case,
        f"entropy {entropy.item():.6g} vs {ent.item():.6g}",
    )
    report.check(int(count) == int(valid.sum()), case, f"count {int(count)}")


def _bad_calls(rng: random.Random):
    from kd_kernels import hf

    vocab = 37
    student, teacher = model("llama", vocab, 0, 32), model("qwen2", vocab, 3, 32)
    big = model("qwen2", vocab + 7, 3, 32)
    ids = torch.randint(3, vocab, (2, 6))
    labels = ids.clone()
    call = hf.distill_loss
    yield "input_ids float", lambda: call(student, teacher, input_ids=ids.float()), TypeError
    yield "input_ids 1-D", lambda: call(student, teacher, input_ids=ids[0]), ValueError
    yield "input_ids T=1", lambda: call(student, teacher, input_ids=ids[:, :1]), ValueError
    yield (
        "labels float",
        lambda: call(student, teacher, input_ids=ids, labels=labels.float()),
        TypeError,
    )
    yield (
        "labels shape",
        lambda: call(student, teacher, input_ids=ids, labels=labels[:, 1:]),
        ValueError,
    )
    yield (
        "attention_mask shape",
        lambda: call(student, teacher, input_ids=ids, attention_mask=torch.ones(2, 5).long()),
        ValueError,
    )
    yield (
        "ce_weight without labels",
        lambda: call(student, teacher, input_ids=ids, ce_weight=0.5),
        ValueError,
    )
    yield "teacher None", lambda: call(student, None, input_ids=ids), ValueError
    yield (
        "teacher and sparse",
        lambda: call(
            student,
            teacher,
            input_ids=ids,
            teacher_ids=torch.zeros(2, 6, 2, dtype=torch.long),
            teacher_logprobs=torch.full((2, 6, 2), -1.0),
        ),
        ValueError,
    )
    yield (
        "sparse ids only",
        lambda: call(student, None, input_ids=ids, teacher_ids=torch.zeros(2, 6, 2)),
        ValueError,
    )
    yield (
        "sparse shape",
        lambda: call(
            student,
            None,
            input_ids=ids,
            teacher_ids=torch.zeros(2, 5, 2, dtype=torch.long),
            teacher_logprobs=torch.full((2, 5, 2), -1.0),
        ),
        ValueError,
    )
    yield (
        "divergence",
        lambda: call(student, teacher, input_ids=ids, divergence=rng.choice(["kl", ""])),
        ValueError,
    )
    for bad in (0.0, -1.0, math.nan):
        yield (
            f"temperature={bad}",
            lambda b=bad: call(student, teacher, input_ids=ids, temperature=b),
            ValueError,
        )
    yield "chunk_size", lambda: call(student, teacher, input_ids=ids, chunk_size=0), ValueError
    yield "backend", lambda: call(student, teacher, input_ids=ids, backend="gpu"), ValueError
    yield "padded teacher vocab", lambda: call(student, big, input_ids=ids), ValueError
    yield (
        "num_items_in_batch",
        lambda: call(student, teacher, input_ids=ids, num_items_in_batch=torch.ones(2)),
        ValueError,
    )
    yield "not an lm", lambda: call(student.model, teacher, input_ids=ids), TypeError
    yield (
        "head_inputs labels",
        lambda: hf.head_inputs(student, input_ids=ids, labels=labels),
        TypeError,
    )
    yield "head_inputs not a module", lambda: hf.head_inputs("llama", input_ids=ids), TypeError
    h = torch.randn(2, 6, 32)
    w = student.get_output_embeddings().weight
    trl = hf.trl_chunked_divergence_loss
    for bad in (-0.1, 1.5, math.nan, "0.5"):
        yield f"trl beta={bad!r}", lambda b=bad: trl(h, h, w, w, torch.ones(2, 6), b), ValueError
    yield "trl completion_mask", lambda: trl(h, h, w, w, torch.ones(2, 5), 0.5), ValueError


def invalid_cases(seed: int, report: Report) -> None:
    expect_errors(report, f"hf invalid_cases(seed={seed})", _bad_calls(random.Random(seed)))
