"""kd-train under torchrun with --dist fsdp (FSDP2) against --dist ddp: the same per-step losses, an
exact resume, and a consolidated checkpoint that loads in one process (issue 17, trainer part).

Two gloo processes on the CPU, launched by ``torch.distributed.run`` on a free loopback port, each bounded
by a timeout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*program: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment of ``torchrun`` starting ``program`` on 2 local processes
    (rendezvous on 127.0.0.1, one thread each)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", *program]
    return cmd, env


def _torchrun(response_cache: Path, out: Path, *flags: str, method: str = "kd") -> str:
    """Run kd-train on 2 processes; returns stderr (asserts exit 0)."""
    cmd, env = _launch(
        "-m",
        "kd_kernels.train.cli",
        method,
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--max-prompts",
        "24",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "1",
        "--min-lr",
        "3e-3",
        "--cache-dir",
        str(response_cache),
        "--out",
        str(out),
        "--no-progress",
        *flags,
    )
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stderr


def _losses(out: Path) -> dict[int, float]:
    rows = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    return {r["step"]: r["loss"] for r in rows}


def test_fsdp_follows_ddp_resumes_exactly_and_saves_a_consolidated_student(
    tmp_path, response_cache
):
    skip = ("--skip-eval",)
    _torchrun(response_cache, tmp_path / "ddp", "--dist", "ddp", "--steps", "4", *skip)
    # the uninterrupted FSDP2 run also validates mid-run and evaluates at the end (rank 0, on
    # consolidated copies of the sharded models)
    log = _torchrun(
        response_cache,
        tmp_path / "fsdp",
        "--dist",
        "fsdp",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--eval-prompts",
        "2",
        "--eval-seeds",
        "1",
    )
    assert "FSDP2 (" in log and "sharded over 2 ranks" in log, log[-2000:]
    ddp, fsdp = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp")
    assert sorted(fsdp) == [1, 2, 3, 4]
    for step in ddp:
        assert abs(fsdp[step] - ddp[step]) <= 1e-3 * max(1.0, abs(ddp[step])), (step, fsdp, ddp)
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["dist"] == "fsdp" and summary["world_size"] == 2
    assert summary["final"]["test_forward_kl"] >= 0
    rows = [json.loads(x) for x in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert isinstance(rows[1].get("valid_ce"), float)

    # checkpoint at step 2, then resume to 4 (without --dist: the saved layout is used)
    _torchrun(response_cache, tmp_path / "resumed", "--dist", "fsdp", "--steps", "2", *skip)
    log = _torchrun(response_cache, tmp_path / "resumed", "--steps", "4", "--resume", *skip)
    assert "FSDP2 (" in log and "steps 2→4" in log, log[-2000:]
    resumed = _losses(tmp_path / "resumed")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):  # same batches, same optimizer state: exactly the uninterrupted run
        assert resumed[step] == pytest.approx(fsdp[step], rel=1e-6, abs=1e-7), (step, resumed, fsdp)

    # the consolidated checkpoint: plain tensors that load into an unsharded student in this process
    from kd_kernels.train.models import load_tiny, make_student, parse_layers

    state = torch.load(tmp_path / "fsdp" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 4 and state["optimizer_format"] == "fqn"
    assert all(type(t) is torch.Tensor for t in state["student"].values())
    teacher, _, _ = load_tiny(state["config"]["seed"])
    student = make_student(teacher, parse_layers("", 4))
    before = student.model.layers[0].mlp.up_proj.weight.detach().clone()
    student.load_state_dict(state["student"])  # strict: every key, every shape
    assert not torch.equal(before, student.model.layers[0].mlp.up_proj.weight)  # trained weights
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tied embeddings stay tied
    ddp_state = torch.load(tmp_path / "ddp" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ddp_state["student"].keys() == state["student"].keys()
    for k, v in ddp_state["student"].items():  # the same training, sharded or replicated
        assert torch.allclose(state["student"][k], v, rtol=1e-4, atol=1e-5), k


@pytest.mark.slow
def test_checkpoints_move_between_layouts(tmp_path, response_cache):
    """A DDP checkpoint (index-numbered optimizer state) resumes under FSDP2 exactly, and an FSDP2
    checkpoint (by-name optimizer state) resumes on one process."""
    skip = ("--skip-eval",)
    _torchrun(response_cache, tmp_path / "ddp", "--dist", "ddp", "--steps", "4", *skip)
    _torchrun(response_cache, tmp_path / "moved", "--dist", "ddp", "--steps", "2", *skip)
    _torchrun(
        response_cache, tmp_path / "moved", "--dist", "fsdp", "--steps", "4", "--resume", *skip
    )
    ddp, moved = _losses(tmp_path / "ddp"), _losses(tmp_path / "moved")
    for step in (3, 4):
        assert abs(moved[step] - ddp[step]) <= 1e-3 * max(1.0, abs(ddp[step])), (step, moved, ddp)

    from kd_kernels.train.cli import main

    rc = main(["kd", "--out", str(tmp_path / "moved"), "--resume", "--steps", "5", "--no-progress"])
    assert rc == 0
    state = torch.load(tmp_path / "moved" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert (
        state["step"] == 5 and state["optimizer_format"] == "index"
    )  # one process: the plain format
    assert sorted(_losses(tmp_path / "moved")) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_fsdp_untied_teacher_and_student_follow_ddp(tmp_path, response_cache):
    """--teacher PATH with an untied lm_head: the teacher's head is its own FSDP2 group, gathered for the
    loss; the student's untied head is in its root. Losses follow DDP; the evaluation runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kd_kernels.train.models import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "untied")
    tok.save_pretrained(tmp_path / "untied")
    flags = (
        "--teacher",
        str(tmp_path / "untied"),
        "--steps",
        "3",
        "--eval-prompts",
        "2",
        "--eval-seeds",
        "1",
    )
    _torchrun(response_cache, tmp_path / "ddp", "--dist", "ddp", *flags)
    log = _torchrun(response_cache, tmp_path / "fsdp", "--dist", "fsdp", *flags)
    assert "FSDP2 (" in log
    ddp, fsdp = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp")
    assert sorted(fsdp) == [1, 2, 3]
    for step in ddp:
        assert abs(fsdp[step] - ddp[step]) <= 1e-3 * max(1.0, abs(ddp[step])), (step, fsdp, ddp)
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["evaluated"] and summary["final"]["test_forward_kl"] >= 0
    state = torch.load(tmp_path / "fsdp" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert not torch.equal(
        state["student"]["lm_head.weight"], state["student"]["model.embed_tokens.weight"]
    )


# ---------------------------------------------------------- the loss's normalization across ranks

GLOBAL_TOKEN_MEAN = ("gkd",)  # TRL: the sum over every rank's tokens / the global token count
# LMOps / DistiLLM: each rank's token mean, averaged over ranks by DDP
PER_RANK_MEAN = ("sft", "kd", "seqkd", "distillm", "minillm")


@pytest.fixture(scope="module")
def ddp_gradients(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Each method's DDP-averaged gradient of one step on 2 gloo ranks (one torchrun launch)."""
    out = tmp_path_factory.mktemp("ddp_grads") / "grads.pt"
    cmd, env = _launch(
        str(ROOT / "tests" / "_dist_grads.py"),
        ",".join(GLOBAL_TOKEN_MEAN + PER_RANK_MEAN),
        str(out),
    )
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-7) for k in a)


@pytest.mark.parametrize("method", GLOBAL_TOKEN_MEAN + PER_RANK_MEAN)
def test_loss_normalization_across_ranks_with_uneven_lengths(ddp_gradients, method):
    """2 gloo ranks holding 16 and 3 response tokens. GKD (as TRL's distillation trainer): the
    averaged DDP gradient equals one process's over all 19 tokens (a global token mean). The others
    (as LMOps and DistiLLM; MiniLLM on a PPO minibatch given by hand): it is the mean of each rank's
    own token-mean gradient, which differs. kd-train has no gradient accumulation."""
    from _dist_grads import RANK_EXAMPLES, examples, gradient

    from kd_kernels.train.models import tiny_tokenizer

    eos = tiny_tokenizer().eos_token_id
    ranks = [examples(r, eos) for r in RANK_EXAMPLES]
    assert [sum(t != -100 for x in r for t in x.labels) for r in ranks] == [16, 3]  # uneven
    ddp = ddp_gradients[method]
    union = gradient(method, ranks[0] + ranks[1], 0, 1)  # one process over the same tokens
    own = [gradient(method, r, 0, 1) for r in ranks]
    mean_of_ranks = {k: (own[0][k] + own[1][k]) / 2 for k in own[0]}
    assert not _close(union, mean_of_ranks)  # the two normalizations differ here: the test can tell
    want = union if method in GLOBAL_TOKEN_MEAN else mean_of_ranks
    for k in ddp:
        torch.testing.assert_close(
            ddp[k], want[k], rtol=1e-4, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}"
        )
