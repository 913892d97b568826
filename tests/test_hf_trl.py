"""TRL through kd_kernels: the GKD trainer's loss and the DistillationTrainer's divergence hook
equal TRL's own on tiny models (skipped without trl; tested with trl 1.16.0)."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

pytest.importorskip("transformers")
trl_gkd = pytest.importorskip("trl.experimental.gkd")
trl_distill = pytest.importorskip("trl.trainer.distillation_trainer")

from test_hf import batch, make_model

from kd_kernels import hf


def _fake_trainer(teacher, beta):
    """The attributes GKDTrainer.compute_loss reads, without building a whole trainer."""
    return types.SimpleNamespace(
        teacher_model=teacher,
        beta=beta,
        generalized_jsd_loss=trl_gkd.GKDTrainer.generalized_jsd_loss,
        accelerator=types.SimpleNamespace(
            unwrap_model=lambda m: m, autocast=contextlib.nullcontext
        ),
    )


@pytest.mark.parametrize("num_items", [None, 37])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_gkd_loss_equals_trls(beta, num_items):
    student, teacher = make_model("qwen2"), make_model("gemma2", seed=1, hidden=48)
    ids, am, labels = batch()
    inputs = {"input_ids": ids, "attention_mask": am, "labels": labels}
    fused_cls = hf.trl_gkd_trainer(trl_gkd.GKDTrainer)
    assert issubclass(fused_cls, trl_gkd.GKDTrainer)
    fake = _fake_trainer(teacher, beta)
    n = torch.tensor(num_items) if num_items is not None else None
    ref = trl_gkd.GKDTrainer.compute_loss(fake, student, inputs, num_items_in_batch=n)
    params = list(student.parameters())
    ref_g = torch.autograd.grad(ref, params)
    ours = fused_cls.compute_loss(fake, student, inputs, num_items_in_batch=n)
    ours_g = torch.autograd.grad(ours, params)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-6)
    for g, r in zip(ours_g, ref_g):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_gkd_wrapper_rejects_other_classes():
    with pytest.raises(TypeError, match="GKDTrainer"):
        hf.trl_gkd_trainer(hf.KDTrainer)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("heads", ["plain", "scale+softcap"])
def test_distillation_trainer_hook_equals_trls(beta, heads):
    b, k, d_s, d_t, v = 2, 7, 16, 24, 131
    hs = torch.randn(b, k, d_s)
    ht = torch.randn(b, k, d_t)
    ws, wt = torch.randn(v, d_s) / 2, torch.randn(v, d_t) / 2
    bs, bt = torch.randn(v), torch.randn(v)
    mask = torch.ones(b, k, dtype=torch.long)
    mask[1, 4:] = 0
    kw = {
        "beta": beta,
        "student_lm_head_bias": None,
        "teacher_lm_head_bias": bt,
        "temperature": 1.3,
        "num_items_in_batch": torch.tensor(15),
    }
    if heads != "plain":
        kw.update(
            student_logit_scale=0.7,
            teacher_logit_scale=1.4,
            student_final_logit_softcapping=3.0,
            teacher_final_logit_softcapping=2.0,
        )
    results = []
    for fn in (trl_distill._chunked_divergence_loss, hf.trl_chunked_divergence_loss):
        H, W, B = hs.clone().requires_grad_(), ws.clone().requires_grad_(), bs.clone()
        B.requires_grad_()
        kw["student_lm_head_bias"] = B
        loss, ent, n = fn(H, ht, W, wt, mask, **kw)
        grads = torch.autograd.grad(loss, (H, W, B))
        results.append((loss.detach(), ent, n, grads))
    (rl, re, rn, rg), (ol, oe, on, og) = results
    torch.testing.assert_close(ol, rl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(oe, re, rtol=1e-5, atol=1e-5)
    assert int(on) == int(rn) == 11
    for g, r in zip(og, rg):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bf16", [False, True])
def test_gkd_trainer_runs_through_kd_kernels(tmp_path, bf16):
    """Two real GKD steps (half on-policy) with TRL's trainer and with the kd_kernels subclass,
    from the same initial models and seed: the same logged losses (with TRL's default bf16
    autocast, the second step's differ by bf16 rounding of the first step's gradients)."""
    datasets = pytest.importorskip("datasets")
    import transformers

    from kd_kernels.train.models import tiny_tokenizer

    tok = tiny_tokenizer()

    def model(seed, cls, **kw):
        cfg = cls(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            initializer_range=0.2,  # divergences of order 1, not fp32 rounding noise
            **kw,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return transformers.AutoModelForCausalLM.from_config(cfg)

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"add {i} and {i + 1}"},
                {"role": "assistant", "content": f"{2 * i + 1}"},
            ]
        }
        for i in range(8)
    ]
    logs = []
    for cls in (trl_gkd.GKDTrainer, hf.trl_gkd_trainer(trl_gkd.GKDTrainer)):
        args = trl_gkd.GKDConfig(
            output_dir=str(tmp_path / cls.__name__),
            max_steps=2,
            per_device_train_batch_size=2,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            lmbda=0.5,
            beta=0.5,
            max_new_tokens=4,
            max_length=64,
            disable_tqdm=True,
            bf16=bf16,
            learning_rate=1e-2,
            seed=0,
        )
        trainer = cls(
            model=model(0, transformers.LlamaConfig, tie_word_embeddings=True),
            teacher_model=model(1, transformers.Qwen2Config),
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tok,
        )
        trainer.train()
        logs.append([x["loss"] for x in trainer.state.log_history if "loss" in x])
    assert len(logs[0]) == 2 and all(v > 0 for v in logs[0])
    assert logs[1][0] == pytest.approx(logs[0][0], rel=1e-4)
    assert logs[1][1] == pytest.approx(logs[0][1], rel=2e-3 if bf16 else 1e-4)
