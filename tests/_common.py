"""Constants shared by the test modules (conftest.py has already switched on Triton's interpreter)."""

import kd_kernels

DIVERGENCES = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd")
CPU_BACKENDS = tuple(kd_kernels.available_backends("cpu"))


def tiny_train_config(method: str, response_cache, **overrides):
    """A TrainConfig for a seconds-long run of ``method`` on the tiny preset; ``overrides`` (``out`` among
    them) win."""
    from kd_kernels.train.config import TrainConfig

    base = {
        "method": method,
        "preset": "tiny",
        "steps": 4,
        "batch_size": 2,
        "max_prompts": 24,
        "max_new_tokens": 6,
        "gen_batch_size": 32,
        "eval_seeds": "1",
        "cache_dir": str(response_cache),
        "progress": False,
        "lr": 3e-3,
        "warmup_steps": 1,
        "min_lr": 3e-3,
        "ckpt_every": 100,
    }
    base.update(overrides)
    return TrainConfig(**base)


def cpu_levels() -> list[str]:
    """The compiled x86-64 levels of the cpu kernel that this CPU can execute (empty without the extension)."""
    from kd_kernels import _ext

    if _ext._C is None:
        return []
    out = []
    for name in _ext._C.build_info()["cpu_targets"]:
        try:
            _ext._C._set_cpu_isa(name)
        except ValueError:
            continue
        out.append(name)
    _ext._C._set_cpu_isa("auto")
    return out
