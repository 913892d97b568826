"""The run configuration: one dataclass, command-line overrides that reject unknown keys.

Every field is a flag: ``steps`` is ``--steps``, ``kd_ratio`` is ``--kd-ratio``; booleans take
``--flag`` / ``--no-flag``. The config is saved in every checkpoint and restored by ``--resume``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
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
# the smallest nonzero --kd-ratio r: float32's unit roundoff. Below it r·KD is lost next to
# (1 − r)·CE in the float32 loss, and the fused call's CE weight (1 − r)/r (up to 2**24 here)
# would overflow for a denormal r.
KD_RATIO_MIN = 2.0**-24


def _opt(default: Any, help: str, methods: tuple[str, ...] | None = None) -> Any:
    """A config field: its default, its one-line ``--help``, the methods using it (None: all)."""
    return field(default=default, metadata={"help": help, "methods": methods})


@dataclass
class TrainConfig:
    # what to run (``method`` is the subcommand, not a flag)
    method: str = "kd"
    preset: str = _opt(
        "smollm2",
        "model pair: 'smollm2' (SmolLM2-135M-Instruct) or 'tiny' (a "
        "random 4-layer Llama for smoke runs); ignored with --teacher",
    )
    teacher: str = _opt(
        "", "local path of any Hugging Face causal LM (overrides the preset's teacher)"
    )
    student: str = _opt("", "local path of the student; empty: the teacher with --student-layers")
    student_layers: str = _opt(
        "", "teacher layers kept in the student: 'start:stop:step' or '0,3,6'; empty: every 3rd"
    )
    dtype: str = _opt("float32", "model dtype: 'float32' or 'bfloat16'")
    device: str = _opt("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    dist: str = _opt(
        "ddp",
        "under torchrun: 'ddp' (DistributedDataParallel) or 'fsdp' (FSDP2, "
        "sharded models; sft, kd, seqkd)",
    )
    seed: int = _opt(1337, "data order, sampling seeds (and the tiny preset's weights)")
    # data
    prompts: str = _opt("", "a prompts .jsonl; empty: the one shipped with kd_kernels.train")
    max_prompts: int = _opt(0, "use only the first N prompts of the file (0: all)")
    valid_frac: float = _opt(0.1, "fraction of the prompts in the validation split")
    test_frac: float = _opt(0.1, "fraction of the prompts in the test split")
    max_prompt_tokens: int = _opt(96, "prompts are cut to this many tokens")
    cache_dir: str = _opt(
        "", "where teacher responses are cached; empty: ~/.cache/kd_kernels/responses"
    )
    lm_data: str = _opt(
        "",
        "plain-text pre-training file (documents separated by blank lines) for "
        "the --*-lm-coef CE term",
        ("minillm", "distillm"),
    )
    # generation (teacher references, seqkd samples, evaluation)
    max_new_tokens: int = _opt(
        48, "length of teacher references, samples and evaluation generations"
    )
    gen_batch_size: int = _opt(16, "prompts per generate call")
    seqkd_temperature: float = _opt(
        1.0, "temperature of the teacher samples trained on", ("seqkd",)
    )
    # training
    steps: int = _opt(60, "optimizer steps")
    batch_size: int = _opt(8, "sequences per process per step")
    lr: float = _opt(1e-4, "AdamW learning rate (betas 0.9, 0.95) after the linear warmup")
    min_lr: float = _opt(1e-5, "learning rate the cosine decay ends at")
    warmup_steps: int = _opt(5, "linear warmup steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    grad_clip: float = _opt(1.0, "largest gradient norm kept (inf: no clipping)")
    kd_ratio: float = _opt(
        0.5, "r of the mix (1 - r) CE + r forward KL (0: pure CE, 1: pure KD)", ("kd", "seqkd")
    )
    temperature: float = _opt(
        1.0,
        "KD temperature of the distillation loss (minillm: its "
        "--minillm-pt term; gkd computes its loss at 1, as TRL)",
        ("kd", "seqkd", "minillm", "distillm"),
    )
    chunk_size: int = _opt(
        0, "fused-linear tokens per chunk (0: the library's memory-budget default)"
    )
    backend: str = _opt("auto", "kd_kernels backend: auto, torch, cpu, triton or cuda")
    # sparse teacher: train from an offline top-K cache (kd-train cache-teacher)
    teacher_cache: str = _opt(
        "",
        "folder written by kd-train cache-teacher; empty: the teacher's full logits every step",
        CACHE_METHODS,
    )
    sparse_tail: str = _opt(
        "bucket",
        "mass outside the cached top-K: 'bucket', 'renormalize' or 'ignore' (forward KL only)",
        CACHE_METHODS,
    )
    sparse_top_k: int = _opt(
        0, "ids per token used from the cache (0: all it holds)", CACHE_METHODS
    )
    # minillm (paper values; rollouts scaled from 256 to the CPU)
    minillm_alpha: float = _opt(
        0.2, "teacher mix-in a of the sampling distribution (1 - a) q + a p", ("minillm",)
    )
    minillm_gamma: float = _opt(0.95, "discount of the returns", ("minillm",))
    minillm_clip: float = _opt(0.2, "PPO ratio clip", ("minillm",))
    minillm_rollouts: int = _opt(
        16, "sampled responses per rollout round (per process)", ("minillm",)
    )
    minillm_ppo_epochs: int = _opt(
        4, "passes over each round's rollouts (minibatches of --batch-size)", ("minillm",)
    )
    minillm_temperature: float = _opt(
        1.0,
        "rollout sampling temperature, also of both models in "
        "the single-step reverse KL (as LMOps)",
        ("minillm",),
    )
    minillm_top_k: int = _opt(0, "rollout top-k (0: off)", ("minillm",))
    minillm_top_p: float = _opt(1.0, "rollout top-p (1: off)", ("minillm",))
    minillm_pt: bool = _opt(
        True, "add 0.5 CE + 0.5 forward KD on the teacher's references", ("minillm",)
    )
    minillm_whiten: str = _opt(
        "block",
        "advantage whitening: 'block' (official: per minibatch, "
        "padded B x W block) or 'valid' (valid tokens, per round)",
        ("minillm",),
    )
    minillm_lm_coef: float = _opt(
        0.0,
        "weight of the student's CE on --lm-data blocks added to "
        "every step (LMOps: 1 on OpenWebText; 0: off)",
        ("minillm",),
    )
    # distillm
    distillm_loss: str = _opt(
        "srkl",
        "'srkl' (skew reverse KL) or 'skl' (skew forward KL; the 0.1B recipe)",
        ("distillm",),
    )
    distillm_alpha: float = _opt(0.1, "skew alpha, in (0, 1)", ("distillm",))
    distillm_ce: float = _opt(0.0, "weight c of the CE mix (1 - c) skew + c CE", ("distillm",))
    distillm_capacity: int = _opt(1000, "replay buffer capacity", ("distillm",))
    distillm_check_every: int = _opt(
        0, "validation CE check every N steps (0: once per epoch)", ("distillm",)
    )
    distillm_lm_coef: float = _opt(
        0.0,
        "weight of the student's CE on --lm-data blocks added to "
        "every step (the recipes: 1 on OpenWebText; 0: off)",
        ("distillm",),
    )
    # gkd (TRL's GKDConfig defaults)
    gkd_lambda: float = _opt(
        0.5, "probability that a step trains on the student's own samples", ("gkd",)
    )
    gkd_beta: float = _opt(
        0.5, "TRL's generalized JSD: 0 forward KL, 1 reverse KL, in between jsd(beta)", ("gkd",)
    )
    gkd_temperature: float = _opt(
        0.9, "student (and --gkd-seq-kd teacher) sampling temperature", ("gkd",)
    )
    gkd_seq_kd: bool = _opt(
        False, "off-policy steps train on teacher samples, not its greedy references", ("gkd",)
    )
    gkd_estimator: str = _opt(
        "full",
        "'full' (exact per-token divergence) or 'sampled' "
        "(sampled-token reverse KL; needs --gkd-beta 1)",
        ("gkd",),
    )
    # evaluation
    eval_every: int = _opt(0, "validation CE / KL every N steps (0: never during training)")
    eval_seeds: str = _opt("10,20,30", "comma-separated sampling seeds of the Rouge-L evaluation")
    eval_prompts: int = _opt(0, "evaluate on the first N test prompts (0: all)")
    eval_teacher: bool = _opt(True, "also score the teacher's own samples, for scale")
    skip_eval: bool = _opt(False, "skip the final evaluation")
    # outputs
    out: str = _opt(
        "",
        "run directory (config.json, metrics.jsonl, summary.json, loss.png, "
        "ckpt.pt); empty: out/METHOD",
    )
    ckpt_every: int = _opt(20, "checkpoint every N steps (also at the end and on Ctrl-C)")
    resume: bool = _opt(False, "continue the run in --out from its checkpoint")
    overwrite: bool = _opt(False, "a fresh run into an --out that holds a run replaces it")
    log_every: int = _opt(1, "append a metrics.jsonl row every N steps")
    progress: bool = _opt(True, "progress bars")

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


# ---------------------------------------------------------------------------------------- flags

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "method"}
BUILTIN_METHODS = ("sft", "kd", "seqkd", "minillm", "distillm", "gkd")
# per-invocation actions, not part of a run's description: never written to config.json
NOT_SAVED = ("resume", "overwrite")
CONFIG_NAME = "config.json"  # the resolved config in every run directory (loadable with --config)


def owners(name: str) -> tuple[str, ...] | None:
    """The methods that use field ``name`` (None: every method)."""
    return FIELDS[name].metadata["methods"]


def method_fields(method: str) -> list[str]:
    """The fields (flags) ``method`` takes: the common ones and its own. A method registered outside
    kd_kernels.train (not in BUILTIN_METHODS) takes every flag."""
    return [
        n
        for n in FIELDS
        if method not in BUILTIN_METHODS or owners(n) is None or method in owners(n)
    ]


def method_defaults(method: str) -> dict[str, Any]:
    """Every field's default for ``method``: TrainConfig's, with METHOD_DEFAULTS on top."""
    d = TrainConfig()
    return {n: getattr(d, n) for n in FIELDS} | METHOD_DEFAULTS.get(method, {})


def _show(value: Any) -> str:
    return repr(value) if value == "" else str(value)


def _add_flag(group, name: str, default: Any | None) -> None:
    """``--name`` on ``group``; ``default`` (None: not shown) goes into the help text. The parser's
    namespace holds only the flags given (argparse.SUPPRESS): defaults are applied by parse_args."""
    f = FIELDS[name]
    text = f.metadata["help"].replace("%", "%%")
    if default is not None:
        text += f" (default: {_show(default)})"
    kind = type(f.default)
    if kind is bool:
        group.add_argument(
            _flag(name),
            dest=name,
            action=argparse.BooleanOptionalAction,
            default=argparse.SUPPRESS,
            help=text,
        )
    else:
        group.add_argument(
            _flag(name),
            dest=name,
            type=kind,
            default=argparse.SUPPRESS,
            metavar=kind.__name__.upper(),
            help=text,
        )


def _method_parser(sub, method: str, summary: str) -> argparse.ArgumentParser:
    summary = summary.rstrip(".")
    sp = sub.add_parser(
        method,
        help=summary,
        description=f"kd-train {method}: {summary}",
        usage=f"kd-train {method} [-h] [--config FILE] [flags]",
        argument_default=argparse.SUPPRESS,
    )
    sp.add_argument(
        "--config",
        metavar="FILE",
        help="a .json, .yaml or .yml file of flag values "
        "(keys as in config.json: kd_ratio, steps ...); flags on the command line win",
    )
    defaults = method_defaults(method)
    names = method_fields(method)
    groups = {
        None: sp.add_argument_group("common flags"),
        method: sp.add_argument_group(f"{method} flags"),
    }
    for name in names:
        _add_flag(groups[method if owners(name) else None], name, defaults[name])
    return sp


def build_parser(
    methods: list[str] | dict[str, str],
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """``kd-train METHOD [flags]``: one subcommand per method, each taking the common flags and its
    own (``methods``: names, or names and their one-line descriptions). Returns the parser and the
    subcommands' parsers."""
    summaries = methods if isinstance(methods, dict) else dict.fromkeys(methods, "")
    p = argparse.ArgumentParser(
        prog="kd-train",
        description="Distill a causal LM with kd_kernels' fused-linear losses. "
        "`kd-train METHOD --help` lists the flags of METHOD.",
        epilog="also: `kd-train compare [--methods ...] [--seeds ...] [flags]` (several methods, "
        "one table) and `kd-train cache-teacher --top-k K --out DIR [flags]` (an offline "
        "teacher cache); see docs/TRAINER.md",
    )
    sub = p.add_subparsers(dest="method", metavar="METHOD", required=True, title="methods")
    return p, {method: _method_parser(sub, method, text) for method, text in summaries.items()}


def flags_markdown() -> str:
    """The flags reference in docs/TRAINER.md, from the fields' metadata (a test compares)."""
    lines = ["| flag | default | methods | meaning |", "|---|---|---|---|"]
    for name, f in FIELDS.items():
        flag = f"`{_flag(name)}`"
        if type(f.default) is bool:
            flag += f" / `--no-{_flag(name)[2:]}`"
        default = f"`{_show(f.default)}`"
        lines.append(
            f"| {flag} | {default} | {', '.join(owners(name) or ('all',))} | {f.metadata['help']} |"
        )
    for method, values in METHOD_DEFAULTS.items():
        shown = ", ".join(f"`{_flag(k)} {v}`" for k, v in values.items())
        lines.append(f"\n`kd-train {method}` defaults to {shown}.")
    return "\n".join(lines) + "\n"


def _unknown_flags_message(extra: list[str], method: str) -> str:
    """argparse's "unrecognized arguments", with each flag's owner or the closest flag name."""
    hints = []
    mine = [_flag(n) for n in method_fields(method)] + ["--config"]
    for arg in extra:
        name = arg.split("=", 1)[0]
        if not name.startswith("--"):
            continue
        key = name[2:].removeprefix("no-").replace("-", "_")
        if key in FIELDS and owners(key):
            hints.append(f"{name} is a flag of {', '.join(owners(key))}, not of {method}")
        elif close := difflib.get_close_matches(name, mine, n=1):
            hints.append(f"{name}: did you mean {close[0]}?")
    text = f"unrecognized arguments: {' '.join(extra)}"
    return text + (f" ({'; '.join(hints)})" if hints else "")


def parse_args(
    argv: list[str] | None, methods: list[str] | dict[str, str]
) -> tuple[TrainConfig, set[str]]:
    """Parse the command line. Returns the config and the names of the fields given explicitly (on
    the command line or in the ``--config`` file, even at their default values).

    Precedence: TrainConfig's defaults < METHOD_DEFAULTS < the ``--config`` file < the command line.
    Unknown flags exit with argparse's usage error (status 2), naming the flag; a bad value or
    config file is a ValueError naming the flag or key.
    """
    parser, subcommands = build_parser(methods)
    ns, extra = parser.parse_known_args(argv)
    if extra:
        subcommands[ns.method].error(_unknown_flags_message(extra, ns.method))
    given = {k: v for k, v in vars(ns).items() if k not in ("method", "config")}
    from_file = load_config_file(ns.config, ns.method) if getattr(ns, "config", None) else {}
    values = method_defaults(ns.method) | from_file | given
    cfg = TrainConfig(method=ns.method, **values)
    validate(cfg)
    return cfg, set(from_file) | set(given)


def shared_run_values(argv: list[str], methods: list[str]) -> dict[str, Any]:
    """``kd-train compare``'s run flags (and ``--config`` file), given once for several methods: the
    values given, by field name. A flag that none of ``methods`` takes, or that no method knows, is
    a ValueError; ``method_argv`` hands each run the ones it takes."""
    p = argparse.ArgumentParser(
        prog="kd-train compare",
        add_help=False,
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config")
    for name in FIELDS:
        _add_flag(p, name, None)
    ns, extra = p.parse_known_args(argv)
    if extra:
        raise ValueError(f"unrecognized arguments: {' '.join(extra)} (see kd-train METHOD --help)")
    given = {k: v for k, v in vars(ns).items() if k != "config"}
    values = (load_config_file(ns.config, None) if getattr(ns, "config", None) else {}) | given
    for name in values:
        if owners(name) and not set(owners(name)) & set(methods):
            raise ValueError(
                f"{_flag(name)} is a flag of {', '.join(owners(name))}; none of the "
                f"methods {', '.join(methods)} takes it"
            )
    return values


def method_argv(method: str, values: dict[str, Any]) -> list[str]:
    """The command-line flags of the ``values`` that ``method`` takes."""
    argv = []
    for name in method_fields(method):
        if name in values:
            value = values[name]
            if isinstance(value, bool):
                argv.append(_flag(name) if value else "--no-" + _flag(name)[2:])
            else:
                argv += [_flag(name), str(value)]
    return argv


# ------------------------------------------------------------------------------------ config files


def _read_config_file(path: str) -> Any:
    suffix = Path(path).suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"--config {path}: use a .json, .yaml or .yml file")
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from None
    if suffix == ".json":
        try:
            return json.loads(text)
        except ValueError as e:
            raise ValueError(f"--config {path} is not valid JSON ({e})") from None
    try:
        import yaml
    except ImportError:
        raise ValueError(
            f"--config {path}: reading YAML needs PyYAML (pip install pyyaml, or "
            '"kd_kernels[train]"), or use a .json file'
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        why = " ".join(str(e).split())
        raise ValueError(f"--config {path} is not valid YAML ({why})") from None


def _coerce(path: str, key: str, value: Any) -> Any:
    """``value`` as the type of field ``key`` (a float also from an int, or from a string such as
    YAML's "1e-4"); any other type is a ValueError naming the key."""
    kind = type(FIELDS[key].default)
    if isinstance(value, bool) == (kind is bool):  # True is an int to Python, not to a config
        if isinstance(value, kind):
            return value
        if kind is float and isinstance(value, int):
            return float(value)
        if kind is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    hint = "; quote it" if kind is str else ""
    raise ValueError(
        f"--config {path}: {key}: {value!r} is not a{'n' if kind is int else ''} "
        f"{kind.__name__} (the type {_flag(key)} takes){hint}"
    )


def load_config_file(path: str, method: str | None) -> dict[str, Any]:
    """The field values in a config file (keys as in ``config.json``; ``kd-ratio`` spelled with
    dashes works too). Unknown keys, keys of other methods than ``method`` (None: any method) and
    values of the wrong type are a ValueError naming the key (and the closest key for an unknown
    one)."""
    data = _read_config_file(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"--config {path}: expected a mapping of keys to values, got {type(data).__name__}"
        )
    values = {}
    for raw, value in data.items():
        key = str(raw).replace("-", "_")
        if key == "method":
            if method is None or value != method:
                raise ValueError(
                    f"--config {path} is for method {value!r}"
                    + (
                        "; remove the method key to use it with kd-train compare"
                        if method is None
                        else f", not {method!r}; run kd-train {value} --config {path}"
                    )
                )
            continue
        if key not in FIELDS:
            known = method_fields(method) if method else list(FIELDS)
            close = difflib.get_close_matches(key, known, n=1) or difflib.get_close_matches(
                key, FIELDS, n=1
            )
            raise ValueError(
                f"--config {path}: unknown key {raw!r}"
                + (f"; did you mean {close[0]!r}?" if close else "")
            )
        if method is not None and key not in method_fields(method):
            raise ValueError(
                f"--config {path}: {key} is a flag of {', '.join(owners(key))}, not "
                f"of {method}; remove it or run kd-train {owners(key)[0]}"
            )
        values[key] = _coerce(path, key, value)
    return values


def config_file_dict(cfg: TrainConfig) -> dict[str, Any]:
    """What ``config.json`` holds: the method and the value of every flag it takes (but --resume and
    --overwrite, which are actions of one invocation); non-finite floats as strings ("inf")."""

    def plain(v: Any) -> Any:
        return str(v) if isinstance(v, float) and not math.isfinite(v) else v

    return {"method": cfg.method} | {
        n: plain(getattr(cfg, n)) for n in method_fields(cfg.method) if n not in NOT_SAVED
    }


def config_text(cfg: TrainConfig) -> str:
    """The text of ``config.json`` for ``cfg`` (loadable with ``kd-train METHOD --config PATH``)."""
    return json.dumps(config_file_dict(cfg), indent=2, allow_nan=False) + "\n"


def _check_device(device: str) -> None:
    import torch

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device={device!r}: kd-train runs on 'cpu' or 'cuda' (or 'auto')")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device={device!r} but CUDA is not available here; use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device={device!r} but only {torch.cuda.device_count()} CUDA device(s) "
                "are visible"
            )


def _check_lm_data(cfg: TrainConfig) -> None:
    """The ``--*-lm-coef`` flags are finite and >= 0; the one of ``cfg.method``, when > 0, needs
    ``--lm-data``: an existing, readable, non-empty UTF-8 file (its first MiB is read here)."""
    coefs = [n for n in FIELDS if n.endswith("_lm_coef")]
    for name in coefs:
        if not 0 <= getattr(cfg, name) < math.inf:
            raise ValueError(
                f"{_flag(name)}={getattr(cfg, name)} must be a finite number >= 0 (0: off)"
            )
    on = [n for n in coefs if cfg.method in (owners(n) or ()) and getattr(cfg, n) > 0]
    if not on:
        return
    flag = f"{_flag(on[0])} {getattr(cfg, on[0])}"
    if not cfg.lm_data:
        raise ValueError(
            f"{flag} needs --lm-data PATH, a plain-text file of pre-training text; "
            f"pass one or set {_flag(on[0])} 0"
        )
    path = Path(cfg.lm_data)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ValueError(f"--lm-data {cfg.lm_data!r} {what}; pass a plain-text file (for {flag})")
    try:
        with path.open("rb") as f:
            head = f.read(2**20)
    except OSError as e:
        raise ValueError(
            f"--lm-data {cfg.lm_data!r}: cannot read it ({e.strerror}); pass a "
            f"readable plain-text file (for {flag})"
        ) from None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not a multi-byte character cut at the end of the first MiB
            raise ValueError(
                f"--lm-data {cfg.lm_data!r} is not UTF-8 text (byte {e.start}); save it as UTF-8"
            ) from None
        text = head[: e.start].decode("utf-8")
    if not text.strip():
        raise ValueError(
            f"--lm-data {cfg.lm_data!r} is empty; pass a file holding pre-training "
            f"text (for {flag})"
        )


def validate(cfg: TrainConfig) -> None:
    """Value checks that argparse's types cannot express; each error names the flag and the fix.

    Every numeric flag has a domain; NaN and inf fail the float checks (each is written so that NaN is
    outside it).
    """
    from kd_kernels._backends import BACKEND_NAMES
    from kd_kernels._spec import FP32_TINY

    if cfg.preset not in PRESETS and not cfg.teacher:
        raise ValueError(
            f"--preset {cfg.preset!r} is unknown; use one of {PRESETS} or --teacher PATH"
        )
    positive = (
        "steps",
        "batch_size",
        "max_new_tokens",
        "gen_batch_size",
        "max_prompt_tokens",
        "log_every",
        "ckpt_every",
    )
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{_flag(name)}={getattr(cfg, name)} must be >= 1")
    for name in ("max_prompts", "warmup_steps", "chunk_size", "eval_every", "eval_prompts", "seed"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{_flag(name)}={getattr(cfg, name)} must be >= 0")
    if not FP32_TINY <= cfg.grad_clip <= math.inf:
        raise ValueError(
            f"--grad-clip={cfg.grad_clip} must be > 0 (the largest gradient norm kept; "
            "inf: no clipping) and a normal float32 (>= 1.2e-38). 0 would freeze the "
            "weights and a negative value flip the gradient"
        )
    if not 0 <= cfg.weight_decay < math.inf:
        raise ValueError(f"--weight-decay={cfg.weight_decay} must be a finite number >= 0")
    if not (FP32_TINY <= cfg.lr < math.inf and 0 <= cfg.min_lr <= cfg.lr):
        raise ValueError(
            f"--lr={cfg.lr} must be a finite number >= 1.2e-38 (smaller is 0 in "
            f"float32: no training) and --min-lr={cfg.min_lr} in [0, --lr]"
        )
    for name in ("temperature", "seqkd_temperature", "minillm_temperature", "gkd_temperature"):
        value = getattr(cfg, name)
        if not FP32_TINY <= value < math.inf:
            raise ValueError(f"{_flag(name)}={value} must be a finite number > 0 (1.0: unscaled)")
    if cfg.backend not in BACKEND_NAMES:
        raise ValueError(
            f"--backend={cfg.backend!r} is unknown; use one of {', '.join(BACKEND_NAMES)}"
        )
    _check_device(cfg.device)
    if cfg.dist not in DIST_MODES:
        raise ValueError(
            f"--dist={cfg.dist!r} is unknown; use 'ddp' or 'fsdp' (they differ only under torchrun)"
        )
    if cfg.dist == "fsdp" and cfg.method not in FSDP_METHODS:
        raise ValueError(
            f"--dist fsdp supports {', '.join(FSDP_METHODS)}, not {cfg.method!r} (it samples "
            "from the student during training, which FSDP2's collective forwards do not "
            "allow per rank); use --dist ddp"
        )
    if cfg.method == "minillm" and cfg.minillm_rollouts < cfg.batch_size:
        raise ValueError(
            f"--minillm-rollouts={cfg.minillm_rollouts} is less than --batch-size="
            f"{cfg.batch_size}: every PPO minibatch would be partial and dropped; raise "
            "--minillm-rollouts or lower --batch-size"
        )
    if cfg.resume and cfg.overwrite:
        raise ValueError(
            "--resume continues the run in --out and --overwrite replaces it; pass one"
        )
    if not (cfg.kd_ratio == 0.0 or KD_RATIO_MIN <= cfg.kd_ratio <= 1.0):
        raise ValueError(
            f"--kd-ratio={cfg.kd_ratio} must be 0 (pure CE) or in [2**-24, 1] (1: "
            "pure KD); a smaller r·KD vanishes next to (1 - r)·CE in float32: use 0"
        )
    if not (
        0 <= cfg.valid_frac < 1 and 0 < cfg.test_frac < 1 and cfg.valid_frac + cfg.test_frac < 1
    ):
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
        raise ValueError(
            "--minillm-temperature must be > 0, --minillm-top-k >= 0 (0: off) and "
            "--minillm-top-p in (0, 1] (1: off)"
        )
    if cfg.minillm_whiten not in ("block", "valid"):
        raise ValueError(
            f"--minillm-whiten={cfg.minillm_whiten!r} must be 'block' (official) or "
            "'valid' (valid tokens only, per rollout round)"
        )
    if cfg.distillm_loss not in ("srkl", "skl"):
        raise ValueError(f"--distillm-loss={cfg.distillm_loss!r} must be 'srkl' or 'skl'")
    if cfg.distillm_check_every < 0:
        raise ValueError(f"--distillm-check-every={cfg.distillm_check_every} must be >= 0")
    for name in ("gkd_lambda", "gkd_beta"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{_flag(name)}={getattr(cfg, name)} must be in [0, 1]")
    if cfg.gkd_estimator not in ("full", "sampled"):
        raise ValueError(f"--gkd-estimator={cfg.gkd_estimator!r} must be 'full' or 'sampled'")
    if cfg.gkd_estimator == "sampled" and cfg.gkd_beta != 1.0:
        raise ValueError(
            f"--gkd-estimator sampled estimates reverse KL: use it with --gkd-beta 1 "
            f"(got {cfg.gkd_beta})"
        )
    if cfg.teacher_cache:
        if cfg.method not in CACHE_METHODS:
            raise ValueError(
                f"--teacher-cache works with {', '.join(CACHE_METHODS)}, not "
                f"{cfg.method!r} (its teacher terms need the full distribution)"
            )
        if not (Path(cfg.teacher_cache) / "manifest.json").is_file():  # before any model loads
            raise ValueError(
                f"--teacher-cache {cfg.teacher_cache!r} has no manifest.json; write "
                "one with `kd-train cache-teacher --out DIR`"
            )
    if cfg.sparse_tail not in ("bucket", "renormalize", "ignore"):
        raise ValueError(
            f"--sparse-tail={cfg.sparse_tail!r} must be 'bucket', 'renormalize' or 'ignore'"
        )
    if cfg.sparse_tail == "ignore" and cfg.method == "distillm":
        raise ValueError(
            "--sparse-tail ignore is defined for forward KL only; distillm's skew KL "
            "needs 'bucket' or 'renormalize'"
        )
    if cfg.sparse_top_k < 0:
        raise ValueError(f"--sparse-top-k={cfg.sparse_top_k} must be >= 0 (0: all the cache holds)")
    _check_lm_data(cfg)
    try:
        cfg.seeds()
    except ValueError:
        raise ValueError(
            f"--eval-seeds={cfg.eval_seeds!r} must be comma-separated integers"
        ) from None
