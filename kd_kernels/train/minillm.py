"""MiniLLM (Gu et al., 2024) as the official code runs it; the math is MATH.md, section "MiniLLM".

Pieces, each a small function tested by hand:

- :func:`process_logits` / :func:`mixed_rollouts`: teacher-mixed sampling. At every step both models
  (each with its own KV cache) give one row of logits; both rows get the same temperature / top-k /
  top-p processing; the next token is drawn from ``p̃ = (1 − α) q + α p``.
- :func:`token_rewards`: ``r_t = clip((log p(y_t) − log q_old(y_t)) / 0.5, ±100)``.
- :func:`normalized_returns`: ``Σ_{t'≥t} γ^{t'−t} r_{t'}`` divided by the number of valid tokens in
  ``[t, end]``; :func:`whiten_block` then centres and scales them as the official code does: once per
  PPO minibatch, over the whole padded ``(B × W)`` response block (padding included with R = 0,
  population variance, moments summed over data-parallel ranks). :func:`whiten` is the option that
  uses the valid tokens only.
- :func:`ppo_clipped_loss`: token mean of ``max(−A·ratio, −A·clip(ratio, 1 ± ε))`` with
  ``ratio = exp(log q_θ − log q_old) · w``, ``w = q_old / p̃``.
- :func:`minillm_loss`: that term plus the single-step term (token-mean full-vocabulary reverse KL
  ``KL(q_θ‖p)`` on the sampled prefixes, both models at the rollout temperature as in LMOps) from
  one student forward, both through kd_kernels' fused-linear functions.

Log-probabilities of the sampled tokens for the ratio, the rewards and the weights are computed with
``fused_linear_logprobs`` at the rollout temperature from the full distribution; with ``top_k = 0`` and
``top_p = 1`` (the defaults) that is exactly the distribution sampled from. With truncation on, the
sampling is truncated but those log-probabilities are not renormalized over the kept set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import kd_kernels

from .losses import Head, head_kd

REWARD_SCALE = 0.5
REWARD_CLIP = 100.0
WHITEN_EPS = 1e-8


# ---------------------------------------------------------------------------------------- sampling


def process_logits(
    logits: torch.Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Log-probabilities after temperature, top-k (0: off) and top-p (1: off), as HF's warpers do:
    removed entries are −inf and the rest are renormalized. ``logits``: ``(B, V)``."""
    x = logits.float() / temperature
    if top_k > 0 and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return torch.log_softmax(x, dim=-1)


def mix_distribution(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float
) -> torch.Tensor:
    """``log p̃ = log((1 − α) q + α p)``, formed in log space (MATH.md: never in probability space)."""
    if alpha <= 0.0:
        return student_logp
    if alpha >= 1.0:
        return teacher_logp
    return torch.logaddexp(student_logp + math.log1p(-alpha), teacher_logp + math.log(alpha))


@dataclass
class Rollout:
    """One sampled response: its tokens (EOS included when it was sampled) and ``log p̃(y_t)``."""

    tokens: list[int]
    mix_logp: list[float]


def _step_forward(model, ids, attn, pos, cache):
    out = model(
        input_ids=ids,
        attention_mask=attn,
        position_ids=pos,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float(), out.past_key_values


@torch.no_grad()
def mixed_rollouts(
    student,
    teacher,
    prompts: list[list[int]],
    *,
    alpha: float,
    temperature: float,
    top_k: int,
    top_p: float,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> list[Rollout]:
    """Sample one response per prompt from ``p̃ = (1 − α) q + α p``, both models stepping with their own
    KV caches (left-padded prompts, positions from the attention mask). Stops at EOS or
    ``max_new_tokens``. Sampling uses ``generator`` (a CPU generator), so a seeded call repeats."""
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    n = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    ids, attn = ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    s_logits, s_cache = _step_forward(student, ids, attn, pos, None)
    t_logits, t_cache = _step_forward(teacher, ids, attn, pos, None)
    last = pos[:, -1:]
    done = torch.zeros(n, dtype=torch.bool)
    tokens: list[list[int]] = [[] for _ in range(n)]
    mix_lp: list[list[float]] = [[] for _ in range(n)]
    for _ in range(max_new_tokens):
        lq = process_logits(s_logits, temperature=temperature, top_k=top_k, top_p=top_p)
        lp = process_logits(t_logits, temperature=temperature, top_k=top_k, top_p=top_p)
        lmix = mix_distribution(lq, lp, alpha).cpu()
        y = torch.multinomial(lmix.exp(), 1, generator=generator).squeeze(1)
        chosen = lmix.gather(1, y[:, None]).squeeze(1)
        for i in range(n):
            if not done[i]:
                tokens[i].append(int(y[i]))
                mix_lp[i].append(float(chosen[i]))
        done |= y == eos_id
        if bool(done.all()):
            break
        y = torch.where(done, torch.full_like(y, pad_id), y).to(device)
        attn = torch.cat([attn, torch.ones((n, 1), dtype=attn.dtype, device=device)], dim=1)
        last = last + 1
        s_logits, s_cache = _step_forward(student, y[:, None], attn, last, s_cache)
        t_logits, t_cache = _step_forward(teacher, y[:, None], attn, last, t_cache)
    student.train(modes[0])
    teacher.train(modes[1])
    return [Rollout(t, m) for t, m in zip(tokens, mix_lp)]


# ----------------------------------------------------------------------------- rewards, advantages


def importance_log_weights(
    old_logp: torch.Tensor, mix_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``log w_t = log q_old(y_t) − log p̃(y_t)`` (0 where ``mask`` is False)."""
    return torch.where(mask, old_logp - mix_logp, torch.zeros_like(old_logp))


def token_rewards(
    teacher_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``r_t = clip((log p(y_t) − log q_old(y_t)) / 0.5, −100, 100)``, 0 where ``mask`` is False."""
    r = ((teacher_logp - old_logp) / REWARD_SCALE).clamp(-REWARD_CLIP, REWARD_CLIP)
    return torch.where(mask, r, torch.zeros_like(r))


def normalized_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``(Σ_{t'≥t} γ^{t'−t} r_{t'}) / #valid tokens in [t, end]`` per row of ``(B, L)``; 0 off the mask.

    Rewards off the mask count as 0 and the valid tokens of a row need not be contiguous."""
    r = torch.where(mask, rewards, torch.zeros_like(rewards)).double()
    ret = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        ret[:, t] = running
    remaining = mask.flip(1).cumsum(1).flip(1).clamp_min(1).to(r.dtype)
    out = ret / remaining
    return torch.where(mask, out, torch.zeros_like(out)).to(rewards.dtype)


def block_moments(values: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """``[Σ R, Σ R², B·W]`` (float64) of the padded response block: each of the ``B`` rows holds its
    masked-in entries of ``values`` and ``width − #valid`` padding slots with R = 0."""
    if values.dim() != 2 or values.shape != mask.shape:
        raise ValueError(
            f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must be the "
            "same (B, L) shape"
        )
    longest = int(mask.sum(1).max()) if mask.numel() else 0
    if longest > width:
        raise ValueError(
            f"a row has {longest} valid tokens but the response width is {width}; "
            "pass the padded response width (--max-new-tokens)"
        )
    x = torch.where(
        mask, values.double(), torch.zeros((), dtype=torch.float64, device=values.device)
    )
    return torch.stack(
        [
            x.sum(),
            (x * x).sum(),
            torch.tensor(float(values.shape[0] * width), dtype=torch.float64, device=values.device),
        ]
    )


def whiten_block(
    values: torch.Tensor,
    mask: torch.Tensor,
    width: int,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """MiniLLM's official whitening of one PPO minibatch: ``(R − μ) / sqrt(σ² + 1e-8)`` with ``μ``, ``σ²``
    the mean and population variance over the whole ``(B × width)`` response block, padding
    included (padded slots count as R = 0), then 0 off ``mask``.

    ``reduce`` sums the three moments of :func:`block_moments` over data-parallel ranks (e.g. an
    ``all_reduce``); ``None``: this process only."""
    m = block_moments(values, mask, width)
    if reduce is not None:
        m = reduce(m)
    total, squares, count = (float(v) for v in m)
    if count == 0:
        return torch.zeros_like(values)
    mean = total / count
    var = max(squares / count - mean * mean, 0.0)
    out = (values.double() - mean) / math.sqrt(var + WHITEN_EPS)
    return torch.where(mask, out, torch.zeros_like(out)).to(values.dtype)


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(x − mean) / sqrt(var + 1e-8)`` over the masked-in entries (population variance); 0 elsewhere.
    The ``--minillm-whiten valid`` option (applied to a whole rollout round of one process)."""
    x = values[mask].double()
    if x.numel() == 0:
        return torch.zeros_like(values)
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    out = (values.double() - mean) * torch.rsqrt(var + WHITEN_EPS)
    return torch.where(mask, out, torch.zeros_like(out)).to(values.dtype)


# ------------------------------------------------------------------------------------------- losses


def ppo_clipped_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    log_w: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token mean of ``max(−A·ratio, −A·clip(ratio, 1 − ε, 1 + ε))``, ``ratio = exp(log q_θ − log q_old)·w``.

    ``old_logp``, ``log_w`` and ``advantages`` are constants (no gradient). Returns the loss and the
    mean ratio and clipped fraction over the masked-in tokens."""
    ratio = torch.exp(logp - old_logp.detach() + log_w.detach())
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)
    per_tok = torch.maximum(unclipped, clipped)
    n = mask.sum().clamp_min(1)
    loss = torch.where(mask, per_tok, torch.zeros_like(per_tok)).sum() / n
    with torch.no_grad():
        frac = ((clipped > unclipped) & mask).sum() / n
        mean_ratio = torch.where(mask, ratio, torch.zeros_like(ratio)).sum() / n
    return loss, {"ratio": float(mean_ratio), "clip_frac": float(frac)}


def minillm_loss(
    student: Head,
    teacher: Head,
    targets: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor,
    log_w: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip: float,
    rollout_temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped policy gradient + single-step reverse KL(q_θ‖p), both on the sampled responses.

    ``student``/``teacher``: hidden states of positions 0 … T−2 and the lm_heads; ``targets`` the sampled
    next tokens, ``mask`` True on response tokens. Log q_θ of the sampled tokens comes from
    ``fused_linear_logprobs`` and the single-step term from
    ``fused_linear_kd(divergence="reverse_kl")``, both at the rollout temperature (LMOps divides
    both models' logits by its one temperature)."""
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logp = kd_kernels.fused_linear_logprobs(
        student.hidden,
        student.weight,
        safe,
        bias=student.bias,
        temperature=rollout_temperature,
        mask=mask,
        chunk_size=chunk_size,
        **student.transform(),
    )
    pg, info = ppo_clipped_loss(logp, old_logp, log_w, advantages, mask, clip)
    single = head_kd(
        student,
        teacher,
        divergence="reverse_kl",
        temperature=rollout_temperature,
        mask=mask,
        reduction="mean",
        chunk_size=chunk_size,
        backend=backend,
    )
    return pg + single, {"pg": float(pg.detach()), "single_step": float(single.detach()), **info}
