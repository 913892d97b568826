"""Peak memory and time of ``kd_kernels.hf.distill_loss`` against the plain Hugging Face path, on
the smollm2 preset's teacher (SmolLM2-135M-Instruct) and student (every third layer), each
provider in its own process.

Providers (one training step's loss + backward of every student parameter; teacher under
``no_grad``; forward KL + 0.5 × CE on all 8 × 256 tokens):
  hf       ``student(input_ids, labels=...)`` (.logits and HF's CE), ``teacher(...).logits``,
           ``kd_kernels.kd_loss`` on the shifted logits: the (B, T, V) logits of both models exist;
  distill  ``kd_kernels.hf.distill_loss``: hidden states and lm_head weights only.

Memory: the peak resident set (VmHWM, reset after the models are loaded and the batch built) minus
the resident set at that point. CPU only.

    python benchmarks/bench_hf.py                       # 8 x 256 tokens, 2 timed steps
    python benchmarks/bench_hf.py --batch 4 --seq 128 --reps 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

PROVIDERS = ("hf", "distill")


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def worker(args: argparse.Namespace) -> dict:
    import torch

    import kd_kernels
    from kd_kernels import hf
    from kd_kernels.train.models import decoder_layers, load_smollm2, make_student, parse_layers

    teacher, _, _ = load_smollm2("float32")
    student = make_student(teacher, parse_layers("", len(decoder_layers(teacher))))
    teacher.requires_grad_(False).eval()
    student.train()
    vocab = student.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    am = torch.ones_like(ids)
    labels = ids.clone()

    def step() -> float:
        student.zero_grad(set_to_none=True)
        if args.provider == "hf":
            out = student(input_ids=ids, attention_mask=am, labels=labels)
            with torch.no_grad():
                t = teacher(input_ids=ids, attention_mask=am).logits
            kd = kd_kernels.kd_loss(
                out.logits[:, :-1], t[:, :-1], divergence="forward_kl", mask=labels[:, 1:] != -100
            )
            loss = kd + 0.5 * out.loss
        else:
            loss = hf.distill_loss(
                student,
                teacher,
                input_ids=ids,
                attention_mask=am,
                labels=labels,
                divergence="forward_kl",
                ce_weight=0.5,
            )
        loss.backward()
        return float(loss)

    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the load's peak does not count
        f.write("5")
    base = _status("VmRSS")
    t0 = time.perf_counter()
    loss = step()
    first = time.perf_counter() - t0
    peak_extra = _status("VmHWM") - base
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    grad_norm = float(
        torch.norm(torch.stack([p.grad.norm() for p in student.parameters() if p.grad is not None]))
    )
    return {
        "provider": args.provider,
        "loss": loss,
        "grad_norm": grad_norm,
        "peak_extra_mib": round(peak_extra, 1),
        "base_rss_mib": round(base, 1),
        "first_s": round(first, 3),
        "median_s": round(statistics.median(times), 3),
        "times_s": [round(x, 3) for x in times],
        "threads": torch.get_num_threads(),
        "tokens": args.batch * args.seq,
        "vocab": vocab,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2, help="timed steps after the measured first")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--provider", default=None, help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args()
    if args.provider is not None:
        print(json.dumps(worker(args)))
        return
    results = {}
    for provider in args.providers.split(","):
        if provider not in PROVIDERS:
            raise SystemExit(f"--providers: unknown {provider!r}; use {', '.join(PROVIDERS)}")
        cmd = [
            sys.executable,
            __file__,
            "--provider",
            provider,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--reps",
            str(args.reps),
        ]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{provider} worker failed:\n{proc.stderr[-2000:]}")
        results[provider] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(results[provider]))
    if set(results) == set(PROVIDERS):
        h, d = results["hf"], results["distill"]
        print(
            f"distill_loss vs hf path at {args.batch}x{args.seq}: peak extra memory "
            f"{d['peak_extra_mib']:.0f} vs {h['peak_extra_mib']:.0f} MiB "
            f"({h['peak_extra_mib'] / max(d['peak_extra_mib'], 1):.2f}x less), median step "
            f"{d['median_s']:.2f} vs {h['median_s']:.2f} s ({h['median_s'] / d['median_s']:.2f}x);"
            f" loss {d['loss']:.6f} vs {h['loss']:.6f}"
        )


if __name__ == "__main__":
    main()
