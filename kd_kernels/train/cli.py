"""``kd-train METHOD [--flags]``: the console script. ``kd-train METHOD --help`` lists METHOD's
flags (the common ones and its own), each with its help and default; ``--config FILE`` reads them
from a file.

``kd-train compare [--methods ...] [--seeds ...] [--out DIR] [flags]`` runs several methods with the same
flags and seeds and writes one table (see ``kd_kernels/train/compare.py``).
``kd-train cache-teacher --top-k K --out DIR [--for-method kd|seqkd|distillm] [flags]`` writes an offline
teacher cache for ``--teacher-cache DIR`` (see ``kd_kernels/train/teacher_cache.py``)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from kd_kernels import BackendUnavailableError

from .config import parse_args
from .methods import method_summaries
from .trainer import Interrupted, TrainError, train


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())  # messages from libraries may span lines
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """The console script. A Ctrl-C once kd-train is already on its way out (after the first one, or
    while it reports an error) is ignored: shutting down prints one line, never a traceback."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # a Ctrl-C in the moment before the handlers below ignore it
        _ignore_ctrl_c()
        print(ABORTED, file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)


ABORTED = "kd-train: aborted (Ctrl-C); the last checkpoint written, if any, is kept in --out"


def _ignore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _main(args: list[str]) -> int:
    import torch.distributed as dist

    if args and args[0] == "cache-teacher":
        from .cache_cli import main as cache_main

        return cache_main(args[1:])
    if args and args[0] == "compare":
        from .compare import main as compare_main

        return compare_main(args[1:])
    try:
        cfg, explicit = parse_args(args, method_summaries())
    except ValueError as e:
        print(f"kd-train: error: {e}", file=sys.stderr)
        return 2
    from .teacher_cache import TeacherCacheError

    try:
        summary = train(cfg, explicit)
    except Interrupted:
        _ignore_ctrl_c()  # the checkpoint is written: nothing left to interrupt
        return 130
    except TeacherCacheError as e:  # a cache that does not match the run: one line, no traceback
        _ignore_ctrl_c()
        print(f"kd-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _ignore_ctrl_c()
        print(ABORTED, file=sys.stderr)
        return 130
    except (TrainError, ValueError, OSError, BackendUnavailableError) as e:
        # failures after parsing: one line (what, where, the fix), no traceback
        _ignore_ctrl_c()
        print(f"kd-train: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # anything else still exits cleanly, with a way to see more
        _ignore_ctrl_c()
        if os.environ.get("KD_TRAIN_TRACEBACK"):
            raise
        print(
            f"kd-train: error: {type(e).__name__}: {_one_line(e)} (set KD_TRAIN_TRACEBACK=1 for the "
            "traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary:
        print(format_summary(summary))
    return 0


def _num(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def format_summary(summary: dict) -> str:
    """The short table printed at the end of a run (every number also in ``summary.json``)."""
    f = summary.get("final", {})
    out = Path(summary.get("outputs", {}).get("dir", summary["config"]["out"]))
    train = summary.get("phases", {}).get("train", {})
    tok_s = (
        train["tokens"] / train["wall_s"] if train.get("wall_s") and train.get("tokens") else None
    )

    def rouge(who: str) -> str:
        m = f.get(f"rougeL_{who}")
        return "-" if m is None else f"{m:.3f} ± {f.get(f'rougeL_{who}_std', 0.0):.3f}"

    lines = [
        (
            f"kd-train {summary['method']}: {summary['steps']} steps, wall {summary['wall_time_s']:.0f} s "
            f"(training {summary['train_time_s']:.0f} s), {summary['device']}"
        ),
        "",
        "| metric | student | teacher |",
        "|---|---|---|",
        (
            f"| Rouge-L F vs teacher greedy (test, mean ± sd over seeds) | {rouge('student')} | "
            f"{rouge('teacher')} |"
        ),
        f"| forward KL(p‖q), token mean (test) | {_num(f.get('test_forward_kl'))} | |",
        f"| reverse KL(q‖p), token mean (test) | {_num(f.get('test_reverse_kl'))} | |",
        f"| cross-entropy on teacher answers (test) | {_num(f.get('test_ce'))} | |",
        f"| training tokens/s | {_num(tok_s, '.0f')} | |",
        f"| peak memory (MB) | {_num(summary.get('peak_mem_mb'), '.0f')} | |",
        "",
    ]
    if f.get("rougeL_skipped"):
        lines.append(f"Rouge-L not computed: {f['rougeL_skipped']}")
    if not summary.get("evaluated"):
        lines.append("not evaluated (--skip-eval): the table has no test metrics")
    files = [
        name
        for name in ("summary.json", "metrics.jsonl", "loss.png", "ckpt.pt")
        if (out / name).is_file()
    ]
    lines.append(f"outputs in {out}: {', '.join(files)}")
    if (out / "loss.png").is_file():
        lines.append(f"plot: {out / 'loss.png'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
