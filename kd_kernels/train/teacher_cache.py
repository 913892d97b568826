"""Offline teacher caches: the teacher's top-K next-token ids and log-probs on the training responses,
written once (``kd-train cache-teacher``) and trained from with ``--teacher-cache DIR`` through
``kd_kernels.fused_linear_sparse_kd`` (no teacher forward pass for those steps).

Format (docs/TRAINER.md, "Teacher caches"): a folder with ``manifest.json`` and safetensors shards
``shard-00000.safetensors`` … Each shard holds, for a run of consecutive training examples, one row per
counted target position (response tokens and the EOS, in order):
``ids`` (T, K) int32, ``logprobs`` (T, K) float16 / bfloat16 (−inf = padding), ``tokens`` (T,) int32 (the
target token at that position, checked at training time) and ``offsets`` (E + 1,) int64 (example e's rows
are ``offsets[e] : offsets[e + 1]``). The manifest lists the examples' prompt ids per shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

FORMAT = "kd_kernels.teacher_cache"
VERSION = 1
SHARD_ROWS = 1 << 20  # target positions per shard
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class TeacherCacheError(ValueError):
    """A teacher cache that is missing, malformed or does not match the run."""


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token → id, sorted) and its special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    specials = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    blob = json.dumps([vocab, specials], ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:32]


def example_targets(labels: list[int]) -> list[int]:
    """The counted next-token targets of one example (labels[1:] without -100), in order."""
    return [y for y in labels[1:] if y != -100]


def responses_fingerprint(prompt_ids: list[str], examples) -> str:
    """sha256 over every training example (prompt id, input ids, labels), in training order."""
    h = hashlib.sha256()
    for pid, ex in zip(prompt_ids, examples):
        h.update(json.dumps([pid, list(ex.input_ids), list(ex.labels)]).encode("utf-8"))
    return h.hexdigest()[:32]


# ------------------------------------------------------------------------------------------ write


@torch.no_grad()
def write_cache(
    run,
    examples,
    prompt_ids: list[str],
    out: Path,
    *,
    top_k: int,
    dtype: str,
    temperature: float,
    batch_size: int,
    progress: bool,
) -> dict:
    """Runs the teacher over ``examples`` and writes the cache folder ``out``; returns the manifest."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    import kd_kernels

    from .data import collate, shift_targets
    from .run import head

    teacher = run.models.teacher
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if not 1 <= top_k <= vocab:
        raise TeacherCacheError(f"--top-k={top_k} must be in [1, V] (V={vocab})")
    out.mkdir(parents=True, exist_ok=True)
    shards, rows, buf = [], 0, {"ids": [], "logprobs": [], "tokens": [], "lengths": [], "pids": []}

    def flush():
        if not buf["pids"]:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        lengths = torch.tensor(buf["lengths"], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        tensors = {
            "ids": torch.cat(buf["ids"]).to(torch.int32).contiguous(),
            "logprobs": torch.cat(buf["logprobs"]).to(CACHE_DTYPES[dtype]).contiguous(),
            "tokens": torch.cat(buf["tokens"]).to(torch.int32).contiguous(),
            "offsets": offsets,
        }
        tmp = out / (name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
        os.replace(tmp, out / name)
        shards.append({"file": name, "examples": list(buf["pids"]), "rows": int(offsets[-1])})
        for v in buf.values():
            v.clear()

    teacher.eval()
    bar = tqdm(
        total=len(examples),
        desc=f"cache teacher top-{top_k}",
        disable=not progress,
        dynamic_ncols=True,
    )
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = run.to_device(collate(chunk, run.pad_id))
        targets, mask = shift_targets(batch["labels"])
        h = head(teacher, batch).scaled("kd_kernels.teacher_topk (the teacher cache)")
        ids, lps = kd_kernels.teacher_topk(
            h.hidden[mask], h.weight, top_k, teacher_bias=h.bias, temperature=temperature
        )
        counts = mask.sum(1).tolist()
        pos = 0
        for i, n in enumerate(counts):
            buf["ids"].append(ids[pos : pos + n].cpu())
            buf["logprobs"].append(lps[pos : pos + n].cpu())
            buf["tokens"].append(targets[i][mask[i]].cpu())
            buf["lengths"].append(n)
            buf["pids"].append(prompt_ids[start + i])
            pos += n
            rows += n
        if sum(buf["lengths"]) >= SHARD_ROWS:
            flush()
        bar.update(len(chunk))
    bar.close()
    flush()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": run.models.teacher_id,
        "tokenizer": tokenizer_fingerprint(run.tokenizer),
        "vocab_size": vocab,
        "top_k": top_k,
        "temperature": temperature,
        "logprobs_dtype": dtype,
        "responses": responses_fingerprint(prompt_ids, examples),
        "counts": {"examples": len(examples), "positions": rows},
        "shards": shards,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ------------------------------------------------------------------------------------------- read


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise TeacherCacheError(
            f"--teacher-cache {str(folder)!r} has no manifest.json; write one with "
            "`kd-train cache-teacher --out DIR`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TeacherCacheError(f"{path} is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise TeacherCacheError(f"{path} is not a {FORMAT} version {VERSION} manifest")
    return manifest


class TeacherCache:
    """A cache checked against a run, held in memory; ``lookup`` gives a batch's sparse teacher."""

    def __init__(
        self, folder: str | Path, run, prompt_ids: list[str], examples, k: int, temperature: float
    ):
        from safetensors.torch import load_file

        self.folder = Path(folder)
        m = read_manifest(folder)
        where = f"--teacher-cache {str(folder)!r}"
        if m["tokenizer"] != tokenizer_fingerprint(run.tokenizer):
            raise TeacherCacheError(
                f"{where} was written with another tokenizer than this run's; "
                "rewrite it with this run's --preset / --teacher"
            )
        if m["responses"] != responses_fingerprint(prompt_ids, examples):
            raise TeacherCacheError(
                f"{where} was written for other training responses than this run's (prompts, "
                "--max-prompts, splits, --max-new-tokens or the method's responses differ); rewrite "
                "it with the same flags and the method you train (cache-teacher --for-method)"
            )
        if k > int(m["top_k"]):
            raise TeacherCacheError(
                f"--sparse-top-k={k} asks for more than the {m['top_k']} ids per "
                f"token {where} holds; lower it or rewrite the cache"
            )
        if not math.isclose(float(m["temperature"]), temperature):
            raise TeacherCacheError(
                f"{where} holds the teacher at temperature {m['temperature']}, the run asks for "
                f"--temperature {temperature} (which divides the student only with a sparse "
                "teacher); rewrite the cache with --temperature " + str(temperature)
            )
        self.k = k or int(m["top_k"])
        ids, lps, tokens, starts = [], [], [], []
        row0 = 0
        order = []
        for shard in m["shards"]:
            t = load_file(str(self.folder / shard["file"]))
            off = t["offsets"]
            if len(shard["examples"]) != len(off) - 1 or int(off[-1]) != t["ids"].shape[0]:
                raise TeacherCacheError(
                    f"{self.folder / shard['file']} does not match the manifest"
                )
            ids.append(t["ids"][:, : self.k])
            lps.append(t["logprobs"][:, : self.k])
            tokens.append(t["tokens"])
            starts += (off[:-1] + row0).tolist()
            order += shard["examples"]
            row0 += int(off[-1])
        if order != list(prompt_ids):
            raise TeacherCacheError(f"{where} lists other examples than this run trains on")
        self.ids = torch.cat(ids).long()
        self.logprobs = torch.cat(lps)
        self.tokens = torch.cat(tokens).long()
        self.starts = starts + [row0]
        self.info = {
            "dir": str(self.folder.resolve()),
            "top_k": self.k,
            "cache_top_k": int(m["top_k"]),
            "teacher": m["teacher"],
            "positions": int(m["counts"]["positions"]),
        }

    def lookup(
        self, index: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, T, k) int64, logprobs (B, T, k)) for the batch's examples ``index`` (B,), with
        −inf log-probs where ``mask`` is False; checks the cached target tokens against ``targets``."""
        b, t = mask.shape
        ids = torch.zeros(b, t, self.k, dtype=torch.long)
        lps = torch.full((b, t, self.k), -math.inf, dtype=self.logprobs.dtype)
        mask_c, targets_c = mask.cpu(), targets.cpu()
        for i, e in enumerate(index.tolist()):
            lo, hi = self.starts[e], self.starts[e + 1]
            pos = mask_c[i].nonzero().squeeze(1)
            if pos.numel() != hi - lo or not torch.equal(targets_c[i, pos], self.tokens[lo:hi]):
                raise TeacherCacheError(
                    f"--teacher-cache {str(self.folder)!r}: example {e}'s cached "
                    "target tokens differ from the batch's; rewrite the cache"
                )
            ids[i, pos] = self.ids[lo:hi]
            lps[i, pos] = self.logprobs[lo:hi]
        return ids.to(mask.device), lps.to(mask.device)


def cache_for(run) -> TeacherCache:
    """The run's teacher cache, loaded and checked on first use."""
    cache = getattr(run, "_teacher_cache", None)
    if cache is None:
        prompt_ids = [p.id for p in run.split_prompts("train")]
        cache = TeacherCache(
            run.cfg.teacher_cache,
            run,
            prompt_ids,
            run.train_examples,
            run.cfg.sparse_top_k,
            run.cfg.temperature,
        )
        run._teacher_cache = cache
        run.teacher_cache_info = cache.info
    return cache
