"""``kd-train METHOD [--flags]``: the console script. ``kd-train --help`` lists every flag.

``kd-train compare [--methods ...] [--seeds ...] [--out DIR] [flags]`` runs several methods with the same
flags and seeds and writes one table (see ``kd_kernels/train/compare.py``)."""

from __future__ import annotations

import json
import os
import sys

from kd_kernels import BackendUnavailableError

from .config import parse_args
from .methods import METHODS
from .trainer import Interrupted, TrainError, train


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())  # messages from libraries may span lines
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "compare":
        from .compare import main as compare_main

        return compare_main(args[1:])
    try:
        cfg, explicit = parse_args(args, sorted(METHODS))
    except ValueError as e:
        print(f"kd-train: error: {e}", file=sys.stderr)
        return 2
    try:
        summary = train(cfg, explicit)
    except Interrupted:
        return 130
    except KeyboardInterrupt:
        print("kd-train: aborted (second Ctrl-C); the last checkpoint written is kept", file=sys.stderr)
        return 130
    except (TrainError, ValueError, OSError, BackendUnavailableError) as e:
        # failures after parsing: one line (what, where, the fix), no traceback
        print(f"kd-train: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # anything else still exits cleanly, with a way to see more
        if os.environ.get("KD_TRAIN_TRACEBACK"):
            raise
        print(f"kd-train: error: {type(e).__name__}: {_one_line(e)} (set KD_TRAIN_TRACEBACK=1 for the "
              "traceback)", file=sys.stderr)
        return 1
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
