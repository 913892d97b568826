"""``kd-train cache-teacher``: write an offline teacher cache (format: ``teacher_cache.py``,
docs/TRAINER.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import CACHE_METHODS, parse_args
from .methods import METHODS, get_method
from .run import Run, init_distributed
from .teacher_cache import CACHE_DTYPES, write_cache


def main(argv: list[str]) -> int:
    """``kd-train cache-teacher --top-k K --out DIR [--for-method kd|seqkd|distillm] [run flags]``."""
    ap = argparse.ArgumentParser(
        prog="kd-train cache-teacher",
        description="Write the teacher's top-K log-probs on the training responses of --for-method "
        "(the other flags choose the run exactly as for training: --preset, --teacher, "
        "--max-prompts, --temperature ...).",
    )
    ap.add_argument("--top-k", type=int, required=True, help="ids per token")
    ap.add_argument("--out", required=True, help="cache folder (manifest.json + shards)")
    ap.add_argument(
        "--for-method",
        choices=CACHE_METHODS,
        default="kd",
        help="whose training responses: kd / distillm (the teacher's greedy references) "
        "or seqkd (its samples at --seqkd-temperature)",
    )
    ap.add_argument("--cache-dtype", choices=tuple(CACHE_DTYPES), default="float16")
    ns, rest = ap.parse_known_args(argv)
    try:
        cfg, _ = parse_args([ns.for_method, *rest], sorted(METHODS))
        if ns.top_k < 1:
            raise ValueError(f"--top-k={ns.top_k} must be >= 1")
        if cfg.teacher_cache:
            raise ValueError("--teacher-cache is for training; cache-teacher writes --out")
    except ValueError as e:
        print(f"kd-train cache-teacher: error: {e}", file=sys.stderr)
        return 2
    rank, world, device = init_distributed(cfg.device)
    if world > 1:
        print(
            "kd-train cache-teacher: error: run it as one process (not under torchrun)",
            file=sys.stderr,
        )
        return 2
    run = Run(cfg, rank, world, device)
    method = get_method(cfg.method)
    examples = run.examples("train", method.train_responses(run))
    prompt_ids = [p.id for p in run.split_prompts("train")]
    try:
        m = write_cache(
            run,
            examples,
            prompt_ids,
            Path(ns.out),
            top_k=ns.top_k,
            dtype=ns.cache_dtype,
            temperature=cfg.temperature,
            batch_size=cfg.gen_batch_size,
            progress=cfg.progress,
        )
    except ValueError as e:  # TeacherCacheError, or a teacher the cache cannot hold (a softcap)
        print(f"kd-train cache-teacher: error: {e}", file=sys.stderr)
        return 2
    size = sum((Path(ns.out) / s["file"]).stat().st_size for s in m["shards"])
    print(
        json.dumps(
            {
                "out": ns.out,
                "examples": m["counts"]["examples"],
                "positions": m["counts"]["positions"],
                "top_k": ns.top_k,
                "bytes": size,
                "bytes_per_position": round(size / max(1, m["counts"]["positions"]), 1),
            }
        )
    )
    return 0
