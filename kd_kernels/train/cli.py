"""``kd-train METHOD [--flags]``: the console script. ``kd-train --help`` lists every flag."""

from __future__ import annotations

import json
import sys

from .config import parse_args
from .methods import METHODS
from .trainer import Interrupted, train


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    try:
        cfg, explicit = parse_args(argv, sorted(METHODS))
    except ValueError as e:
        print(f"kd-train: error: {e}", file=sys.stderr)
        return 2
    try:
        summary = train(cfg, explicit)
    except Interrupted:
        return 130
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
