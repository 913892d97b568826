"""DistiLLM (Ko et al., 2024) as the official code runs it: the adaptive off-policy schedule and its
replay buffer (MATH.md, "DistiLLM, as the official code runs it").

Steps are counted from 1 (``global_step = step + 1`` for the trainer's 0-based ``step``). Each step draws
``r ~ U(0, 1)``; with ``τ`` the current threshold and ``s = τ (1 − global_step / total)``:

- ``r < s``, or the buffer is not yet full and ``r < τ``: generate fresh student responses, train on them
  and push them to the replay buffer (FIFO, capacity 1000);
- else ``r < τ``: train on a batch replayed from the buffer;
- else: train on the ground-truth responses (the teacher's references).

The threshold starts at ``τ0 = 0`` against a reference validation CE ``L_ref`` measured before training.
At each check (once per epoch: every ``floor(N / (batch · world))`` steps, the official loader
dropping the last partial batch): if ``L_val ≥ L_ref + 0.1`` then ``τ ← min(1, τ + 0.1)`` and
``L_ref ← L_val``; otherwise nothing changes (the reference moves only when ``τ`` rises).
``L_val`` is computed as the official ``evaluate`` does (:func:`valid_batches`): batches of
``VALID_BATCH_SIZE`` per rank, the per-batch token means averaged over ranks, then over steps.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

GENERATE, REPLAY, GROUND_TRUTH = "generate", "replay", "ground_truth"
SOURCES = (GENERATE, REPLAY, GROUND_TRUTH)
VALID_BATCH_SIZE = 32  # the official --eval-batch-size default (the 0.3B recipe's value)


def valid_batches(n: int, world: int, batch_size: int) -> list[list[list[int]]]:
    """The official validation loader's batches: ``[step][rank] → example indices``.

    A ``DistributedSampler`` without shuffling or ``drop_last``: the indices ``0 … n−1`` padded by
    wrapping round to a multiple of ``world``, rank ``r`` taking every ``world``-th from ``r``, each
    rank's share cut into batches of ``batch_size`` (the last may be shorter)."""
    if n < 1:
        raise ValueError(
            "distillm needs a non-empty validation split; raise --valid-frac or --max-prompts"
        )
    total = -(-n // world) * world
    padded = [i % n for i in range(total)]
    shares = [padded[r::world] for r in range(world)]
    per_rank = len(shares[0])
    return [[share[i : i + batch_size] for share in shares] for i in range(0, per_rank, batch_size)]


def choose_source(r: float, threshold: float, step: int, total: int, buffer_full: bool) -> str:
    """Where the batch of the trainer's 0-based ``step`` comes from, given the uniform draw ``r``: the
    official rule with ``global_step = step + 1`` (see the module doc)."""
    if total < 1:
        raise ValueError(f"total={total} steps must be >= 1")
    s = threshold * (1.0 - (step + 1) / total)
    if r < s or (not buffer_full and r < threshold):
        return GENERATE
    if r < threshold:
        return REPLAY
    return GROUND_TRUTH


@dataclass
class ThresholdSchedule:
    """``τ`` and the validation-CE reference ``L_ref`` it moves against (official rule)."""

    threshold: float = 0.0
    step_size: float = 0.1
    rise: float = 0.1  # a validation-CE rise of at least this raises τ
    max_threshold: float = 1.0
    reference: float | None = None

    def update(self, valid_ce: float) -> bool:
        """Record one validation CE; returns True when τ was raised. The first call (the measurement
        before training) sets ``L_ref`` only. Later calls: if ``valid_ce ≥ L_ref + rise`` then
        ``τ ← min(max, τ + step_size)`` and ``L_ref ← valid_ce``; otherwise nothing changes."""
        if self.reference is None:
            self.reference = valid_ce
            return False
        if valid_ce - self.reference >= self.rise - 1e-12:
            self.threshold = min(self.max_threshold, round(self.threshold + self.step_size, 10))
            self.reference = valid_ce
            return True
        return False

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
