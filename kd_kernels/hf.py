"""Hugging Face integration: distillation losses from ``transformers`` causal LMs that never build
the ``(B, T, V)`` logits.

- :func:`head_inputs` runs a model's decoder (not its lm_head) and returns what the lm_head would
  multiply: the final normed hidden states, the output-embedding weight and bias, and the model's
  logit scale / softcap from its config; :func:`lm_head` the same without the hidden states (no
  forward). ``kd-train`` takes its models through these two.
- :func:`distill_loss` takes Hugging Face conventions (``input_ids``, ``attention_mask``, unshifted
  ``labels`` with -100) and equals the logits-level loss on the models' own ``.logits``.
- :class:`KDTrainer` is a ``transformers.Trainer`` whose ``compute_loss`` is :func:`distill_loss`.

How the pieces are found, per model family (``transformers`` 5.x):

- decoder: ``model.get_decoder()`` (a ``*ForCausalLM`` returns its ``.model``: Llama, Qwen2/3,
  Mistral, Gemma 1/2/3, Cohere, Granite, Phi-3, OLMo, SmolLM, ...), else ``model.base_model``; its
  ``last_hidden_state`` is taken after the final norm, which is what the lm_head multiplies. A model
  whose decoder is itself (no separate head module) is rejected.
- head: ``model.get_output_embeddings()``, an ``nn.Linear`` (the tied input embedding when
  ``tie_word_embeddings``: the same Parameter, so both uses' gradients add up).
- logit transform, from the (text) config, applied in this order to ``z = h Wᵀ + b``: a scale σ,
  the product of ``logit_scale`` (Cohere, Cohere2), ``lm_head_multiplier`` (Falcon-H1) and
  ``output_multiplier`` (Muse Glimmer), divided by ``logits_scaling`` (Granite, GraniteMoe,
  MiniCPM3; HyperCLOVA X multiplies by it); then ``final_logit_softcapping`` caps
  ``c · tanh(· / c)`` (Gemma 2, Gemma 3, Muse Glimmer). Families whose forward does something else
  to the logits are not covered (the equality test against ``.logits`` is the check to run).
  Mixture-of-experts auxiliary (router) losses are not part of these losses.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

try:
    import transformers
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "kd_kernels.hf needs the transformers package: pip install transformers"
    ) from e

from . import _validate as V
from . import fused_linear as FL
from ._spec import DEFAULT_DIVERGENCE, KDSpec, check_ce_weight

IGNORE_INDEX = -100

__all__ = [
    "HeadInputs",
    "KDTrainer",
    "LMHead",
    "distill_loss",
    "head_inputs",
    "lm_head",
    "trl_chunked_divergence_loss",
    "trl_gkd_trainer",
]


class HeadInputs(NamedTuple):
    """What a causal LM's lm_head takes: ``logits = c · tanh(σ (hidden @ weight.T + bias) / c)``."""

    hidden: torch.Tensor  # (B, T, D) final normed hidden states
    weight: torch.Tensor  # (V, D) output-embedding weight
    bias: torch.Tensor | None  # (V,) or None
    logit_scale: float  # σ; 1.0 = off
    softcap: float | None  # c; None = off


class LMHead(NamedTuple):
    """A causal LM's lm_head and logit transform, without hidden states (see :func:`lm_head`)."""

    weight: torch.Tensor  # (V, D) output-embedding weight
    bias: torch.Tensor | None  # (V,) or None
    logit_scale: float  # σ; 1.0 = off
    softcap: float | None  # c; None = off


# config attributes that multiply the lm_head output (model family in the comment)
_MULTIPLIERS = ("logit_scale", "lm_head_multiplier", "output_multiplier")


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(
            f"{type(model).__name__} has no .config; pass a transformers PreTrainedModel "
            "(e.g. AutoModelForCausalLM.from_pretrained(...))"
        )
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _head_transform(model: nn.Module) -> tuple[float, float | None]:
    cfg = _text_config(model)
    scale = 1.0
    for key in _MULTIPLIERS:  # Cohere, Falcon-H1, Muse Glimmer: logits * value
        value = getattr(cfg, key, None)
        if value is not None:
            scale *= float(value)
    lsc = getattr(cfg, "logits_scaling", None)
    if lsc is not None:  # Granite, MiniCPM3 divide by it; HyperCLOVA X multiplies
        scale = (
            scale * float(lsc) if cfg.model_type.startswith("hyperclovax") else scale / float(lsc)
        )
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2 / 3
    cap = float(cap) if cap is not None else None
    name = type(model).__name__
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name}'s config gives a logit scale of {scale}; it must be > 0")
    if cap is not None and not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"{name}'s config.final_logit_softcapping={cap}; it must be > 0 or None")
    return scale, cap


def _decoder(model: nn.Module) -> nn.Module:
    dec = None
    get = getattr(model, "get_decoder", None)
    if callable(get):
        dec = get()
    if dec is None or dec is model:
        base = getattr(model, "base_model", None)
        dec = base if isinstance(base, nn.Module) else None
    if dec is None or dec is model:
        raise TypeError(
            f"{type(model).__name__} has no separate decoder module (get_decoder() / base_model "
            "return the model itself), so its final hidden states cannot be taken without the "
            "lm_head; compute them yourself and call kd_kernels.fused_linear_kd"
        )
    return dec


def _output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"{type(model).__name__}'s output embedding is {type(head).__name__}, not an "
            "nn.Linear lm_head; pass a causal LM (AutoModelForCausalLM), not a base model"
        )
    return head.weight, head.bias


def lm_head(model: nn.Module) -> LMHead:
    """A Hugging Face causal LM's output-embedding weight and bias and its logit scale / softcap
    (from its config), without running the model: :func:`head_inputs` without the hidden states.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    weight, bias = _output_head(model)
    return LMHead(weight, bias, *_head_transform(model))


def head_inputs(model: nn.Module, **model_inputs: Any) -> HeadInputs:
    """The lm_head's inputs of a Hugging Face causal LM for ``model_inputs`` (``input_ids``,
    ``attention_mask``, ``position_ids``, ...), computed through the decoder without running the
    lm_head: ``model(**model_inputs).logits`` equals
    ``c · tanh(σ (hidden @ weight.T + bias) / c)`` with the returned values (see the module
    docstring for how each family's pieces are found). ``use_cache`` defaults to False.
    """
    if "labels" in model_inputs:
        raise TypeError(
            "head_inputs takes the model inputs without labels (the decoder does not take them); "
            "use kd_kernels.hf.distill_loss(..., labels=...) for a loss"
        )
    head = lm_head(model)
    dec = _decoder(model)
    model_inputs.setdefault("use_cache", False)
    out = dec(**model_inputs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    return HeadInputs(hidden, *head)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _as_compute(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Hidden, weight, bias in one dtype: the autocast dtype when autocast is on (what the lm_head's
    matmul would use), else the weight's dtype."""
    dt = _autocast_dtype(hidden.device) or weight.dtype
    return hidden.to(dt), weight.to(dt), (bias.to(dt) if bias is not None else None)


def _check_ids(x: object, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
    """``input_ids`` (``like`` None): an integer (B, T) tensor with T >= 2; ``attention_mask`` /
    ``labels``: the shape and device of ``like``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if (
        x.is_floating_point()
        or x.is_complex()
        or (x.dtype == torch.bool and name != "attention_mask")
    ):
        raise TypeError(f"{name} has dtype {x.dtype}; pass integer token ids ({name}.long())")
    if like is None:
        if x.dim() != 2:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; it must be (batch, seq_len)")
        if x.shape[1] < 2:
            raise ValueError(
                f"{name} has seq_len {x.shape[1]}; next-token losses need at least 2 tokens"
            )
        return x
    if x.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; it must match input_ids {tuple(like.shape)}"
        )
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but input_ids on {like.device}; move it")
    return x


def distill_loss(
    student: nn.Module,
    teacher: nn.Module | None,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    divergence: str = DEFAULT_DIVERGENCE,
    ce_weight: float = 0.0,
    temperature: float = 1.0,
    alpha: float | None = None,
    beta: float | None = None,
    teacher_ids: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    return_components: bool = False,
    truncate_teacher_vocab: bool = False,
    num_items_in_batch: int | torch.Tensor | None = None,
    interpolation: float = 1.0,
    token_weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor | tuple[torch.Tensor, FL.KDComponents]:
    """Next-token distillation loss of two Hugging Face causal LMs, without the logits.

    Equals, with ``s = student(input_ids, attention_mask).logits`` and ``t`` the teacher's:
    ``kd_loss(s[:, :-1], t[:, :-1], divergence=..., temperature=..., mask=m) + ce_weight ·
    CE(s[:, :-1], labels[:, 1:])`` (token means), where the KD mask ``m`` is
    ``labels[:, 1:] != -100`` with labels (Hugging Face's own shift), else
    ``attention_mask[:, 1:] & attention_mask[:, :-1]`` (a target and the position predicting it are
    real tokens; equal to ``attention_mask[:, 1:]`` with right padding), else every position. The
    CE is Hugging Face's causal-LM loss (``model(..., labels=labels).loss``).

    The teacher runs under ``no_grad`` in whatever mode it is in (put it in ``eval()``); it may be
    another architecture with the same vocabulary (``truncate_teacher_vocab=True`` for a padded
    head, e.g. Qwen2.5-7B's 152064 rows against 151936). Each model's logit scale / softcap is
    read from its config (model-exact logits). Under autocast the head's matmuls run in the
    autocast dtype, as the lm_head's would.

    Args:
        student, teacher: ``transformers`` causal LMs (see :func:`head_inputs`); ``teacher`` may be
            None with ``teacher_ids`` / ``teacher_logprobs``.
        input_ids: ``(B, T)`` token ids, ``T ≥ 2``. attention_mask: ``(B, T)`` 0/1 or None.
        labels: ``(B, T)`` unshifted, -100 = ignored (as the model's own loss takes them).
        divergence, alpha, beta, temperature, chunk_size, backend: as in
            ``kd_kernels.fused_linear_kd``.
        ce_weight: coefficient of the CE term (needs ``labels``).
        teacher_ids, teacher_logprobs: a sparse teacher, ``(B, T, K)`` ids and log-probs aligned
            with the logits (entry ``[:, j]`` describes the token at ``j + 1``, like
            ``teacher(...).logits[:, j]``); computed by ``kd_kernels.fused_linear_sparse_kd`` when
            this build has it (NotImplementedError otherwise).
        return_components: also return ``KDComponents(kd, ce)`` (detached).
        truncate_teacher_vocab: use the first ``V_student`` rows of a larger teacher head.
        num_items_in_batch: divide the token sums by this count instead of this batch's token
            count (the Trainer's count over all gradient-accumulation micro-batches).
        interpolation, token_weights, reduction: not supported yet; anything but 1.0, None and
            "mean" raises ``NotImplementedError`` naming the option.

    Returns:
        fp32 scalar loss (or ``(loss, KDComponents)``).
    """
    input_ids = _check_ids(input_ids, "input_ids")
    if attention_mask is not None:
        attention_mask = _check_ids(attention_mask, "attention_mask", input_ids)
    if labels is not None:
        labels = _check_ids(labels, "labels", input_ids)
    sparse = _is_sparse(teacher, teacher_ids, teacher_logprobs)
    V.reject_unsupported(
        "hf.distill_loss",
        {
            "interpolation": (interpolation, 1.0),
            "token_weights": (token_weights, None),
            "reduction": (V.check_reduction(reduction), "mean"),
        },
        "leave it off, or call kd_kernels.fused_linear_kd on kd_kernels.hf.head_inputs' tensors",
    )
    check_ce_weight(
        ce_weight,
        has_labels=labels is not None,
        labels_hint="pass them unshifted (-100 = ignore), as the model's own loss takes them",
    )
    if num_items_in_batch is not None:
        n_items = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=input_ids.device)
        if n_items.numel() != 1:
            raise ValueError("num_items_in_batch must be a single count")
    reduction = "mean" if num_items_in_batch is None else "sum"

    model_inputs = {"input_ids": input_ids} | (
        {"attention_mask": attention_mask} if attention_mask is not None else {}
    )
    st = head_inputs(student, **model_inputs)
    hs, ws, bs = _as_compute(st.hidden, st.weight, st.bias)
    hs = hs[:, :-1]
    shifted = labels[:, 1:] if labels is not None else None
    mask = None
    if shifted is None and attention_mask is not None:
        am = attention_mask.bool()
        mask = am[:, 1:] & am[:, :-1]
    common = {
        "divergence": divergence,
        "alpha": alpha,
        "beta": beta,
        "student_bias": bs,
        "temperature": temperature,
        "mask": mask,
        "reduction": reduction,
        "labels": shifted,
        "ce_weight": ce_weight,
        "chunk_size": chunk_size,
        "backend": backend,
        "return_components": True,
    }
    if sparse:
        loss, parts = _sparse(hs, ws, st, teacher_ids, teacher_logprobs, common)
    else:
        with torch.no_grad():
            te = head_inputs(teacher, **model_inputs)
            ht, wt, bt = _as_compute(te.hidden, te.weight, te.bias)
        loss, parts = FL.fused_linear_kd(
            hs,
            ws,
            ht[:, :-1],
            wt,
            teacher_bias=bt,
            truncate_teacher_vocab=truncate_teacher_vocab,
            student_logit_scale=st.logit_scale,
            student_softcap=st.softcap,
            teacher_logit_scale=te.logit_scale,
            teacher_softcap=te.softcap,
            **common,
        )
    if num_items_in_batch is not None:
        d = n_items.clamp_min(1)
        loss = loss / d
        parts = FL.KDComponents(parts.kd / d, parts.ce / d if parts.ce is not None else None)
    return (loss, parts) if return_components else loss


def _is_sparse(teacher, teacher_ids, teacher_logprobs) -> bool:
    """Whether the teacher is sparse (ids and log-probs) rather than a model; exactly one given."""
    sparse = teacher_ids is not None or teacher_logprobs is not None
    if sparse and (teacher_ids is None or teacher_logprobs is None):
        raise ValueError("a sparse teacher needs both teacher_ids and teacher_logprobs")
    if sparse and teacher is not None:
        raise ValueError("pass either a teacher model or teacher_ids / teacher_logprobs, not both")
    if not sparse and teacher is None:
        raise ValueError(
            "teacher is None: pass a teacher model, or teacher_ids and teacher_logprobs"
        )
    return sparse


def _sparse(hs, ws, st: HeadInputs, teacher_ids, teacher_logprobs, common):
    """The sparse-teacher path through ``kd_kernels.fused_linear_sparse_kd`` (issue [G])."""
    import kd_kernels

    fn = getattr(kd_kernels, "fused_linear_sparse_kd", None)
    if fn is None:
        raise NotImplementedError(
            "teacher_ids / teacher_logprobs need kd_kernels.fused_linear_sparse_kd (the sparse "
            "teacher losses), which this build of kd_kernels does not have; pass a teacher model"
        )
    for name, x in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if (
            not isinstance(x, torch.Tensor)
            or x.dim() != 3
            or x.shape[:2] != hs.shape[:1] + (hs.shape[1] + 1,)
        ):
            raise ValueError(
                f"{name} must be a (batch, seq_len, K) tensor aligned with input_ids "
                f"({hs.shape[0]}, {hs.shape[1] + 1}, K)"
            )
    if st.logit_scale != 1.0 or st.softcap is not None:
        raise NotImplementedError(
            f"this student's logits are scaled ({st.logit_scale}) or soft-capped ({st.softcap}), and "
            "kd_kernels.fused_linear_sparse_kd has no logit scale / softcap yet; distill from a teacher "
            "model, or call kd_kernels.sparse_kd on the student's .logits"
        )
    return fn(hs, ws, teacher_ids[:, :-1], teacher_logprobs[:, :-1], **common)


def _single_process(model: nn.Module) -> None:
    """The decoders are called directly (not through a DDP wrapper's forward), so DDP would not
    synchronize the gradients: refuse rather than train each rank on its own."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise NotImplementedError(
            "kd_kernels' Trainer integrations run single-process in this version (a DDP-wrapped "
            "model would not synchronize its gradients); launch one process"
        )


class KDTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that distills ``teacher_model`` into ``model``: ``compute_loss``
    is :func:`distill_loss` on each batch's ``input_ids`` / ``attention_mask`` / ``labels``.

    ``KDTrainer(model, teacher_model, args=TrainingArguments(...), train_dataset=...,
    divergence="forward_kl", ce_weight=0.0, temperature=1.0, alpha=None, beta=None,
    chunk_size=None, backend="auto", truncate_teacher_vocab=False, **trainer_kwargs)``.

    - The teacher is frozen, put in ``eval()`` and moved to the training device.
    - Without a teacher model, batches must carry ``teacher_ids`` / ``teacher_logprobs`` (a cached
      sparse teacher; set ``remove_unused_columns=False`` so the Trainer keeps those columns).
    - Gradient accumulation: with labels, the Trainer counts the shifted non-ignored labels over
      all micro-batches of a step (``num_items_in_batch``) and the loss divides its token sums by
      that count, so the accumulated step equals one large batch; without labels each
      micro-batch's mean is divided by the accumulation steps, as for any loss.
    - Mixed precision (``bf16`` / ``fp16``): the heads' matmuls follow autocast.
    - Logging: ``kd_loss`` and ``ce_loss`` (unweighted) are logged next to ``loss``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
        *,
        divergence: str = DEFAULT_DIVERGENCE,
        ce_weight: float = 0.0,
        temperature: float = 1.0,
        alpha: float | None = None,
        beta: float | None = None,
        chunk_size: int | None = None,
        backend: str = "auto",
        truncate_teacher_vocab: bool = False,
        **trainer_kwargs: Any,
    ) -> None:
        # validate the options once, before any work (the same checks the loss runs)
        KDSpec.make(divergence, alpha=alpha, beta=beta, temperature=temperature)
        ce_weight = check_ce_weight(ce_weight)
        if teacher_model is not None and not isinstance(teacher_model, nn.Module):
            raise TypeError(
                f"teacher_model must be a transformers model or None, got "
                f"{type(teacher_model).__name__}"
            )
        super().__init__(model=model, **trainer_kwargs)
        self.kd_options = {
            "divergence": divergence,
            "ce_weight": float(ce_weight),
            "temperature": temperature,
            "alpha": alpha,
            "beta": beta,
            "chunk_size": chunk_size,
            "backend": backend,
            "truncate_teacher_vocab": truncate_teacher_vocab,
        }
        self.teacher_model = None
        if teacher_model is not None:
            teacher_model.requires_grad_(False)
            self.teacher_model = teacher_model.to(self.args.device).eval()
        # The loss takes num_items_in_batch (the Trainer then counts labels over the accumulated
        # micro-batches and does not divide the normalized loss again).
        self.model_accepts_loss_kwargs = True
        # Σ over micro-batches of each component, scaled like the loss the Trainer accumulates
        self._kd_sums: dict[str, torch.Tensor] = {}
        self._kd_last_step = 0

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        _single_process(model)
        labels = inputs.get("labels")
        normalized = num_items_in_batch is not None and labels is not None
        # accelerate applies mixed precision by wrapping model.forward; the decoders are called
        # directly here, so enter the same autocast explicitly
        with self.accelerator.autocast():
            loss, parts = distill_loss(
                model,
                self.teacher_model,
                input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                labels=labels,
                teacher_ids=inputs.get("teacher_ids"),
                teacher_logprobs=inputs.get("teacher_logprobs"),
                return_components=True,
                num_items_in_batch=num_items_in_batch if normalized else None,
                **self.kd_options,
            )
        if model.training:
            scale = 1.0 if normalized else 1.0 / self.current_gradient_accumulation_steps
            for key, val in (("kd_loss", parts.kd), ("ce_loss", parts.ce)):
                if val is not None:
                    self._kd_sums[key] = self._kd_sums.get(key, 0.0) + val.detach() * scale
        if self.args.average_tokens_across_devices and normalized:
            # as the Trainer's own compute_loss: the count was summed over the processes
            world = self.accelerator.num_processes // max(1, self.get_tp_size())
            loss = loss * (world if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if (
            "loss" in logs and self._kd_sums
        ):  # a training log: the mean over the steps since the last
            steps = max(1, self.state.global_step - self._kd_last_step)
            for key, total in self._kd_sums.items():
                logs[key] = round(float(total) / steps, 6)
            self._kd_sums = {}
            self._kd_last_step = self.state.global_step
        super().log(logs, start_time)


# ------------------------------------------------------------------------------------------- TRL
# TRL (tested: trl 1.16.0 with transformers 5.23.0) has two distillation trainers. Its beta picks the
# divergence: 0 = forward KL(p‖q), 1 = reverse KL(q‖p), else the generalized JSD with mixture
# M = β p + (1 − β) q, which is kd_kernels' jsd(β) (MATH.md, "GKD / on-policy distillation").


def _trl_divergence(beta: float) -> dict[str, Any]:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"TRL's beta={beta!r} must be a number in [0, 1]")
    if beta == 0.0:
        return {"divergence": "forward_kl"}
    if beta == 1.0:
        return {"divergence": "reverse_kl"}
    return {"divergence": "jsd", "beta": float(beta)}


def trl_gkd_trainer(base: type) -> type:
    """A subclass of TRL's ``GKDTrainer`` (``trl.experimental.gkd.GKDTrainer``) whose training loss
    is :func:`distill_loss`: the same number as TRL's ``generalized_jsd_loss`` on the models'
    logits (shifted, ``labels != -100``, ``num_items_in_batch``, temperature 1 as TRL's loss uses),
    computed without them. On-policy generation, ``lmbda``, ``seq_kd`` stay TRL's.

    ``GKD = kd_kernels.hf.trl_gkd_trainer(GKDTrainer)``, then ``GKD(...)`` with GKDTrainer's
    arguments. Single process: the student's decoder is called directly, not through a DDP / FSDP
    wrapper. ``compute_loss(..., return_outputs=True)`` (evaluation wanting the logits) runs TRL's
    own path.
    """
    if not isinstance(base, type) or not hasattr(base, "generalized_jsd_loss"):
        raise TypeError(
            "trl_gkd_trainer takes TRL's GKDTrainer class (from trl.experimental.gkd import "
            f"GKDTrainer), got {base!r}"
        )

    class FusedGKDTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            _single_process(model)
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            teacher.eval()
            with self.accelerator.autocast():  # what accelerate's forward wrapper would apply
                return distill_loss(
                    self.accelerator.unwrap_model(model),
                    teacher,
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs.get("attention_mask"),
                    labels=inputs["labels"],
                    num_items_in_batch=num_items_in_batch,
                    **_trl_divergence(self.beta),
                )

    FusedGKDTrainer.__name__ = FusedGKDTrainer.__qualname__ = f"Fused{base.__name__}"
    return FusedGKDTrainer


def _full(x: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor (FSDP2 / tensor-parallel weight) as one plain tensor; anything else unchanged."""
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    if dtensor is not None and isinstance(x, dtensor):
        return x.full_tensor()
    return x


def trl_chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kd_kernels in place of TRL's ``DistillationTrainer`` loss hook (the module function
    ``trl.trainer.distillation_trainer._chunked_divergence_loss`` of TRL 1.16, same arguments):

    ``(Σ_valid D_i / num_items_in_batch (or / number valid), Σ_valid H_i, number valid)`` with
    ``D`` TRL's beta divergence of ``softmax(y_t / T)`` and ``softmax(y_s / T)`` on the model-exact
    logits and ``H`` the student's entropy (detached, for TRL's log; one extra no-grad pass of the
    student's logits). Use (a private TRL name, so pin the TRL version)::

        import trl.trainer.distillation_trainer as trl_distill
        trl_distill._chunked_divergence_loss = kd_kernels.hf.trl_chunked_divergence_loss
    """
    spec = _trl_divergence(beta)
    ws, bs = _full(student_lm_head_weight), _full(student_lm_head_bias)
    wt, bt = _full(teacher_lm_head_weight), _full(teacher_lm_head_bias)
    hs, ws, bs = _as_compute(student_hidden_states, ws, bs)
    ht, wt, bt = _as_compute(teacher_hidden_states.detach(), wt, bt)
    if not isinstance(completion_mask, torch.Tensor) or completion_mask.shape != hs.shape[:-1]:
        raise ValueError(
            f"completion_mask must be a {tuple(hs.shape[:-1])} tensor (the hidden states' "
            "leading dims)"
        )
    valid = completion_mask != 0
    n_valid = valid.sum()
    sum_ = FL.fused_linear_kd(
        hs,
        ws,
        ht,
        wt,
        student_bias=bs,
        teacher_bias=bt,
        mask=valid,
        reduction="sum",
        temperature=temperature,
        student_logit_scale=student_logit_scale,
        student_softcap=student_final_logit_softcapping,
        teacher_logit_scale=teacher_logit_scale,
        teacher_softcap=teacher_final_logit_softcapping,
        **spec,
    )
    with torch.no_grad():
        _, entropy = FL.fused_linear_logprobs(
            hs.detach(),
            ws.detach(),
            torch.zeros(valid.shape, dtype=torch.long, device=hs.device),
            bias=bs.detach() if bs is not None else None,
            temperature=temperature,
            mask=valid,
            return_entropy=True,
            logit_scale=student_logit_scale,
            softcap=student_final_logit_softcapping,
        )
    if num_items_in_batch is None:
        loss = sum_ / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(sum_.device)
        loss = sum_ / num_items_in_batch
    return loss, entropy.sum(), n_valid
