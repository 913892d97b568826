"""The objectives at a glance: a one-Gaussian student fitted to a bimodal teacher with each divergence.

The axis is discretized into 100 bins; the teacher is a mixture of two Gaussians; the student's logits
are ``−(x − μ)² / (2σ²)`` with learnable ``μ`` and ``log σ``, so it cannot represent both modes and each
divergence shows what it prefers: forward KL covers both modes (mean-covering), reverse KL picks one
(mode-seeking), the skew and JSD variants sit in between. Every loss is kd_kernels' own ``kd_loss``.

    python docs/figures/objectives.py            # writes docs/figures/objectives.png
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

import kd_kernels

BINS = 100
X = torch.linspace(-6.0, 6.0, BINS)
OBJECTIVES = (  # (title, divergence, keyword arguments of kd_loss)
    ("forward KL(p‖q)\nmean-covering (KD, SeqKD)", "forward_kl", {}),
    ("reverse KL(q‖p)\nmode-seeking (MiniLLM, GKD β=1)", "reverse_kl", {}),
    ("skew forward KL, α=0.1\n(DistiLLM SKL)", "skew_forward_kl", {"alpha": 0.1}),
    ("skew reverse KL, α=0.1\n(DistiLLM SRKL)", "skew_reverse_kl", {"alpha": 0.1}),
    ("JSD, β=0.5\n(GKD default)", "jsd", {"beta": 0.5}),
    ("JSD, β=0.9\n(GKD, towards reverse KL)", "jsd", {"beta": 0.9}),
)


def teacher_logits() -> torch.Tensor:
    """log of 0.6·N(−2.5, 0.7²) + 0.4·N(2.5, 0.7²) on the bins (unnormalized log-probabilities)."""

    def log_normal(mu: float, sd: float) -> torch.Tensor:
        return -((X - mu) ** 2) / (2 * sd * sd) - math.log(sd)

    return torch.logaddexp(
        math.log(0.6) + log_normal(-2.5, 0.7), math.log(0.4) + log_normal(2.5, 0.7)
    )


def student_logits(mu: torch.Tensor, log_sd: torch.Tensor) -> torch.Tensor:
    return -((X - mu) ** 2) / (2 * torch.exp(2 * log_sd))


def fit(divergence: str, kwargs: dict, steps: int = 600) -> tuple[float, float]:
    """``(μ, σ)`` minimizing the divergence between the teacher and the Gaussian student."""
    t = teacher_logits()[None]
    # start narrow, between the modes and nearer the left one: every objective starts from the same
    # place; mean-covering ones spread over both modes, mode-seeking ones settle on one
    mu = torch.tensor(-1.0, requires_grad=True)
    log_sd = torch.tensor(math.log(0.8), requires_grad=True)
    opt = torch.optim.Adam([mu, log_sd], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = kd_kernels.kd_loss(
            student_logits(mu, log_sd)[None], t, divergence=divergence, **kwargs
        )
        loss.backward()
        opt.step()
    return float(mu.detach()), float(torch.exp(log_sd.detach()))


def main(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = torch.softmax(teacher_logits(), -1)
    fig, axes = plt.subplots(1, len(OBJECTIVES), figsize=(15, 2.7), sharey=True)
    for ax, (title, divergence, kwargs) in zip(axes, OBJECTIVES):
        mu, sd = fit(divergence, kwargs)
        q = torch.softmax(student_logits(torch.tensor(mu), torch.tensor(math.log(sd))), -1)
        ax.fill_between(X, p, color="0.75", label="teacher p")
        ax.plot(X, q, color="tab:red", lw=2, label="student q")
        ax.set_title(title, fontsize=9)
        ax.text(
            0.02, 0.95, f"μ={mu:+.2f}\nσ={sd:.2f}", transform=ax.transAxes, va="top", fontsize=8
        )
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(loc="upper right", fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(__file__).with_name("objectives.png"))
