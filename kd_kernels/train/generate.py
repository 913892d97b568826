"""Batched generation and the on-disk cache of teacher responses.

Generation uses Hugging Face ``generate`` (decoding is not a vocabulary-sized training computation; it
needs one row of logits per step). Prompts are left-padded in batches of similar length.
Responses are token ids without the EOS; decoding to text is the caller's business.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ._optional import progress_bar


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "generate",
) -> list[list[int]]:
    """One response (token ids, EOS and padding removed) per prompt, in the order of ``prompts``.

    Greedy when ``do_sample`` is False; otherwise pure sampling at ``temperature`` (top-k 0, top-p 1) from a
    generator seeded with ``seed``, so the same call gives the same samples.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    kwargs: dict = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": pad_id,
        "eos_token_id": eos_id,
    }
    if do_sample:
        kwargs |= {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    else:
        kwargs |= {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    bar = progress_bar(total=len(prompts), desc=desc, disable=not progress, leave=False)
    with torch.random.fork_rng(devices=[] if torch.device(device).type == "cpu" else [device]):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                p = prompts[i]
                ids[row, width - len(p) :] = torch.tensor(p)
                attn[row, width - len(p) :] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs)
            for row, i in enumerate(idx):
                out[i] = strip_response(gen[row, width:].tolist(), eos_id, pad_id)
            bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return out  # type: ignore[return-value]


def strip_response(ids: list[int], eos_id: int, pad_id: int) -> list[int]:
    """The tokens before the first EOS (or pad, which generate writes after EOS)."""
    for k, tok in enumerate(ids):
        if tok == eos_id or tok == pad_id:
            return ids[:k]
    return ids


def cache_key(teacher_id: str, prompts: list[tuple[str, list[int]]], settings: dict) -> str:
    """A hash of everything that decides the responses: teacher, prompt token ids, generation settings."""
    h = hashlib.sha256()
    h.update(json.dumps({"teacher": teacher_id, "settings": settings}, sort_keys=True).encode())
    for pid, ids in prompts:
        h.update(pid.encode() + b"\0" + json.dumps(ids).encode() + b"\n")
    return h.hexdigest()[:24]


def default_cache_dir() -> Path:
    base = os.environ.get("KD_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kd_kernels"
    )
    return Path(base) / "responses"


def cached_responses(
    model,
    prompts: list[tuple[str, list[int]]],
    *,
    teacher_id: str,
    cache_dir: str,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    seed: int,
    batch_size: int,
    device,
    progress: bool,
    desc: str,
) -> tuple[dict[str, list[int]], bool]:
    """Responses keyed by prompt id, read from the cache or generated and written there.

    Returns ``(responses, hit)``. The file name is the cache key, so a different teacher, prompt set or
    setting never reads a stale file.
    """
    settings = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "temperature": temperature if do_sample else None,
        "seed": seed if do_sample else None,
    }
    key = cache_key(teacher_id, prompts, settings)
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    path = folder / f"{key}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return {k: list(v) for k, v in data["responses"].items()}, True
    ids = generate(
        model,
        [p for _, p in prompts],
        pad_id=pad_id,
        eos_id=eos_id,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc=desc,
    )
    responses = {pid: r for (pid, _), r in zip(prompts, ids)}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(
        json.dumps({"teacher": teacher_id, "settings": settings, "responses": responses})
    )
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return responses, False
