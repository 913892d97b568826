"""The vocabulary-parallel row passes of each backend (``kd_kernels._backends._vocab_parallel``), in one
process: a vocabulary split into uneven shards, the three local steps of every shard with the exchanges
done by hand (stack + ``combine_row_stats``, sum + ``with_row_sums``), against the float64 reference on
the whole row and against the torch implementation shard by shard. Fast; the spawned gloo runs of
tests/test_parallel.py then check the same implementations through ``kd_kernels.parallel``.

The compiled ``cpu`` implementation runs at every x86-64 level this CPU executes; the ``triton`` one under
the interpreter (conftest.py) at small shapes with small blocks, so each shard takes several blocks.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from _common import cpu_levels

from kd_kernels import _ext
from kd_kernels import reference as R
from kd_kernels._backends import BackendUnavailableError, available_backends
from kd_kernels._backends import _vocab_parallel as vp
from kd_kernels._spec import Divergence, KDSpec

DIVERGENCES = tuple(d.label for d in Divergence)

COEF = {
    "skew_forward_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.3},
    "jsd": {"beta": 0.4},
    "alpha_beta": {"alpha": 0.6, "beta": 0.8},
    "renyi": {"alpha": 1.5},
}
SPLIT = (300, 1, 400, 330)  # V = 1031, a one-column shard among them
RTOL = 1e-5  # relative, norm-wise, on top of the single-process call's own rounding error


LEVELS = cpu_levels()
HAVE_TRITON = "triton" in available_backends("cpu")


def _spec(div: str, temperature: float = 1.0) -> KDSpec:
    return KDSpec.make(div, temperature=temperature, **COEF.get(div, {}))


def _sharded(impl, s, t, spec, row_weight, split, in_place=False):
    """(per-row loss, gradient, global stats) of ``impl`` over the shards of ``split``, exchanging by hand."""
    bounds = [sum(split[:i]) for i in range(len(split) + 1)]
    shards = [(s[:, lo:hi], t[:, lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
    stats = vp.combine_row_stats(torch.stack([impl.row_stats(a, b, spec) for a, b in shards]), spec)
    if vp.needs_row_sums(spec):
        sums = sum(impl.row_sums(a, b, stats, spec) for a, b in shards)
        stats = vp.with_row_sums(stats, sums)
    grads, losses = [], []
    for a, b in shards:
        if in_place:
            a = a.clone()
            g = a
        else:
            g = torch.empty_like(a)
        losses.append(impl.loss_grad_given_stats(a, b, stats, row_weight, spec, g))
        grads.append(g)
    for other in losses[1:]:
        assert torch.allclose(
            other, losses[0], rtol=0, atol=0, equal_nan=True
        )  # the same on every rank
    return losses[0], torch.cat(grads, 1), stats


def _inputs(n=6, v=None, dtype=torch.float32, seed=0, shift=2000.0):
    v = sum(SPLIT) if v is None else v
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * 3).to(dtype)
    t = (torch.randn(n, v, generator=g) * 3).to(dtype)
    s[1, 2:40] = -math.inf  # −inf columns in both, and the whole one-column shard of row 2
    t[1, 2:40] = -math.inf
    s[2, SPLIT[0]] = t[2, SPLIT[0]] = -math.inf
    # Large logits: log-probabilities formed relative to the global max (ℓ = (x − M) − log Z). Only at
    # T = 1: s/T itself rounds at the magnitude of the logits in fp32.
    s[3] += shift
    t[3] += shift
    w = torch.rand(n, generator=g) + 0.5
    w[4] = 0.0  # a skipped row
    return s, t, w


def _reference(div, s, t, w, temperature):
    S = s.double().clamp_min(-1e4).requires_grad_()
    per = R.kd_loss(
        div,
        S,
        t.double().clamp_min(-1e4),
        temperature=temperature,
        reduction="none",
        **COEF.get(div, {}),
    )
    (per * w.double()).sum().backward()
    return per.detach(), S.grad


def _rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _single_error(backend, div, s, t, w, temperature, ref_loss, ref_grad):
    """The single-process kd_loss's (loss, gradient) errors against float64 on these inputs with
    ``backend``: the fp32 (or bf16) rounding of the unsharded computation."""
    import kd_kernels

    S = s.clone().requires_grad_()
    per = kd_kernels.kd_loss(
        S,
        t,
        divergence=div,
        temperature=temperature,
        reduction="none",
        backend=backend,
        **COEF.get(div, {}),
    )
    (per * w).sum().backward()
    active = w != 0
    return _rel(per.detach()[active], ref_loss[active]), _rel(S.grad.float(), ref_grad)


def _check(impl, div, dtype=torch.float32, temperature=1.0, split=SPLIT, in_place=False, n=6):
    """Sharded loss and gradient within RTOL (+ twice the single-process call's own error, the rule of
    tests/test_parallel.py; for the compiled kernels the larger of the torch backend's and the dense kernel's
    own at this ISA level) of float64, and the same statistics as the torch implementation."""
    s, t, w = _inputs(n=n, v=sum(split), dtype=dtype, shift=2000.0 if temperature == 1.0 else 20.0)
    spec = _spec(div, temperature)
    loss, grad, stats = _sharded(impl, s, t, spec, w, split, in_place=in_place)
    ref_loss, ref_grad = _reference(div, s, t, w, temperature)
    own_loss, own_grad = _single_error("torch", div, s, t, w, temperature, ref_loss, ref_grad)
    if impl.name == "cpu":  # the dense compiled kernel's polynomial exp / log (no FMA at x86-64)
        dense = _single_error("cpu", div, s, t, w, temperature, ref_loss, ref_grad)
        own_loss, own_grad = max(own_loss, dense[0]), max(own_grad, dense[1])
    active = w != 0
    assert (loss[~active] == 0).all() and (grad[~active] == 0).all()
    assert grad.dtype == dtype
    assert _rel(loss[active], ref_loss[active]) <= RTOL + 2 * own_loss, div
    assert _rel(grad.float(), ref_grad) <= RTOL + 2 * own_grad, div
    # Shard by shard the same statistics as the torch implementation (up to fp32 rounding).
    t_loss, t_grad, t_stats = _sharded(vp.TorchVocabParallel(), s, t, spec, w, split)
    finite = torch.isfinite(t_stats)
    assert torch.equal(finite, torch.isfinite(stats))
    # L of forward / reverse KL is A/Z − LSE_t + LSE_s: its fp32 rounding is that of the LSEs.
    atol = 1e-5 + 4e-7 * t_stats[:, :2].abs().amax(1, keepdim=True).nan_to_num()
    atol = atol.expand_as(stats)[finite]
    assert ((stats[finite] - t_stats[finite]).abs() <= atol + 1e-5 * t_stats[finite].abs()).all()
    assert _rel(grad.float(), t_grad.float()) <= RTOL + 4 * own_grad


@pytest.fixture
def level(request):
    _ext._C._set_cpu_isa(request.param)
    yield request.param
    _ext._C._set_cpu_isa("auto")


needs_cpu = pytest.mark.skipif(
    _ext._C is None, reason=f"kd_kernels._C not built: {_ext.load_error}"
)


@needs_cpu
@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("div", DIVERGENCES)
def test_cpu_rows_every_level(level, div):
    impl = vp.resolve("cpu", "cpu")
    assert impl.name == "cpu"
    _check(impl, div, temperature=1.0)
    _check(impl, div, temperature=0.7)


@needs_cpu
@pytest.mark.parametrize("div", DIVERGENCES)
def test_cpu_rows_bf16_in_place_long_shards(div):
    """bf16 shards, gradient written over the student shard, shards of several 512-entry blocks."""
    impl = vp.resolve("cpu", "cpu")
    _check(impl, div, dtype=torch.bfloat16, split=(1500, 700, 1103), in_place=True, n=5)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_torch_rows(div):
    _check(vp.TorchVocabParallel(), div, temperature=2.0)


@needs_cpu
def test_cpu_rows_mixed_dtypes_and_nan():
    """A float32 teacher with a bf16 student; a NaN on one shard makes that row NaN everywhere."""
    impl = vp.resolve("cpu", "cpu")
    s, t, w = _inputs()
    s = s.bfloat16()
    s[0, 700] = float("nan")
    for div in ("forward_kl", "jsd", "renyi"):
        spec = _spec(div)
        loss, grad, _ = _sharded(impl, s, t, spec, w, SPLIT)
        t_loss, t_grad, _ = _sharded(vp.TorchVocabParallel(), s, t, spec, w, SPLIT)
        assert loss[0].isnan() and grad[0].isnan().all()
        assert torch.isfinite(loss[1:]).all() and torch.isfinite(grad[1:]).all()
        assert _rel(grad[1:].float(), t_grad[1:].float()) <= 1e-2  # both rounded to bf16


@pytest.mark.skipif(not HAVE_TRITON, reason="the triton backend cannot run on cpu here")
@pytest.mark.parametrize("div", DIVERGENCES)
def test_triton_rows_interpreted(div):
    from kd_kernels._backends.triton_backend import TritonVocabParallel

    impl = TritonVocabParallel(block_v=128)
    _check(impl, div, temperature=0.7, split=(200, 1, 131), n=5)
    if div in ("forward_kl", "skew_reverse_kl"):
        _check(impl, div, dtype=torch.bfloat16, split=(150, 181), in_place=True, n=5)


def _impl(name):
    if name == "cpu" and _ext._C is None:
        pytest.skip(f"kd_kernels._C not built: {_ext.load_error}")
    if name == "triton":
        if not HAVE_TRITON:
            pytest.skip("the triton backend cannot run on cpu here")
        from kd_kernels._backends.triton_backend import TritonVocabParallel

        return TritonVocabParallel(block_v=128)
    return vp.resolve(name, "cpu")


@pytest.mark.parametrize("name", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("div", DIVERGENCES)
def test_precision_does_not_depend_on_where_the_logits_sit(name, div):
    """Every row at +1e6 (an fp32 ulp is 1/16 there; T = 1, see _inputs): the sharded loss and gradient as
    close to float64 as near 0 (tests/test_divergences.py, the same name). Rényi's mixed logits were
    α t̃ + (1−α) s̃ and forward / reverse KL's loss was A/Z − LSE_t + LSE_s: 2e-2 and 1e-2 off."""
    split = (200, 1, 131)
    g = torch.Generator().manual_seed(1)
    s, t = (
        (torch.randn(4, sum(split), generator=g, dtype=torch.float64) * 2 + 1e6).float()
        for _ in "st"
    )
    w = torch.rand(4, generator=g) + 0.5
    loss, grad, _ = _sharded(_impl(name), s, t, _spec(div), w, split)
    ref_loss, ref_grad = _reference(div, s, t, w, 1.0)
    assert _rel(loss, ref_loss) <= 1e-5, (loss, ref_loss)
    assert _rel(grad, ref_grad) <= 1e-4


def test_resolve_auto_and_explicit():
    cpu = torch.device("cpu")
    want = "cpu" if _ext.has_cpu() else "torch"
    assert vp.resolve("auto", cpu).name == want
    assert vp.resolve("torch", cpu).name == "torch"
    with pytest.raises(BackendUnavailableError, match="vocabulary-parallel"):
        vp.resolve("cuda", cpu)
    with pytest.raises(ValueError, match="unknown"):
        vp.resolve("tpu", cpu)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
            vp.resolve("triton", cpu)
    else:
        assert vp.resolve("triton", cpu).name == "triton"


_COMPILE_VP_SM90 = r"""
import json, sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as e:  # pragma: no cover - triton without its NVIDIA backend
    print(json.dumps({"skip": str(e)[:300]}))
    sys.exit(0)
from kd_kernels import _triton_kernels as K

done = []
for div in range(9):
    k_stats = 6 if div == 8 else (5 if div in (0, 1) else 4)
    for mode in (0, 1, 2):
        if mode == 1 and div in (0, 1, 8):
            continue  # forward / reverse KL and Rényi have no row sums
        sig = {"s_ptr": "*bf16", "t_ptr": "*bf16", "st_ptr": "*fp32", "out_ptr": "*fp32", "w_ptr": "*fp32",
               "g_ptr": "*bf16", "stride_s": "i64", "stride_t": "i64", "stride_g": "i64", "V": "i32",
               "inv_temp": "fp32", "coef": "fp32", "coef2": "fp32", "log_c": "fp32", "log_1mc": "fp32"}
        consts = {"DIV": div, "MODE": mode, "K": k_stats, "BF16_BY_BITS": False, "BLOCK_V": 4096}
        sig.update({k: "constexpr" for k in consts})
        names = list(sig)
        src = ASTSource(fn=K.kd_vp_rows_kernel, signature=sig,
                        constexprs={(names.index(k),): v for k, v in consts.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        assert "ptx" in k.asm
        done.append([div, mode])
print(json.dumps({"compiled": done}))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_vp_kernel_compiles_for_sm90():
    """The interpreter accepts what the compiler may not: every divergence and mode of kd_vp_rows_kernel
    compiles for sm_90 (no GPU needed)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", _COMPILE_VP_SM90],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    assert len(res["compiled"]) == 9 * 3 - 3


@needs_cpu
def test_cpu_rows_bad_arguments():
    """Typed errors naming the argument, not a crash in the kernel."""
    impl = vp.resolve("cpu", "cpu")
    s, t, w = _inputs(n=5)
    v = s.shape[1]
    spec = _spec("jsd")
    stats = vp.combine_row_stats(impl.row_stats(s, t, spec)[None], spec)
    with pytest.raises(ValueError, match="one shape"):
        impl.row_stats(s, t[:, :30].contiguous(), spec)
    with pytest.raises(ValueError, match="stats"):
        impl.row_sums(s, t, stats[:, :4], spec)
    with pytest.raises(ValueError, match="row_weight"):
        impl.loss_grad_given_stats(s, t, stats, w.double(), spec, torch.empty_like(s))
    with pytest.raises(TypeError, match="grad"):
        impl.loss_grad_given_stats(s, t, stats, w, spec, torch.empty_like(s).bfloat16())
    with pytest.raises(TypeError, match="student_logits"):
        impl.row_stats(s.double(), t.double(), spec)
    with pytest.raises(ValueError, match="no row sums"):  # the kernel's own guard (forward_kl)
        _ext._C.cpu_vp_rows(
            1,
            s.data_ptr(),
            t.data_ptr(),
            stats.data_ptr(),
            s.data_ptr(),
            0,
            0,
            5,
            v,
            v,
            v,
            v,
            0,
            0,
            0,
            0.0,
            0.0,
            1.0,
            1,
        )


def test_resolve_by_device():
    """A named backend that cannot run on the tensors' device says why; "auto" on a GPU prefers triton."""
    with pytest.raises(BackendUnavailableError, match="cpu"):
        vp.resolve("cpu", torch.device("cuda"))
    want = "triton" if "triton" in available_backends("cuda") else "torch"
    assert vp.resolve("auto", torch.device("cuda")).name == want


def _torch_paths(div):
    """{path: (per-row loss, gradient)} of the three torch paths of ``div``: the dense torch backend,
    the sparse torch path (bucket tail, K = 8) and the vocabulary-parallel torch passes."""
    import kd_kernels
    from kd_kernels._sparse_impl import Tail, torch_sparse_loss_grad

    g = torch.Generator().manual_seed(3)
    s, t = (torch.randn(3, sum(SPLIT), generator=g) * 2 for _ in "st")
    w = torch.ones(3)
    spec = _spec(div)
    S = s.clone().requires_grad_()
    dense = kd_kernels.kd_loss(
        S, t, divergence=div, reduction="none", backend="torch", **COEF.get(div, {})
    )
    dense.sum().backward()
    lp, ids = t.log_softmax(-1).topk(8)
    sparse_grad = torch.empty_like(s)
    sparse = torch_sparse_loss_grad(s, ids, lp, w, spec, Tail.BUCKET, sparse_grad)
    vp_loss, vp_grad, _ = _sharded(vp.TorchVocabParallel(), s, t, spec, w, SPLIT)
    return {
        "dense": (dense.detach(), S.grad),
        "sparse": (sparse, sparse_grad),
        "vocab_parallel": (vp_loss, vp_grad),
    }


@pytest.mark.parametrize("div", DIVERGENCES)
def test_every_torch_path_uses_the_shared_definition(div, monkeypatch):
    """One torch definition of each divergence (kd_kernels/_torch_terms.py): changing it changes the
    dense, the sparse and the vocabulary-parallel torch paths alike (the shard passes re-derived
    forward / reverse KL, skew, JSD and Rényi before). The change: the entry's (L, a, A) doubled, or,
    for Rényi, whose shard passes use its pieces, the mixed logits formed with α / 2."""
    from kd_kernels import _torch_terms as terms

    before = _torch_paths(div)
    if div == "renyi":
        mixed = terms.renyi_mixed
        monkeypatch.setattr(terms, "renyi_mixed", lambda lq, lp, a: mixed(lq, lp, a / 2))
    else:
        entry = terms.TERMS[Divergence[div.upper()]]

        def doubled(*args, **kwargs):
            return tuple(None if x is None else 2 * x for x in entry(*args, **kwargs))

        monkeypatch.setitem(terms.TERMS, Divergence[div.upper()], doubled)
    after = _torch_paths(div)
    for path, (loss, grad) in before.items():
        new_loss, new_grad = after[path]
        assert torch.isfinite(loss).all() and torch.isfinite(new_loss).all(), path
        assert not torch.allclose(new_loss, loss, rtol=1e-3, atol=0), (path, "loss")
        assert not torch.allclose(new_grad, grad, rtol=1e-3, atol=0), (path, "gradient")
