"""kd_kernels.hf on tiny random Hugging Face models built offline from configs: head_inputs gives
the model's own logits, distill_loss equals the logits-level loss on ``.logits`` (loss and every
student gradient), KDTrainer runs and accumulates gradients like one large batch."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kd_kernels
from kd_kernels import hf

V = 211
FAMILIES = ("llama", "qwen2", "gemma2", "cohere", "granite")


def make_model(family: str, *, vocab: int = V, seed: int = 0, hidden: int = 32):
    kw = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.2,  # logits of a few units, so the softcap and scale matter
    }
    cfg = {
        "llama": lambda: transformers.LlamaConfig(**kw, tie_word_embeddings=True),
        "qwen2": lambda: transformers.Qwen2Config(**kw, tie_word_embeddings=False),
        "gemma2": lambda: transformers.Gemma2Config(
            **kw, head_dim=8, final_logit_softcapping=2.0, tie_word_embeddings=True
        ),
        "cohere": lambda: transformers.CohereConfig(**kw, logit_scale=0.5),
        "granite": lambda: transformers.GraniteConfig(**kw, logits_scaling=0.5),
    }[family]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.float()


def batch(b=3, t=9, vocab=V, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    am = torch.ones(b, t, dtype=torch.long)
    am[1, -3:] = 0  # right padding
    labels = ids.clone()
    labels[am == 0] = -100
    labels[0, :4] = -100  # a prompt
    return ids, am, labels


def reference(student, teacher, ids, am, labels, *, divergence, ce_weight, temperature=1.0, **coef):
    """The plain Hugging Face path: the models' own logits, kd_kernels' logits-level loss, HF's CE."""
    s = student(input_ids=ids, attention_mask=am).logits
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=am).logits[..., : s.shape[-1]]
    if labels is not None:
        mask = labels[:, 1:] != -100
    else:
        mask = am[:, 1:].bool() & am[:, :-1].bool()
    kd = kd_kernels.kd_loss(
        s[:, :-1], t[:, :-1], divergence=divergence, mask=mask, temperature=temperature, **coef
    )
    loss = kd
    if labels is not None and ce_weight:
        ce = torch.nn.functional.cross_entropy(
            s[:, :-1].reshape(-1, s.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        loss = kd + ce_weight * ce
    return loss


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_inputs_give_the_models_logits(family):
    model = make_model(family)
    ids, am, _ = batch()
    h = hf.head_inputs(model, input_ids=ids, attention_mask=am)
    z = h.hidden @ h.weight.T + (h.bias if h.bias is not None else 0)
    z = z * h.logit_scale
    if h.softcap is not None:
        z = h.softcap * torch.tanh(z / h.softcap)
    logits = model(input_ids=ids, attention_mask=am).logits
    assert logits.abs().max() > 1.0  # the transform is not negligible at this scale
    torch.testing.assert_close(z, logits, rtol=1e-5, atol=1e-5)
    expected = {"gemma2": (1.0, 2.0), "cohere": (0.5, None), "granite": (2.0, None)}
    assert (h.logit_scale, h.softcap) == expected.get(family, (1.0, None))
    if family in ("llama", "gemma2", "cohere"):  # tied: the input embedding's Parameter itself
        assert h.weight is model.get_input_embeddings().weight


# student family -> teacher family: every pair crosses architectures (other hidden size too)
PAIRS = {
    "llama": "qwen2",
    "qwen2": "gemma2",
    "gemma2": "cohere",
    "cohere": "granite",
    "granite": "llama",
}


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("family", FAMILIES)
def test_distill_loss_equals_logits_level_loss(family, divergence):
    student = make_model(family, seed=0)
    teacher = make_model(PAIRS[family], seed=1, hidden=48).eval()
    ids, am, labels = batch()
    kw = {"divergence": divergence, "ce_weight": 0.5, "temperature": 1.5}
    ref = reference(student, teacher, ids, am, labels, **kw)
    ref_g = grads(student, ref)
    loss, parts = hf.distill_loss(
        student,
        teacher,
        input_ids=ids,
        attention_mask=am,
        labels=labels,
        return_components=True,
        chunk_size=5,
        **kw,
    )
    ours_g = grads(student, loss)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    # the CE part is the model's own loss
    hf_ce = student(input_ids=ids, attention_mask=am, labels=labels).loss
    torch.testing.assert_close(parts.ce, hf_ce.detach(), rtol=1e-5, atol=1e-6)
    assert len(ours_g) == len(ref_g) > 10
    for g, r in zip(ours_g, ref_g):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_loss_without_labels_uses_the_attention_mask():
    student, teacher = make_model("gemma2"), make_model("cohere", seed=3).eval()
    ids, am, _ = batch()
    am[2, :2] = 0  # left padding too: the pad -> first-token prediction is left out
    kw = {"divergence": "jsd", "beta": 0.3}
    ref = reference(student, teacher, ids, am, None, ce_weight=0.0, **kw)
    loss = hf.distill_loss(student, teacher, input_ids=ids, attention_mask=am, **kw)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads(student, loss), grads(student, ref)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_padded_teacher_vocab_and_num_items_in_batch():
    student, teacher = make_model("qwen2"), make_model("llama", vocab=V + 13, seed=2).eval()
    ids, am, labels = batch()
    with pytest.raises(ValueError, match="truncate_teacher_vocab=True"):
        hf.distill_loss(student, teacher, input_ids=ids, labels=labels)
    kw = {"divergence": "reverse_kl", "ce_weight": 0.2}
    ref = reference(student, teacher, ids, am, labels, **kw)
    loss = hf.distill_loss(
        student,
        teacher,
        input_ids=ids,
        attention_mask=am,
        labels=labels,
        truncate_teacher_vocab=True,
        **kw,
    )
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    n = int((labels[:, 1:] != -100).sum())
    summed = hf.distill_loss(
        student,
        teacher,
        input_ids=ids,
        attention_mask=am,
        labels=labels,
        truncate_teacher_vocab=True,
        num_items_in_batch=torch.tensor(4 * n),
        **kw,
    )
    torch.testing.assert_close(summed * 4, loss, rtol=1e-5, atol=1e-6)


def test_autocast_bf16_follows_the_lm_head():
    student, teacher = make_model("llama"), make_model("qwen2", seed=1).eval()
    ids, am, labels = batch()
    kw = {"divergence": "forward_kl", "ce_weight": 1.0}
    full = hf.distill_loss(student, teacher, input_ids=ids, attention_mask=am, labels=labels, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = hf.distill_loss(
            student, teacher, input_ids=ids, attention_mask=am, labels=labels, **kw
        )
        g = grads(student, low)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert abs(low.item() - full.item()) < 0.05 * full.item()
    assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in g)


def test_bad_inputs():
    student, teacher = make_model("llama"), make_model("qwen2", seed=1)
    ids, _am, labels = batch()
    call = hf.distill_loss
    with pytest.raises(TypeError, match="labels.long()"):
        call(student, teacher, input_ids=ids, labels=labels.float())
    with pytest.raises(ValueError, match="labels has shape"):
        call(student, teacher, input_ids=ids, labels=labels[:, 1:])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        call(student, teacher, input_ids=ids[:, :1])
    with pytest.raises(TypeError, match="input_ids.long()"):
        call(student, teacher, input_ids=ids.float())
    with pytest.raises(ValueError, match="needs labels"):
        call(student, teacher, input_ids=ids, ce_weight=0.5)
    with pytest.raises(ValueError, match="teacher is None"):
        call(student, None, input_ids=ids)
    with pytest.raises(ValueError, match="both teacher_ids and teacher_logprobs"):
        call(student, None, input_ids=ids, teacher_ids=torch.zeros(3, 9, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="divergence"):
        call(student, teacher, input_ids=ids, divergence="kl")
    with pytest.raises(TypeError, match="not an nn.Linear lm_head"):
        call(student.model, teacher, input_ids=ids)
    with pytest.raises(TypeError, match="without labels"):
        hf.head_inputs(student, input_ids=ids, labels=labels)
    with pytest.raises(ValueError, match="temperature"):
        hf.KDTrainer(student, teacher, temperature=0.0)
    with pytest.raises(TypeError, match="teacher_model must be"):
        hf.KDTrainer(student, "gpt2")


@pytest.mark.skipif(hasattr(kd_kernels, "fused_linear_sparse_kd"), reason="sparse forms present")
def test_sparse_teacher_needs_the_sparse_forms():
    student = make_model("llama")
    ids, _, labels = batch()
    k_ids = torch.randint(0, V, (3, 9, 4))
    with pytest.raises(NotImplementedError, match="fused_linear_sparse_kd"):
        hf.distill_loss(
            student,
            None,
            input_ids=ids,
            labels=labels,
            teacher_ids=k_ids,
            teacher_logprobs=torch.full((3, 9, 4), -2.0),
        )


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_sparse_teacher_equals_sparse_kd_on_the_logits(ce_weight):
    """distill_loss with cached top-k teacher log-probs = kd_kernels.sparse_kd on the student's own logits
    (+ HF's CE), loss and every student gradient."""
    student, teacher = make_model("llama", seed=0), make_model("llama", seed=3)
    ids, am, labels = batch()
    with torch.no_grad():
        lp = teacher(input_ids=ids, attention_mask=am).logits.float().log_softmax(-1)
    t_lp, t_ids = lp.topk(8, dim=-1)
    loss = hf.distill_loss(
        student,
        None,
        input_ids=ids,
        attention_mask=am,
        labels=labels,
        teacher_ids=t_ids,
        teacher_logprobs=t_lp,
        ce_weight=ce_weight,
    )
    grads = torch.autograd.grad(loss, [p for p in student.parameters()], allow_unused=True)

    logits = student(input_ids=ids, attention_mask=am).logits[:, :-1]
    shifted = labels[:, 1:]
    ref = kd_kernels.sparse_kd(logits, t_ids[:, :-1], t_lp[:, :-1], mask=shifted != -100)
    if ce_weight:
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V).float(), shifted.reshape(-1))
        ref = ref + ce_weight * ce
    ref_grads = torch.autograd.grad(ref, [p for p in student.parameters()], allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or float(g.abs().max()) == 0
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_sparse_teacher_with_a_soft_capped_student_is_a_clear_error():
    student = make_model("gemma2")
    ids, _, labels = batch()
    with pytest.raises(NotImplementedError, match="soft-capped"):
        hf.distill_loss(
            student,
            None,
            input_ids=ids,
            labels=labels,
            teacher_ids=torch.randint(0, V, (3, 9, 4)),
            teacher_logprobs=torch.full((3, 9, 4), -2.0),
        )


# ------------------------------------------------------------------------------------- KDTrainer
class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, t=10, seed=5):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for i in range(n):
            ids = torch.randint(3, V, (t,), generator=g)
            labels = ids.clone()
            labels[: 2 + i % 5] = -100  # different label counts per row
            self.rows.append(
                {
                    "input_ids": ids,
                    "attention_mask": torch.ones(t, dtype=torch.long),
                    "labels": labels,
                }
            )

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _args(tmp_path, **kw):
    base = {
        "output_dir": str(tmp_path),
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "learning_rate": 1e-2,
    }
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_kd_trainer_three_steps(tmp_path):
    student, teacher = make_model("gemma2"), make_model("llama", seed=1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = hf.KDTrainer(
        student,
        teacher,
        args=_args(
            tmp_path, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2
        ),
        train_dataset=_Rows(),
        divergence="reverse_kl",
        ce_weight=0.3,
    )
    out = trainer.train()
    logs = [x for x in trainer.state.log_history if "loss" in x]
    assert trainer.state.global_step == 3 and len(logs) == 3
    for x in logs:
        assert {"kd_loss", "ce_loss"} <= set(x)
        # the logged loss is the KD + 0.3 · CE the components add up to
        assert abs(x["loss"] - (x["kd_loss"] + 0.3 * x["ce_loss"])) < 1e-3 * max(1, x["loss"])
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(t_before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_kd_trainer_gradient_accumulation_equals_one_batch(tmp_path):
    """One optimizer step over 4 rows as 2 × 2 accumulated micro-batches = one batch of 4 (the
    loss divides by the Trainer's token count over the whole step)."""
    teacher = make_model("qwen2", seed=1)
    results = []
    for bs, ga in ((4, 1), (2, 2)):
        student = make_model("llama")
        trainer = hf.KDTrainer(
            student,
            teacher,
            args=_args(
                tmp_path / f"{bs}x{ga}",
                max_steps=1,
                optim="sgd",
                lr_scheduler_type="constant",
                learning_rate=1.0,
                per_device_train_batch_size=bs,
                gradient_accumulation_steps=ga,
                max_grad_norm=0.0,
            ),
            train_dataset=_Rows(n=4),
            divergence="forward_kl",
            ce_weight=0.5,
        )
        trainer.train()
        results.append(dict(student.named_parameters()))
    base = make_model("llama")
    moved = 0.0
    for name, p0 in base.named_parameters():
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-4, atol=1e-6)
        moved = max(moved, (results[0][name] - p0).abs().max().item())
    assert moved > 1e-4


def test_kd_trainer_bf16_mixed_precision(tmp_path):
    """With bf16=True the loss is computed under the Trainer's autocast: the first logged loss is
    distill_loss under torch.autocast on the same (whole-dataset) batch."""
    student, teacher = make_model("cohere"), make_model("granite", seed=1)
    data = _Rows(n=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rows = [data[i] for i in range(4)]
        cat = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        expected = hf.distill_loss(student, teacher, divergence="jsd", ce_weight=0.5, **cat)
    with torch.no_grad():
        fp32 = hf.distill_loss(student, teacher, divergence="jsd", ce_weight=0.5, **cat)
    trainer = hf.KDTrainer(
        student,
        teacher,
        args=_args(tmp_path, max_steps=1, per_device_train_batch_size=4, bf16=True),
        train_dataset=data,
        divergence="jsd",
        ce_weight=0.5,
    )
    trainer.train()
    logged = next(x["loss"] for x in trainer.state.log_history if "loss" in x)
    assert logged == pytest.approx(expected.item(), rel=1e-4)
    assert expected.item() != fp32.item()  # the autocast path was taken
