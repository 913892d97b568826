"""Where the time of a MiniLLM and a DistiLLM training step goes (kd-train, any preset).

    PYTHONPATH=$PWD python benchmarks/profile_trainer.py [--preset smollm2] [--max-prompts 24] \
        [--methods minillm,distillm,gkd,kd] [--minillm-steps 2] [--cprofile 12] [kd-train flags ...]

Loads the models once, then, for each method, times the phases of a few real optimizer steps with
wall-clock timers around the trainer's own functions: rollouts / generation, the scoring forwards, the
validation-CE check, the student and teacher forwards of the loss, the fused-linear losses, backward and
the optimizer step. MiniLLM: one rollout round (sampling + scoring, amortized over the round's
``--minillm-ppo-epochs × rollouts / batch`` steps) and ``--minillm-steps`` PPO steps. DistiLLM: the
validation check before training, one step on fresh student samples and one on the references.
GKD: one step on the student's samples, one on the references; KD: two steps (for scale).
``--cprofile N`` also prints the N functions with the most own time. Timings on a shared machine are
inflated by the load; compare the phases of one run with each other.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import kd_kernels
from kd_kernels.train import distillm as D
from kd_kernels.train import generate as G
from kd_kernels.train import methods as M
from kd_kernels.train.config import parse_args
from kd_kernels.train.run import Run

TIMES: dict[str, float] = defaultdict(float)
COUNTS: dict[str, int] = defaultdict(int)


@contextmanager
def timed(name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        TIMES[name] += time.perf_counter() - t0
        COUNTS[name] += 1


def wrap(owner, attr: str, name_of):
    """Replace ``owner.attr`` by a timed version; ``name_of(*args)`` names the phase of a call."""
    fn = getattr(owner, attr)

    def timed_fn(*args, **kwargs):
        with timed(name_of(*args, **kwargs)):
            return fn(*args, **kwargs)

    setattr(owner, attr, timed_fn)


def instrument(run: Run) -> None:
    teacher = run.models.teacher
    wrap(M, "head", lambda model, b: "forward teacher" if model is teacher else "forward student")
    wrap(M, "mixed_rollouts", lambda *a, **k: "minillm rollouts (both models, KV cache)")
    wrap(M, "valid_ce", lambda *a, **k: "distillm validation CE")
    wrap(G, "generate", lambda *a, **k: "student generate (HF, KV cache)")
    for fn in ("fused_linear_kd", "fused_linear_logprobs"):
        wrap(kd_kernels, fn, lambda *a, fn=fn, **k: f"kd_kernels.{fn}")


def step(method, run, opt, k: int) -> dict[str, float]:
    with timed(f"{method.name}: batch"):
        batch = method.step_batch(run, k)
    with timed(f"{method.name}: loss (forward)"):
        loss, parts = method.step_loss(run.models.student, run.models.teacher, batch, run)
    opt.zero_grad(set_to_none=True)
    with timed(f"{method.name}: backward"):
        loss.backward()
    with timed(f"{method.name}: optimizer"):
        torch.nn.utils.clip_grad_norm_(run.models.student.parameters(), run.cfg.grad_clip)
        opt.step()
    return parts


def report(title: str, before: dict[str, float], counts_before: dict[str, int]) -> None:
    print(f"\n## {title}\n\n| phase | calls | seconds |\n|---|---|---|")
    for name in sorted(TIMES, key=lambda n: -(TIMES[n] - before.get(n, 0.0))):
        dt = TIMES[name] - before.get(name, 0.0)
        if dt > 0:
            print(f"| {name} | {COUNTS[name] - counts_before.get(name, 0)} | {dt:.2f} |")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--methods",
        default="minillm,distillm",
        help="comma-separated, of minillm, distillm, gkd, kd",
    )
    p.add_argument("--minillm-steps", type=int, default=2)
    p.add_argument(
        "--cprofile", type=int, default=0, help="print the N functions with most own time"
    )
    args, rest = p.parse_known_args(argv)
    if "--max-prompts" not in rest:
        rest += ["--max-prompts", "24"]
    cfg, _ = parse_args(["minillm", "--no-progress", *rest], sorted(M.METHODS))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    run = Run(cfg, 0, 1, torch.device("cpu" if cfg.device == "auto" else cfg.device))
    run.train_examples = run.examples("train")
    print(
        f"load + references: {time.perf_counter() - t0:.1f} s; {len(run.train_examples)} train "
        f"examples; torch threads {torch.get_num_threads()}"
    )
    instrument(run)
    prof = cProfile.Profile() if args.cprofile else None
    student = run.models.student
    state = {k: v.clone() for k, v in student.state_dict().items()}

    plan = {"minillm": args.minillm_steps, "distillm": 2, "gkd": 2, "kd": 2}
    for name in args.methods.split(","):
        n_steps = plan[name]
        student.load_state_dict(state)
        method = M.get_method(name)
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
        before, counts = dict(TIMES), dict(COUNTS)
        if name == "distillm":  # step 0 on fresh student samples, step 1 on the references
            forced = iter([D.GENERATE, D.GROUND_TRUTH])
            M.choose_source = lambda *a, forced=forced, **k: next(forced)
        if prof:
            prof.enable()
        for k in range(n_steps):
            if name == "gkd":  # step 0 on the student's samples, step 1 on the references
                cfg.gkd_lambda = 1.0 if k == 0 else 0.0
            step(method, run, opt, k)
        if prof:
            prof.disable()
        per_round = M.MiniLLM.steps_per_round(cfg)
        extra = f" (a round = {per_round} steps)" if name == "minillm" else ""
        report(
            f"{name}: {n_steps} steps, batch {cfg.batch_size}, max new tokens "
            f"{cfg.max_new_tokens}{extra}",
            before,
            counts,
        )
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.cprofile)
        print("\n```\n" + s.getvalue().strip() + "\n```")


if __name__ == "__main__":
    main(sys.argv[1:])
