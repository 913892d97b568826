"""The run configuration: one dataclass, command-line overrides that reject unknown keys.

Every field is a flag: ``steps`` is ``--steps``, ``kd_ratio`` is ``--kd-ratio``; booleans take
``--flag`` / ``--no-flag``. The config is saved in every checkpoint and restored by ``--resume``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRESETS = ("smollm2", "tiny")
CACHE_METHODS = ("kd", "seqkd", "distillm")  # methods that can train from --teacher-cache
DIST_MODES = ("ddp", "fsdp")
# --dist fsdp: the methods whose training steps never sample from the models (under FSDP2 every forward is
# a collective, and per-rank generation of different lengths would leave the ranks waiting on each other)
FSDP_METHODS = ("sft", "kd", "seqkd")

# Per-method defaults on top of TrainConfig's, used by the command line (a flag given explicitly wins).
# minillm: 40 steps = 5 rollout rounds, sized from measured phase times so that `kd-train minillm` (what
# `make demo` runs) finishes in about 13 minutes on 2 idle CPU cores, teacher answers included
# (docs/TRAINER.md, "MiniLLM demo timing").
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"minillm": {"steps": 40}}


@dataclass
class TrainConfig:
    # what to run
    method: str = "kd"
    preset: str = "smollm2"  # "smollm2", "tiny", or ignored when --teacher is given
    teacher: str = ""  # local path of any Hugging Face causal LM (overrides the preset's teacher)
    student: str = ""  # local path of the student; empty: the teacher with fewer layers
    student_layers: str = ""  # teacher layers kept in the student: "start:stop:step", "0,3,6"; "": every 3rd
    dtype: str = "float32"  # model dtype: float32 or bfloat16
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1" ...
    dist: str = "ddp"  # under torchrun: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2, sharded models)
    seed: int = 1337
    # data
    prompts: str = ""  # a prompts .jsonl (default: the one shipped with kd_kernels.train)
    max_prompts: int = 0  # use only the first N prompts of the file (0: all)
    valid_frac: float = 0.1
    test_frac: float = 0.1
    max_prompt_tokens: int = 96
    cache_dir: str = ""  # where teacher responses are cached (default: ~/.cache/kd_kernels/responses)
    # generation (teacher references, seqkd samples, evaluation)
    max_new_tokens: int = 48
    gen_batch_size: int = 16
    seqkd_temperature: float = 1.0
    # training
    steps: int = 60
    batch_size: int = 8  # sequences per process per step
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kd_ratio: float = 0.5  # r in (1 - r) CE + r forward_kl (kd, seqkd)
    temperature: float = 1.0  # KD temperature
    chunk_size: int = 0  # fused-linear tokens per chunk (0: the library's memory-budget default)
    backend: str = "auto"  # kd_kernels backend
    # sparse teacher (kd, seqkd, distillm): train from an offline top-K cache (kd-train cache-teacher)
    teacher_cache: str = ""  # cache folder; empty: the teacher's full logits every step
    sparse_tail: str = "bucket"  # "bucket", "renormalize" or "ignore" (forward KL only)
    sparse_top_k: int = 0  # ids per token used from the cache (0: all it holds)
    # minillm (paper values; rollouts scaled from 256 to the CPU)
    minillm_alpha: float = 0.2  # teacher mix-in of the sampling distribution p~ = (1-a) q + a p
    minillm_gamma: float = 0.95  # discount of the returns
    minillm_clip: float = 0.2  # PPO ratio clip
    minillm_rollouts: int = 16  # sampled responses per rollout round (per process)
    minillm_ppo_epochs: int = 4  # passes over each round's rollouts (minibatches of --batch-size)
    minillm_temperature: float = 1.0  # rollout sampling temperature
    minillm_top_k: int = 0  # rollout top-k (0: off)
    minillm_top_p: float = 1.0  # rollout top-p (1: off)
    minillm_pt: bool = True  # add 0.5 CE + 0.5 forward KD on the teacher's references
    minillm_whiten: str = "block"  # "block" (official: per minibatch, padded B x W block) or "valid"
    # distillm
    distillm_loss: str = "srkl"  # "srkl" (skew reverse KL) or "skl" (skew forward KL; 0.1B recipe)
    distillm_alpha: float = 0.1  # skew
    distillm_ce: float = 0.0  # weight c of the CE mix: (1 - c) skew + c CE
    distillm_capacity: int = 1000  # replay buffer capacity
    distillm_check_every: int = 0  # validation CE check every N steps (0: once per epoch)
    # gkd (TRL's GKDConfig defaults)
    gkd_lambda: float = 0.5  # probability that a step trains on the student's own samples
    gkd_beta: float = 0.5  # TRL's generalized JSD: 0 forward KL, 1 reverse KL, in between jsd(beta)
    gkd_temperature: float = 0.9  # student (and --gkd-seq-kd teacher) sampling temperature
    gkd_seq_kd: bool = False  # off-policy steps train on teacher samples, not its greedy references
    gkd_estimator: str = "full"  # "full" (exact per-token divergence) or "sampled" (sampled-token RKL)
    # evaluation
    eval_every: int = 0  # validation loss every N steps (0: never during training)
    eval_seeds: str = "10,20,30"
    eval_prompts: int = 0  # evaluate on the first N test prompts (0: all)
    eval_teacher: bool = True  # also score the teacher's own samples, for scale
    skip_eval: bool = False
    # outputs
    out: str = ""  # run directory (metrics.jsonl, summary.json, loss.png, ckpt.pt); empty: out/<method>
    ckpt_every: int = 20
    resume: bool = False
    overwrite: bool = False  # a fresh run into a run directory that already holds one replaces it
    log_every: int = 1
    progress: bool = True

    def seeds(self) -> list[int]:
        return [int(s) for s in self.eval_seeds.split(",") if s.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from saved values; unknown keys are a ValueError (not silently dropped)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(names)}")
    return TrainConfig(**d)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(methods: list[str], *, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The parser; with ``suppress_defaults`` a flag not given is absent from the namespace (so the names
    present are exactly the flags given, whatever their values)."""
    p = argparse.ArgumentParser(
        prog="kd-train",
        description="Distill a causal LM with kd_kernels' fused-linear losses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        **({"argument_default": argparse.SUPPRESS} if suppress_defaults else {}),
    )
    p.add_argument("method", choices=methods, help="training method")
    default = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "method":
            continue
        value = getattr(default, f.name)
        default_kw = {} if suppress_defaults else {"default": value}
        if isinstance(value, bool):
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                           **default_kw)
        else:
            p.add_argument(_flag(f.name), dest=f.name, type=type(value),
                           metavar=type(value).__name__.upper(), **default_kw)
    return p


def parse_args(argv: list[str] | None, methods: list[str]) -> tuple[TrainConfig, set[str]]:
    """Parse the command line. Returns the config and the names of the fields given explicitly.

    Unknown flags exit with argparse's usage error (status 2), naming the flag.
    """
    parser = build_parser(methods)
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**METHOD_DEFAULTS.get(known.method, {}))
    ns = parser.parse_args(argv)
    # "Given on the command line" means given, even with the default's value (--resume --kd-ratio 0.5
    # on a 0.3 run must train with 0.5): a second parse without defaults lists exactly the flags given.
    given = build_parser(methods, suppress_defaults=True).parse_args(argv)
    explicit = set(vars(given)) - {"method"}
    cfg = TrainConfig(**vars(ns))
    validate(cfg)
    return cfg, explicit


def _check_device(device: str) -> None:
    import torch

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device={device!r}: kd-train runs on 'cpu' or 'cuda' (or 'auto')")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device={device!r} but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device={device!r} but only {torch.cuda.device_count()} CUDA device(s) "
                             "are visible")


def validate(cfg: TrainConfig) -> None:
    """Value checks that argparse's types cannot express; each error names the flag and the fix.

    Every numeric flag has a domain; NaN and inf fail the float checks (each is written so that NaN is
    outside it).
    """
    from kd_kernels._backends import BACKEND_NAMES
    from kd_kernels._spec import FP32_TINY

    if cfg.preset not in PRESETS and not cfg.teacher:
        raise ValueError(f"--preset {cfg.preset!r} is unknown; use one of {PRESETS} or --teacher PATH")
    positive = ("steps", "batch_size", "max_new_tokens", "gen_batch_size", "max_prompt_tokens",
                "log_every", "ckpt_every")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{_flag(name)}={getattr(cfg, name)} must be >= 1")
    for name in ("max_prompts", "warmup_steps", "chunk_size", "eval_every", "eval_prompts", "seed"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{_flag(name)}={getattr(cfg, name)} must be >= 0")
    if not 0 < cfg.grad_clip <= math.inf:
        raise ValueError(f"--grad-clip={cfg.grad_clip} must be > 0 (the largest gradient norm kept; "
                         "inf: no clipping). 0 would freeze the weights and a negative value flip the "
                         "gradient")
    if not 0 <= cfg.weight_decay < math.inf:
        raise ValueError(f"--weight-decay={cfg.weight_decay} must be a finite number >= 0")
    if not (0 < cfg.lr < math.inf and 0 <= cfg.min_lr <= cfg.lr):
        raise ValueError(f"--lr={cfg.lr} must be a finite number > 0 and --min-lr={cfg.min_lr} in "
                         "[0, --lr]")
    for name in ("temperature", "seqkd_temperature", "minillm_temperature"):
        value = getattr(cfg, name)
        if not FP32_TINY <= value < math.inf:
            raise ValueError(f"{_flag(name)}={value} must be a finite number > 0 (1.0: unscaled)")
    if cfg.backend not in BACKEND_NAMES:
        raise ValueError(f"--backend={cfg.backend!r} is unknown; use one of {', '.join(BACKEND_NAMES)}")
    _check_device(cfg.device)
    if cfg.dist not in DIST_MODES:
        raise ValueError(f"--dist={cfg.dist!r} is unknown; use 'ddp' or 'fsdp' (they differ only under "
                         "torchrun)")
    if cfg.dist == "fsdp" and cfg.method not in FSDP_METHODS:
        raise ValueError(f"--dist fsdp supports {', '.join(FSDP_METHODS)}, not {cfg.method!r} (it samples "
                         "from the student during training, which FSDP2's collective forwards do not "
                         "allow per rank); use --dist ddp")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it; pass one")
    if not 0.0 <= cfg.kd_ratio <= 1.0:
        raise ValueError(f"--kd-ratio={cfg.kd_ratio} must be in [0, 1] (0: pure CE, 1: pure KD)")
    if not (0 <= cfg.valid_frac < 1 and 0 < cfg.test_frac < 1 and cfg.valid_frac + cfg.test_frac < 1):
        raise ValueError(
            f"--valid-frac={cfg.valid_frac} and --test-frac={cfg.test_frac} must be fractions summing "
            "to less than 1, with a non-empty test split"
        )
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype={cfg.dtype!r} must be 'float32' or 'bfloat16'")
    for name in ("minillm_alpha", "distillm_alpha", "distillm_ce", "minillm_gamma"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{_flag(name)}={getattr(cfg, name)} must be in [0, 1]")
    if not 0.0 < cfg.distillm_alpha < 1.0:
        raise ValueError(f"--distillm-alpha={cfg.distillm_alpha} must be strictly between 0 and 1")
    if not 0 < cfg.minillm_clip < math.inf:
        raise ValueError(f"--minillm-clip={cfg.minillm_clip} must be a finite number > 0")
    for name in ("minillm_rollouts", "minillm_ppo_epochs", "distillm_capacity"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{_flag(name)}={getattr(cfg, name)} must be >= 1")
    if cfg.minillm_temperature <= 0 or cfg.minillm_top_k < 0 or not 0 < cfg.minillm_top_p <= 1:
        raise ValueError("--minillm-temperature must be > 0, --minillm-top-k >= 0 (0: off) and "
                         "--minillm-top-p in (0, 1] (1: off)")
    if cfg.minillm_whiten not in ("block", "valid"):
        raise ValueError(f"--minillm-whiten={cfg.minillm_whiten!r} must be 'block' (official) or "
                         "'valid' (valid tokens only, per rollout round)")
    if cfg.distillm_loss not in ("srkl", "skl"):
        raise ValueError(f"--distillm-loss={cfg.distillm_loss!r} must be 'srkl' or 'skl'")
    if cfg.distillm_check_every < 0:
        raise ValueError(f"--distillm-check-every={cfg.distillm_check_every} must be >= 0")
    for name in ("gkd_lambda", "gkd_beta"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{_flag(name)}={getattr(cfg, name)} must be in [0, 1]")
    if cfg.gkd_temperature <= 0:
        raise ValueError(f"--gkd-temperature={cfg.gkd_temperature} must be > 0")
    if cfg.gkd_estimator not in ("full", "sampled"):
        raise ValueError(f"--gkd-estimator={cfg.gkd_estimator!r} must be 'full' or 'sampled'")
    if cfg.gkd_estimator == "sampled" and cfg.gkd_beta != 1.0:
        raise ValueError(f"--gkd-estimator sampled estimates reverse KL: use it with --gkd-beta 1 "
                         f"(got {cfg.gkd_beta})")
    if cfg.teacher_cache:
        if cfg.method not in CACHE_METHODS:
            raise ValueError(f"--teacher-cache works with {', '.join(CACHE_METHODS)}, not "
                             f"{cfg.method!r} (its teacher terms need the full distribution)")
        if not (Path(cfg.teacher_cache) / "manifest.json").is_file():  # before any model loads
            raise ValueError(f"--teacher-cache {cfg.teacher_cache!r} has no manifest.json; write "
                             "one with `kd-train cache-teacher --out DIR`")
    if cfg.sparse_tail not in ("bucket", "renormalize", "ignore"):
        raise ValueError(f"--sparse-tail={cfg.sparse_tail!r} must be 'bucket', 'renormalize' or "
                         "'ignore'")
    if cfg.sparse_tail == "ignore" and cfg.method == "distillm":
        raise ValueError("--sparse-tail ignore is defined for forward KL only; distillm's skew KL "
                         "needs 'bucket' or 'renormalize'")
    if cfg.sparse_top_k < 0:
        raise ValueError(f"--sparse-top-k={cfg.sparse_top_k} must be >= 0 (0: all the cache holds)")
    try:
        cfg.seeds()
    except ValueError:
        raise ValueError(f"--eval-seeds={cfg.eval_seeds!r} must be comma-separated integers") from None

