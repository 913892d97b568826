"""DistiLLM (Ko et al., 2024): the adaptive off-policy schedule and its replay buffer (MATH.md, "DistiLLM").

Each step draws ``r ~ U(0, 1)``; with ``τ`` the current threshold and ``s = τ (1 − step / total)``:

- ``r < s``, or the buffer is not yet full and ``r < τ``: generate fresh student responses, train on them
  and push them to the replay buffer (FIFO, capacity 1000);
- else ``r < τ``: train on a batch replayed from the buffer;
- else: train on the ground-truth responses (the teacher's references).

Once per epoch the student's validation CE is measured; if it rose by at least 0.1 since the previous
measurement (the reference), ``τ += 0.1`` (at most 1). ``τ0 = 0``, so training starts fully off the
student's samples and moves on-policy only when validation CE says the student is drifting.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

GENERATE, REPLAY, GROUND_TRUTH = "generate", "replay", "ground_truth"
SOURCES = (GENERATE, REPLAY, GROUND_TRUTH)


def choose_source(r: float, threshold: float, step: int, total: int, buffer_full: bool) -> str:
    """Where step ``step``'s batch comes from, given the uniform draw ``r`` (see the module doc)."""
    if total < 1:
        raise ValueError(f"total={total} steps must be >= 1")
    s = threshold * (1.0 - step / total)
    if r < s or (not buffer_full and r < threshold):
        return GENERATE
    if r < threshold:
        return REPLAY
    return GROUND_TRUTH


@dataclass
class ThresholdSchedule:
    """``τ`` and the validation-CE reference it moves against."""

    threshold: float = 0.0
    step_size: float = 0.1
    rise: float = 0.1  # a validation-CE rise of at least this raises τ
    max_threshold: float = 1.0
    reference: float | None = None

    def update(self, valid_ce: float) -> bool:
        """Record one validation CE; returns True when τ was raised. The first call sets the
        reference only; every call makes ``valid_ce`` the new reference."""
        raised = False
        if self.reference is not None and valid_ce - self.reference >= self.rise - 1e-12:
            self.threshold = min(self.max_threshold, round(self.threshold + self.step_size, 10))
            raised = True
        self.reference = valid_ce
        return raised

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "reference": self.reference}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = float(state["threshold"])
        self.reference = None if state["reference"] is None else float(state["reference"])


@dataclass
class ReplayBuffer:
    """A FIFO of generated examples (token-id lists); the oldest fall out past ``capacity``."""

    capacity: int = 1000
    items: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity={self.capacity} must be >= 1")
        self.items = deque(self.items, maxlen=self.capacity)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.capacity

    def push(self, examples) -> None:
        self.items.extend(examples)

    def sample(self, k: int, rng: random.Random) -> list:
        """``k`` distinct items drawn uniformly; with replacement when the buffer holds fewer."""
        if not self.items:
            raise ValueError("cannot replay from an empty buffer")
        n = len(self.items)
        idx = rng.sample(range(n), k) if n >= k else [rng.randrange(n) for _ in range(k)]
        return [self.items[i] for i in idx]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "items": list(self.items)}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.items = deque(state["items"], maxlen=self.capacity)
