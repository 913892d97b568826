"""kd-train's failures after parsing: one clear line, a nonzero exit, no traceback, nothing lost (issue [N]).

Everything here fails before (or without) a training step, so the file runs in seconds; the resume test
that trains uses the tiny preset for two steps.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

from _common import tiny_train_config

from kd_kernels.train import cli
from kd_kernels.train import config as C
from kd_kernels.train import data as D
from kd_kernels.train import trainer as T

TINY = [
    "--preset",
    "tiny",
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--max-prompts",
    "24",
    "--max-new-tokens",
    "4",
    "--skip-eval",
    "--no-progress",
    "--device",
    "cpu",
]


def run_cli(argv, capsys) -> tuple[int, str]:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def one_clean_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("kd-train: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------- flag domains


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--temperature", "nan"], "--temperature=nan"),
        (["--temperature", "inf"], "--temperature=inf"),
        (["--temperature", "0"], "--temperature=0"),
        (["--grad-clip", "-1"], "--grad-clip=-1.0 must be > 0"),
        (["--grad-clip", "0"], "--grad-clip=0.0 must be > 0"),
        (["--grad-clip", "nan"], "--grad-clip"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--weight-decay", "-0.1"], "--weight-decay"),
        (["--kd-ratio", "nan"], "--kd-ratio"),
        (["--valid-frac", "nan"], "--valid-frac"),
        (["--warmup-steps", "-1"], "--warmup-steps"),
        (["--chunk-size", "-8"], "--chunk-size"),
        (["--backend", "tpu"], "--backend='tpu' is unknown"),
        (["--device", "tpu"], "--device='tpu'"),
        (["--device", "banana"], "--device='banana' is not a device"),
        (["--resume", "--overwrite"], "pass one"),
        (["--dist", "fsdp1"], "--dist='fsdp1' is unknown"),
    ],
)
def test_flag_domains_checked_at_parse_time(flags, match, capsys):
    with pytest.raises(ValueError, match=match):
        C.parse_args(["kd", *flags], ["kd"])
    rc, err = run_cli(["kd", *flags], capsys)
    assert rc == 2 and match.split("=")[0] in one_clean_line(err)


@pytest.mark.parametrize(
    "method, flags, match",
    [
        ("minillm", ["--minillm-clip", "inf"], "--minillm-clip"),
        ("gkd", ["--gkd-temperature", "inf"], "--gkd-temperature=inf"),  # was accepted (uniform)
        (
            "gkd",
            ["--gkd-temperature", "nan"],
            "--gkd-temperature=nan",
        ),  # failed late, in transformers
        ("gkd", ["--gkd-temperature", "1e-320"], "--gkd-temperature=1e-320"),
        ("kd", ["--kd-ratio", "1e-320"], "--kd-ratio=1e-320"),  # was the library's "ce_weight=inf"
        ("seqkd", ["--kd-ratio", "1e-9"], "--kd-ratio=1e-09"),
        ("kd", ["--lr", "1e-320", "--min-lr", "0"], "--lr=1e-320"),  # 0 in float32: no training
        ("kd", ["--grad-clip", "1e-320"], "--grad-clip=1e-320"),  # 0 in float32: frozen weights
    ],
)
def test_method_flag_domains_checked_at_parse_time(method, flags, match, capsys):
    """Issue #26: every numeric flag is checked up front, and the message names the flag."""
    with pytest.raises(ValueError, match=match):
        C.parse_args([method, *flags], [method])
    rc, err = run_cli([method, *flags], capsys)
    assert rc == 2 and match.split("=")[0] in one_clean_line(err)


def test_smallest_accepted_kd_ratio_is_used_as_given():
    """The float32 floor of --kd-ratio: at 2**-24 the KD term still counts; 0 is pure CE."""
    cfg, _ = C.parse_args(["kd", "--kd-ratio", str(2.0**-24)], ["kd"])
    assert cfg.kd_ratio == 2.0**-24
    assert C.parse_args(["kd", "--kd-ratio", "0"], ["kd"])[0].kd_ratio == 0.0


@pytest.mark.parametrize("method", ["minillm", "gkd", "distillm"])
def test_dist_fsdp_refuses_methods_that_sample_from_the_student(method, capsys):
    """Under FSDP2 every forward is a collective: per-rank generation of different lengths would hang."""
    with pytest.raises(ValueError, match=f"--dist fsdp supports sft, kd, seqkd, not '{method}'"):
        C.parse_args([method, "--dist", "fsdp"], [method])
    rc, err = run_cli([method, "--dist", "fsdp"], capsys)
    assert rc == 2 and "--dist ddp" in one_clean_line(err)
    C.parse_args([method, "--dist", "ddp"], [method])  # the default layout takes every method


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_device_cuda_without_cuda(capsys):
    rc, err = run_cli(["kd", "--device", "cuda"], capsys)
    assert rc == 2 and "CUDA is not available" in one_clean_line(err)


def test_flag_given_at_its_default_value_counts_as_given():
    """Defect 2: --resume --kd-ratio 0.5 (the default) on a 0.3 run must train with 0.5."""
    _, explicit = C.parse_args(["kd", "--resume", "--kd-ratio", "0.5", "--progress"], ["kd"])
    assert explicit == {"resume", "kd_ratio", "progress"}
    _, explicit = C.parse_args(["kd"], ["kd"])
    assert explicit == set()


def _fake_checkpoint(out: Path, **config) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cfg = C.TrainConfig(**config).to_dict()
    state = {
        "config": cfg,
        "step": 3,
        "student": {},
        "optimizer": {},
        "train_time_s": 1.0,
        "torch_rng": torch.get_rng_state(),
        "method_state": {},
    }
    path = out / T.CKPT_NAME
    torch.save(state, path)
    return path


def test_resume_applies_flags_equal_to_the_default(tmp_path):
    out = tmp_path / "run"
    _fake_checkpoint(out, kd_ratio=0.3, steps=10)
    cfg, explicit = C.parse_args(["kd", "--resume", "--out", str(out), "--kd-ratio", "0.5"], ["kd"])
    merged = T.resume_config(cfg, explicit)
    assert merged.kd_ratio == 0.5 and merged.steps == 10
    cfg, explicit = C.parse_args(["kd", "--resume", "--out", str(out)], ["kd"])
    assert T.resume_config(cfg, explicit).kd_ratio == 0.3


# ---------------------------------------------------------------------------------------- --resume


def _resume_error(tmp_path, capsys, *extra) -> str:
    rc, err = run_cli(["kd", *TINY, "--out", str(tmp_path / "run"), "--resume", *extra], capsys)
    assert rc == 1
    return one_clean_line(err)


def test_resume_without_checkpoint(tmp_path, capsys):
    assert "no checkpoint at" in _resume_error(tmp_path, capsys)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated zip"])
def test_resume_truncated_or_corrupt_checkpoint(tmp_path, capsys, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / T.CKPT_NAME).write_bytes(content)
    assert "is not a readable checkpoint" in _resume_error(tmp_path, capsys)


def test_resume_truncated_real_checkpoint(tmp_path, capsys):
    path = _fake_checkpoint(tmp_path / "run", steps=10)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "is not a readable checkpoint" in _resume_error(tmp_path, capsys)


def test_resume_foreign_pickle(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    torch.save([1, 2, 3], tmp_path / "run" / T.CKPT_NAME)
    assert "is not a kd-train checkpoint" in _resume_error(tmp_path, capsys)


def test_resume_another_method(tmp_path, capsys):
    _fake_checkpoint(tmp_path / "run", method="sft", steps=10)
    assert "trained with method 'sft', not 'kd'" in _resume_error(tmp_path, capsys)


def test_resume_unknown_config_key(tmp_path, capsys):
    path = _fake_checkpoint(tmp_path / "run", steps=10)
    state = torch.load(path, weights_only=False)
    state["config"]["from_the_future"] = 1
    torch.save(state, path)
    line = _resume_error(tmp_path, capsys)
    assert "cannot read" in line and "from_the_future" in line


def test_resume_steps_below_checkpoint_step(tmp_path, capsys):
    _fake_checkpoint(tmp_path / "run", steps=10)  # at step 3
    line = _resume_error(tmp_path, capsys, "--steps", "2")
    assert "is at step 3, past --steps 2" in line


# ------------------------------------------------------------------------------------ run directory


def test_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    rc, err = run_cli(["kd", *TINY, "--out", str(f)], capsys)
    assert rc == 1 and "is a file, not a directory" in one_clean_line(err)
    rc, err = run_cli(["kd", *TINY, "--out", str(f / "sub")], capsys)
    assert rc == 1 and "cannot create the directory" in one_clean_line(err)


def test_fresh_run_refuses_an_existing_run_dir(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    rc, err = run_cli(["kd", *TINY, "--out", str(out)], capsys)
    assert rc == 1 and "already holds a run (metrics.jsonl)" in one_clean_line(err)
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'  # nothing deleted
    cfg = tiny_train_config("kd", tmp_path, out=str(out), overwrite=True)
    T.prepare_run_dir(cfg).release()
    assert not (out / "metrics.jsonl").exists()


def test_run_dir_lock_names_the_other_process(tmp_path, capsys):
    import os

    out = tmp_path / "run"
    out.mkdir()
    held = T.RunDirLock(out)
    try:
        rc, err = run_cli(["kd", *TINY, "--out", str(out)], capsys)
        line = one_clean_line(err)
        assert rc == 1 and f"in use by another kd-train process (pid {os.getpid()})" in line
    finally:
        held.release()
    T.RunDirLock(out).release()  # free again once released


def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Disk full while saving: a clear TrainError, the old ckpt.pt untouched, no temp file left."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = C.TrainConfig(out=str(tmp_path))
    path = tmp_path / T.CKPT_NAME
    T.save_checkpoint(path, model, opt, cfg, 1, 0.5)
    before = path.read_bytes()

    def full_disk(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(T.TrainError, match="No space left on device.*previous ckpt.pt.*intact"):
        T.save_checkpoint(path, model, opt, cfg, 2, 1.0)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [T.CKPT_NAME]


def test_metrics_rows_are_strict_json():
    row = {
        "step": 1,
        "loss": float("nan"),
        "kd": float("inf"),
        "nested": [1.0, float("-inf")],
        "n": 3,
    }
    text = json.dumps(T._finite_or_none(row), allow_nan=False)
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in {text}"))
    assert back == {"step": 1, "loss": None, "kd": None, "nested": [1.0, None], "n": 3}


def test_metrics_reader_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert T._json_rows(path, lambda r: True) == [
        '{"step": 1, "loss": 2.0}',
        '{"step": 2, "loss": 1.5}',
    ]


# ---------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": \n', r":2: not valid JSON"),
        ('{"id": 1, "prompt": "a"}\n5\n', r":2: .*JSON object.*bare int"),
        ('"just a string"\n', r":1: .*bare str"),
        ("[1, 2]\n", r":1: .*bare list"),
        (
            '{"id": 5, "prompt": "a"}\n{"id": "5", "prompt": "b"}\n',
            r":2: duplicate prompt id '5' \(line 1",
        ),
        ('{"id": 1}\n', r":1: each line needs 'id' and 'prompt'"),
        ('{"id": 1, "prompt": 3}\n', r":1: 'prompt' must be a non-empty string"),
        ('{"id": [1], "prompt": "a"}\n', r":1: 'id' must be a string or an integer"),
        ("", r"no prompts"),
        ("\n\n", r"no prompts"),
    ],
)
def test_malformed_prompts_name_file_and_line(tmp_path, content, match):
    p = tmp_path / "p.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        D.load_prompts(str(p))


def test_prompts_not_utf8_and_missing(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(b'{"id": 1, "prompt": "\xff"}\n')
    with pytest.raises(ValueError, match="not UTF-8"):
        D.load_prompts(str(p))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_prompts(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="is a directory"):
        D.load_prompts(str(tmp_path))


def test_bad_prompts_file_is_one_line_from_the_cli(tmp_path, capsys, response_cache):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": 1, "prompt": "a"}\n{oops}\n')
    rc, err = run_cli(
        [
            "kd",
            *TINY,
            "--prompts",
            str(p),
            "--out",
            str(tmp_path / "run"),
            "--cache-dir",
            str(response_cache),
        ],
        capsys,
    )
    assert rc == 1 and f"{p}:2: not valid JSON" in one_clean_line(err)


def test_unexpected_failure_is_still_one_line(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise KeyError("surprise")

    monkeypatch.setattr(cli, "train", boom)
    monkeypatch.delenv("KD_TRAIN_TRACEBACK", raising=False)
    rc, err = run_cli(["kd", "--out", str(tmp_path / "run")], capsys)
    line = one_clean_line(err)
    assert rc == 1 and "KeyError" in line and "KD_TRAIN_TRACEBACK=1" in line


# ------------------------------------------------------------------------------------------ Ctrl-C


@pytest.mark.parametrize("first", [T.Interrupted(3), KeyboardInterrupt()])
def test_ctrl_c_during_shutdown_prints_no_traceback(first, monkeypatch, capsys):
    """Issue #26: a Ctrl-C while kd-train shuts down after the first one (here: while the CLI
    releases the process group) exits 130 with one line, not a KeyboardInterrupt traceback."""
    import signal

    import torch.distributed as dist

    def interrupted_run(cfg, explicit):
        raise first

    def ctrl_c_during_shutdown():
        signal.raise_signal(signal.SIGINT)  # the user's next Ctrl-C
        return False

    monkeypatch.setattr(cli, "train", interrupted_run)
    monkeypatch.setattr(dist, "is_initialized", ctrl_c_during_shutdown)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        rc = cli.main(["kd", *TINY])
    except KeyboardInterrupt:  # what the console script would print as a traceback
        pytest.fail("a Ctrl-C during shutdown escaped kd-train's main")
    finally:
        signal.signal(signal.SIGINT, before)
    err = capsys.readouterr().err
    assert rc == 130 and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is before
