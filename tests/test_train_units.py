"""Unit tests of the trainer's pieces: config overrides, splitting, masking, batching and the KD mix."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from kd_kernels import reference
from kd_kernels.train import config as C
from kd_kernels.train import data as D
from kd_kernels.train.losses import Head, ce_loss, kd_mix_loss, token_divergences

# ------------------------------------------------------------------------------------------- config


def test_cli_overrides_and_unknown_keys():
    cfg, explicit = C.parse_args(
        ["kd", "--steps", "7", "--kd-ratio", "0.25", "--no-eval-teacher"], ["kd", "sft"]
    )
    assert (cfg.method, cfg.steps, cfg.kd_ratio, cfg.eval_teacher) == ("kd", 7, 0.25, False)
    assert explicit == {"steps", "kd_ratio", "eval_teacher"}
    with pytest.raises(SystemExit) as e:
        C.parse_args(["kd", "--stepz", "7"], ["kd"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="unknown config keys"):
        C.config_from_dict({"steps": 3, "not_a_key": 1})
    with pytest.raises(ValueError, match="--kd-ratio"):
        C.parse_args(["kd", "--kd-ratio", "1.5"], ["kd"])
    with pytest.raises(ValueError, match="--batch-size"):
        C.parse_args(["kd", "--batch-size", "0"], ["kd"])
    assert C.config_from_dict(C.TrainConfig(steps=3).to_dict()).steps == 3


# --------------------------------------------------------------------------------------------- data


def test_shipped_prompts_and_split():
    prompts = D.load_prompts()
    assert len(prompts) >= 250 and len({p.id for p in prompts}) == len(prompts)
    assert len({p.task for p in prompts}) >= 8
    s1 = D.split_prompts(prompts, 0.1, 0.1)
    s2 = D.split_prompts(list(reversed(prompts)), 0.1, 0.1)
    assert {k: sorted(p.id for p in v) for k, v in s1.items()} == {
        k: sorted(p.id for p in v) for k, v in s2.items()
    }  # order-independent
    ids = [{p.id for p in s1[k]} for k in ("train", "valid", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(map(len, ids)) == len(prompts)
    n = len(prompts)
    for k, frac in (("valid", 0.1), ("test", 0.1)):  # hash split: within 4 sigma of its expectation
        assert abs(len(s1[k]) - frac * n) < 4 * math.sqrt(n * frac * (1 - frac))
    # stable under removal of other prompts
    sub = D.split_prompts(prompts[::2], 0.1, 0.1)
    assert {p.id for p in sub["test"]} == {p.id for p in s1["test"]} & {p.id for p in prompts[::2]}


def test_split_of_is_deterministic_by_hand():
    # the split only depends on sha256(id): u in [0, test) → test, [test, test+valid) → valid
    import hashlib

    for pid in ("p0001", "p0002", "abc"):
        u = int.from_bytes(hashlib.sha256(pid.encode()).digest()[:8], "big") / 2.0**64
        want = "test" if u < 0.3 else "valid" if u < 0.5 else "train"
        assert D.split_of(pid, 0.2, 0.3) == want


def test_example_masking_collate_and_shift():
    ex = D.build_example([5, 6, 7], [8, 9], eos_id=2)
    assert ex.input_ids == [5, 6, 7, 8, 9, 2]
    assert ex.labels == [-100, -100, -100, 8, 9, 2]
    short = D.build_example([5], [4], eos_id=2)
    b = D.collate([ex, short], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2], [5, 4, 2, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, -100, 8, 9, 2], [-100, 4, 2, -100, -100, -100]]
    targets, mask = D.shift_targets(b["labels"])
    # hidden state i predicts token i+1: the last prompt position predicts the first response token
    assert targets.tolist() == [[-100, -100, 8, 9, 2], [4, 2, -100, -100, -100]]
    assert mask.tolist() == [[False, False, True, True, True], [True, True, False, False, False]]


def test_batch_indices_cover_epochs_and_shard_ranks():
    n, bs = 10, 3
    stream = [i for step in range(10) for i in D.batch_indices(n, step, bs, seed=1)]
    for epoch in range(3):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert D.batch_indices(n, 4, bs, seed=1) == D.batch_indices(n, 4, bs, seed=1)  # pure function
    assert D.batch_indices(n, 0, bs, seed=1) != D.batch_indices(n, 0, bs, seed=2)
    # two ranks at step k see exactly what one process with a double batch sees
    two = D.batch_indices(n, 2, bs, seed=1, rank=0, world=2) + D.batch_indices(
        n, 2, bs, seed=1, rank=1, world=2
    )
    assert two == D.batch_indices(n, 2, 2 * bs, seed=1)
    with pytest.raises(ValueError, match="training split is empty"):
        D.batch_indices(0, 0, 1, seed=1)


def test_prompt_formatting_uses_chat_template():
    from kd_kernels.train.models import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = D.prompt_token_ids(tok, "Hi!", max_prompt_tokens=1000)
    assert tok.decode(ids) == "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    assert D.prompt_token_ids(tok, "Hi!", max_prompt_tokens=5) == ids[-5:]


# ------------------------------------------------------------------------------------------- losses


def _heads(seed: int = 0, n: int = 2, t: int = 5, d: int = 8, v: int = 11):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, t, d, generator=g, dtype=torch.float64)
    ws = torch.randn(v, d, generator=g, dtype=torch.float64)
    ht = torch.randn(n, t, d + 3, generator=g, dtype=torch.float64)
    wt = torch.randn(v, d + 3, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) > 0.3
    mask[0, 0] = True
    targets = torch.where(mask, targets, torch.full_like(targets, -100))
    return hs, ws, ht, wt, targets, mask


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
def test_kd_mix_matches_hand_computed_mix(ratio):
    hs, ws, ht, wt, targets, mask = _heads()
    s_logits, t_logits = hs @ ws.T, ht @ wt.T
    ce = reference.cross_entropy_per_token(s_logits, targets)[mask].mean()
    fkl = reference.forward_kl_per_token(s_logits, t_logits)[mask].mean()
    want = (1 - ratio) * ce + ratio * fkl

    hs32 = hs.float().requires_grad_(True)
    ws32 = ws.float().requires_grad_(True)
    loss, parts = kd_mix_loss(
        Head(hs32, ws32), Head(ht.float(), wt.float()), targets, mask, ratio=ratio, backend="torch"
    )
    assert loss.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)
    assert parts["ce"] == pytest.approx(ce.item(), rel=1e-4)
    if ratio > 0:
        assert parts["kd"] == pytest.approx(fkl.item(), rel=1e-4, abs=1e-6)
    loss.backward()
    hs64 = hs.clone().requires_grad_(True)
    ws64 = ws.clone().requires_grad_(True)
    s64 = hs64 @ ws64.T
    ref = (1 - ratio) * reference.cross_entropy_per_token(s64, targets)[
        mask
    ].mean() + ratio * reference.forward_kl_per_token(s64, t_logits)[mask].mean()
    ref.backward()
    torch.testing.assert_close(hs32.grad.double(), hs64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ws32.grad.double(), ws64.grad, rtol=1e-4, atol=1e-5)
    assert float(hs32.grad[~mask].abs().max()) == 0.0  # masked tokens get no gradient


def test_kd_mix_tiny_numbers_by_hand():
    # one token, V = 2, D = 1, weights chosen so the logits are s = [0, 0], t = [log 3, 0]
    hs = torch.tensor([[[1.0]]])
    ws = torch.tensor([[0.0], [0.0]])
    ht = torch.tensor([[[1.0]]])
    wt = torch.tensor([[math.log(3.0)], [0.0]])
    targets, mask = torch.tensor([[0]]), torch.tensor([[True]])
    # q = [1/2, 1/2], p = [3/4, 1/4]: CE = log 2, FKL = 3/4 log(3/2) + 1/4 log(1/2)
    ce = math.log(2.0)
    fkl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    loss, _ = kd_mix_loss(Head(hs, ws), Head(ht, wt), targets, mask, ratio=0.5, backend="torch")
    assert loss.item() == pytest.approx(0.5 * ce + 0.5 * fkl, rel=1e-6)


def test_ce_and_token_divergences_against_reference():
    hs, ws, ht, wt, targets, mask = _heads(seed=3)
    s_logits, t_logits = hs @ ws.T, ht @ wt.T
    ce = ce_loss(Head(hs.float(), ws.float()), targets, mask)
    want_ce = reference.cross_entropy_per_token(s_logits, targets)[mask].mean()
    assert ce.item() == pytest.approx(want_ce.item(), rel=1e-5)
    d = token_divergences(
        Head(hs.float(), ws.float()), Head(ht.float(), wt.float()), targets, mask, backend="torch"
    )
    n = int(mask.sum())
    assert d["tokens"] == n
    fkl = reference.forward_kl_per_token(s_logits, t_logits)[mask].sum()
    rkl = reference.reverse_kl_per_token(s_logits, t_logits)[mask].sum()
    assert d["forward_kl_sum"] == pytest.approx(fkl.item(), rel=1e-4)
    assert d["reverse_kl_sum"] == pytest.approx(rkl.item(), rel=1e-4)
    assert d["ce_sum"] == pytest.approx(want_ce.item() * n, rel=1e-4)


def test_rouge_l_and_mean_std():
    from kd_kernels.train.evaluate import mean_std, rouge_l

    assert rouge_l(["the cats sat"], ["the cat sat"]) == pytest.approx(1.0)  # stemmer on
    # LCS("a b c d", "a x c y") = 2 → P = R = F = 1/2
    assert rouge_l(["a x c y"], ["a b c d"]) == pytest.approx(0.5)
    assert rouge_l([""], ["a b"]) == 0.0
    ms = mean_std([1.0, 3.0])
    assert ms["mean"] == 2.0 and ms["std"] == pytest.approx(math.sqrt(2.0))


def test_student_from_teacher_layers():
    from kd_kernels.hf import lm_head
    from kd_kernels.train.models import load_tiny, make_student, parse_layers

    teacher, _, _ = load_tiny(seed=0)
    assert parse_layers("", 30) == list(range(0, 30, 3))
    assert parse_layers("0:4:2", 4) == [0, 2] and parse_layers("3,1", 4) == [1, 3]
    with pytest.raises(ValueError, match="--student-layers"):
        parse_layers("0,9", 4)
    student = make_student(teacher, [0, 2])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    torch.testing.assert_close(
        student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight
    )
    w, b, _, _ = lm_head(student)
    assert w is student.model.embed_tokens.weight and b is None  # tied embeddings stay tied
    assert w.data_ptr() != lm_head(teacher).weight.data_ptr()  # an independent copy
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        out = student.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


# ------------------------------------------------------------------------------------------ compare


def test_compare_table_from_run_summaries(tmp_path):
    import json

    from kd_kernels.train import compare

    def summary(method, seed, rouge, rkl, t):
        d = tmp_path / method / f"seed{seed}"
        d.mkdir(parents=True)
        final = {
            "rougeL_student": rouge,
            "rougeL_student_std": 0.01,
            "rougeL_teacher": 0.5,
            "test_reverse_kl": rkl,
            "test_forward_kl": 2 * rkl,
            "test_ce": 3.0,
        }
        (d / "summary.json").write_text(
            json.dumps(
                {
                    "steps": 10,
                    "train_time_s": t,
                    "wall_time_s": t + 5,
                    "peak_mem_mb": 100.0,
                    "final": final,
                }
            )
        )

    summary("kd", 1, 0.2, 1.0, 10.0)
    summary("kd", 2, 0.4, 3.0, 30.0)
    summary("minillm", 1, 0.3, 0.5, 50.0)
    rows = compare.write_outputs(tmp_path, ["kd", "minillm", "sft"], [1, 2], "# header\n")
    assert [(r["method"], r["seed"]) for r in rows] == [("kd", 1), ("kd", 2), ("minillm", 1)]
    md = (tmp_path / "COMPARISON.md").read_text()
    # kd: mean ± sample standard deviation over the two training seeds
    assert "| kd | 2 | 0.300 ± 0.141 |" in md and "| 2.000 ± 1.414 |" in md and "| 20 ± 14 |" in md
    assert "| minillm | 1 | 0.300 |" in md and "| sft | 0 | not run |" in md
    assert "Rouge-L 0.500" in md
    assert (tmp_path / "compare.png").is_file()
    assert json.loads((tmp_path / "results.json").read_text()) == rows


def test_compare_rejects_bad_arguments_before_running(tmp_path, capsys):
    from kd_kernels.train import compare

    assert compare.main(["--methods", "kd,nope", "--out", str(tmp_path)]) == 2
    assert compare.main(["--seeds", "a", "--out", str(tmp_path)]) == 2
    assert compare.main(["--out", str(tmp_path), "--seed", "3"]) == 2
    assert compare.main(["--out", str(tmp_path), "--kd-ratio", "7"]) == 2
    err = capsys.readouterr().err
    assert (
        "nope" in err
        and "--seeds" in err
        and "--seed is set per run" in err
        and "--kd-ratio" in err
    )
    assert not any(tmp_path.iterdir())  # nothing was run


def test_train_package_imports_run_one_way():
    """kd_kernels.train's modules import each other without a cycle (run ← methods / evaluate ← trainer)."""
    import ast
    import graphlib
    from pathlib import Path

    import kd_kernels.train as pkg

    graph = {}
    for f in Path(pkg.__file__).parent.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
        graph[f.stem] = deps
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert order.index("run") < order.index("methods") < order.index("trainer")
    assert order.index("evaluate") < order.index("trainer")
