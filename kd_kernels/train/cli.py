"""``kd-train METHOD [--flags]``: the console script. ``kd-train --help`` lists every flag.

``kd-train compare [--methods ...] [--seeds ...] [--out DIR] [flags]`` runs several methods with the same
flags and seeds and writes one table (see ``kd_kernels/train/compare.py``).
``kd-train cache-teacher --top-k K --out DIR [--for-method kd|seqkd|distillm] [flags]`` writes an offline
teacher cache for ``--teacher-cache DIR`` (see ``kd_kernels/train/teacher_cache.py``)."""

from __future__ import annotations

import json
import sys

from .config import parse_args
from .methods import METHODS
from .trainer import Interrupted, train


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "cache-teacher":
        from .cache_cli import main as cache_main

        return cache_main(args[1:])
    if args and args[0] == "compare":
        from .compare import main as compare_main

        return compare_main(args[1:])
    try:
        cfg, explicit = parse_args(args, sorted(METHODS))
    except ValueError as e:
        print(f"kd-train: error: {e}", file=sys.stderr)
        return 2
    from .teacher_cache import TeacherCacheError

    try:
        summary = train(cfg, explicit)
    except Interrupted:
        return 130
    except TeacherCacheError as e:  # a cache that does not match the run: one line, no traceback
        print(f"kd-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary:
        final = summary.get("final", {})
        shown = {k: v for k, v in final.items() if not isinstance(v, list)}
        print(json.dumps({"method": summary["method"], "steps": summary["steps"],
                          "wall_time_s": round(summary["wall_time_s"], 1), **shown}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
