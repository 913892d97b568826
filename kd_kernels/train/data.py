"""Prompts, the train / valid / test split, chat formatting, masking and batching.

A training example is ``prompt tokens + response tokens + EOS``; its labels are -100 on the prompt (and on
padding) and the token ids on the response and the EOS, so the loss only counts what the model should say.
Batches for step k are a pure function of (seed, k, rank): resuming at step k sees exactly the batches a
run that never stopped would have seen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100
DEFAULT_PROMPTS = Path(__file__).with_name("data") / "prompts.jsonl"


@dataclass(frozen=True)
class Prompt:
    id: str
    task: str
    text: str


def load_prompts(path: str | Path = "", max_prompts: int = 0) -> list[Prompt]:
    """Prompts from a .jsonl file with ``id``, ``prompt`` and optional ``task`` fields (one object a line)."""
    p = Path(path) if path else DEFAULT_PROMPTS
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise FileNotFoundError(f"--prompts {str(p)!r} {what}; pass a .jsonl file of prompts")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno}); each line must be "
                'one object such as {"id": "1", "prompt": "..."}'
            ) from None
        if not isinstance(row, dict):  # a bad file is a ValueError, whatever the JSON type
            raise ValueError(  # noqa: TRY004
                f"{p}:{n}: each line must be a JSON object with 'id' and 'prompt' keys, got a bare "
                f"{type(row).__name__} value"
            )
        if "id" not in row or "prompt" not in row:
            raise ValueError(f"{p}:{n}: each line needs 'id' and 'prompt' keys, got {sorted(row)}")
        pid = row["id"]
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise ValueError(f"{p}:{n}: 'id' must be a string or an integer, got {pid!r}")  # noqa: TRY004
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ValueError(f"{p}:{n}: 'prompt' must be a non-empty string, got {row['prompt']!r}")
        # ids are compared as the strings they become (the split hashes them): 5 and "5" are one id
        key = str(pid)
        if key in seen:
            raise ValueError(
                f"{p}:{n}: duplicate prompt id {pid!r} (line {seen[key]} has id "
                f"{key!r}); ids must be unique"
            )
        seen[key] = n
        out.append(Prompt(key, str(row.get("task", "")), row["prompt"]))
    if not out:
        raise ValueError(f"{p}: no prompts (the file is empty); add one JSON object per line")
    if max_prompts > 0:
        out = out[:max_prompts]
    return out


def split_of(prompt_id: str, valid_frac: float, test_frac: float) -> str:
    """``"train"``, ``"valid"`` or ``"test"`` from a hash of the id alone.

    Stable: adding or removing other prompts never moves a prompt to another split, and the split does not
    depend on the seed (so the test set is the same in every run).
    """
    u = int.from_bytes(hashlib.sha256(prompt_id.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < test_frac:
        return "test"
    if u < test_frac + valid_frac:
        return "valid"
    return "train"


def split_prompts(
    prompts: list[Prompt], valid_frac: float, test_frac: float
) -> dict[str, list[Prompt]]:
    splits: dict[str, list[Prompt]] = {"train": [], "valid": [], "test": []}
    for p in prompts:
        splits[split_of(p.id, valid_frac, test_frac)].append(p)
    return splits


def prompt_token_ids(tokenizer, text: str, max_prompt_tokens: int) -> list[int]:
    """The prompt in the model's chat template, ready for the assistant's answer, as token ids.

    Over-long prompts keep their last ``max_prompt_tokens`` tokens (the generation prompt is at the end).
    """
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return list(ids[-max_prompt_tokens:])


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def build_example(prompt_ids: list[int], response_ids: list[int], eos_id: int) -> Example:
    """``prompt + response + EOS``; labels mask the prompt with -100 so only the answer is learned."""
    ids = list(prompt_ids) + list(response_ids) + [eos_id]
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(response_ids) + [eos_id]
    return Example(ids, labels)


def lm_blocks(tokenizer, text: str, block_len: int, eos_id: int) -> list[Example]:
    """Pre-training text as packed next-token blocks: documents (separated by blank lines) tokenized
    without special tokens, each followed by EOS, concatenated and cut into blocks of ``block_len``
    tokens (the last one may be shorter; one of a single token has no target and is dropped). Every
    token is a label: the CE covers the whole block."""
    if block_len < 2:
        raise ValueError(f"block_len={block_len} must be >= 2 (a block needs a next-token target)")
    stream: list[int] = []
    for doc in text.split("\n\n"):
        if doc.strip():
            stream += tokenizer(doc.strip(), add_special_tokens=False)["input_ids"] + [eos_id]
    blocks = [stream[i : i + block_len] for i in range(0, len(stream), block_len)]
    return [Example(list(b), list(b)) for b in blocks if len(b) >= 2]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on pads)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attn[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def shift_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets for positions ``0 … T−2`` and the mask of the ones that count.

    The hidden state at position i predicts token i+1, so the loss uses ``hidden[:, :-1]`` against
    ``labels[:, 1:]``.
    """
    targets = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


def batch_indices(
    n: int, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1
) -> list[int]:
    """Which examples rank ``rank`` trains on at ``step``: a pure function of its arguments.

    The examples are visited in epochs, each a fresh permutation seeded by ``(seed, epoch)``; a step takes
    ``batch_size × world`` consecutive positions of that stream and rank r the r-th slice of them.
    """
    if n < 1:
        raise ValueError(
            "the training split is empty; add prompts or lower --valid-frac / --test-frac"
        )
    start = (step * world + rank) * batch_size
    out = []
    perms: dict[int, list[int]] = {}
    for g in range(start, start + batch_size):
        epoch, pos = divmod(g, n)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=gen).tolist()
        out.append(perms[epoch][pos])
    return out
