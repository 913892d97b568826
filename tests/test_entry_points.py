"""One objective per divergence name, whatever the entry point (issue #26 item 2, #27), and one
check of ``ce_weight`` for every entry point that takes it (issue #26).

Every public entry point that takes ``divergence`` defaults it to the library-wide
``kd_kernels._spec.DEFAULT_DIVERGENCE`` (forward_kl) and takes ``alpha`` / ``beta`` as None,
resolved from the divergence table: called with only ``divergence=d`` (or with nothing) each gives
the loss ``kd_loss`` gives on the same logits.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.distributed as dist

import kd_kernels
import kd_kernels.parallel as P
from kd_kernels._spec import DEFAULT_DIVERGENCE, DIVERGENCES, Divergence

LABELS = tuple(d.label for d in Divergence)
N, V, D_S, D_T = 6, 37, 8, 5


def _inputs():
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(N, D_S, generator=g)
    ws = torch.randn(V, D_S, generator=g)
    ht = torch.randn(N, D_T, generator=g)
    wt = torch.randn(V, D_T, generator=g)
    return hs, ws, ht, wt


@pytest.fixture
def group(tmp_path):
    """A process group of one, in this process (the vocabulary-parallel calls need one)."""
    assert not dist.is_initialized()
    path = tmp_path / "pg_store"
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    try:
        yield dist.new_group([0])
    finally:
        dist.destroy_process_group()


def _sparse_teacher(t: torch.Tensor):
    """Every vocabulary entry as the teacher's top-K: the sparse forms then see the dense one."""
    ids = torch.arange(V).expand(t.shape[0], V).contiguous()
    return ids, torch.log_softmax(t.float(), -1)


def _logit_entry_points(group):
    """{name: fn(**options) -> (loss, student logits, teacher logits)} on one set of inputs."""
    hs, ws, ht, wt = _inputs()
    s, t = hs @ ws.T, ht @ wt.T
    ids, lp = _sparse_teacher(t)
    sparse = {"tail": "renormalize"}  # K = V: renormalizing over every entry is the dense teacher
    return {
        "kd_loss": lambda **kw: kd_kernels.kd_loss(s, t, **kw),
        "KDLoss": lambda **kw: kd_kernels.KDLoss(**kw)(s, t),
        "fused_linear_kd": lambda **kw: kd_kernels.fused_linear_kd(hs, ws, ht, wt, **kw),
        "FusedLinearKDLoss": lambda **kw: kd_kernels.FusedLinearKDLoss(**kw)(hs, ws, ht, wt),
        "sparse_kd": lambda **kw: kd_kernels.sparse_kd(s, ids, lp, **sparse, **kw),
        "fused_linear_sparse_kd": lambda **kw: kd_kernels.fused_linear_sparse_kd(
            hs, ws, ids, lp, **sparse, **kw
        ),
        "SparseKDLoss": lambda **kw: kd_kernels.SparseKDLoss(**sparse, **kw)(s, ids, lp),
        "parallel.kd_loss": lambda **kw: P.kd_loss(s, t, group=group, **kw),
        "parallel.fused_linear_kd": lambda **kw: P.fused_linear_kd(
            hs, ws, ht, wt, group=group, **kw
        ),
    }, (s, t)


def _check_entry_point(fn, s, t, mask=None) -> list[str]:
    """The failures of ``fn`` against kd_loss: with every divergence alone, then with none."""
    bad = []
    for d in LABELS + (None,):
        options = {} if d is None else {"divergence": d}
        want = kd_kernels.kd_loss(s, t, divergence=d or "forward_kl", mask=mask, backend="torch")
        got = fn(**options)
        if not torch.allclose(got.detach().float(), want, rtol=2e-5, atol=1e-6):
            bad.append(f"{d or 'no divergence'}: {got.item()} != kd_loss's {want.item()}")
    return bad


ENTRY_POINTS = (
    "kd_loss",
    "KDLoss",
    "fused_linear_kd",
    "FusedLinearKDLoss",
    "sparse_kd",
    "fused_linear_sparse_kd",
    "SparseKDLoss",
    "parallel.kd_loss",
    "parallel.fused_linear_kd",
)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_objective_equals_kd_loss(name, group):
    fns, (s, t) = _logit_entry_points(group)
    assert set(fns) == set(ENTRY_POINTS)
    bad = _check_entry_point(fns[name], s, t)
    assert not bad, f"{name}: " + "; ".join(bad)


def _public_callables():
    """Every public function or class (``__init__``) of kd_kernels, kd_kernels.parallel and
    kd_kernels.hf that takes ``divergence``, ``alpha`` or ``beta``."""
    import kd_kernels.hf as hf

    out = {}
    for module, prefix in ((kd_kernels, ""), (P, "parallel."), (hf, "hf.")):
        for attr in getattr(module, "__all__", None) or dir(module):
            obj = getattr(module, attr)
            if attr.startswith("_") or not callable(obj):
                continue
            if getattr(obj, "__module__", "").split(".")[0] != "kd_kernels":
                continue
            try:
                params = inspect.signature(obj).parameters
            except (TypeError, ValueError):
                continue
            if {"divergence", "alpha", "beta"} & set(params):
                out[prefix + attr] = params
    return out


def test_signatures_share_one_default():
    found = _public_callables()
    for name in ENTRY_POINTS + ("hf.distill_loss", "hf.KDTrainer", "skew_forward_kl", "renyi"):
        assert name in found, f"{name} has no divergence / alpha / beta parameter"
    assert DEFAULT_DIVERGENCE == "forward_kl"
    bad = []
    for name, params in sorted(found.items()):
        if "divergence" in params and params["divergence"].default != DEFAULT_DIVERGENCE:
            bad.append(f"{name}: divergence={params['divergence'].default!r}")
        for key in ("alpha", "beta"):  # None, or required (TRL's own beta in hf.trl_*)
            if key in params and params[key].default not in (None, inspect.Parameter.empty):
                bad.append(f"{name}: {key}={params[key].default!r}")
    assert not bad, "defaults not resolved by the spec: " + ", ".join(bad)


def test_named_functions_use_the_spec_defaults():
    """``skew_forward_kl(s, t)`` etc. (logits and fused-linear forms) without alpha / beta are
    ``kd_loss(s, t, divergence=...)``."""
    hs, ws, ht, wt = _inputs()
    s, t = hs @ ws.T, ht @ wt.T
    for d in LABELS:
        want = kd_kernels.kd_loss(s, t, divergence=d)
        for got in (
            getattr(kd_kernels, d)(s, t),
            getattr(kd_kernels, f"fused_linear_{d}")(hs, ws, ht, wt),
        ):
            torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6, msg=d)
    # the spec's defaults are what the docs promise
    assert {
        d.label: {p.keyword: p.default for p in info.params}
        for d, info in DIVERGENCES.items()
        if info.params
    } == {
        "skew_forward_kl": {"alpha": 0.1},
        "skew_reverse_kl": {"alpha": 0.1},
        "jsd": {"beta": 0.5},
        "alpha_beta": {"alpha": 0.5, "beta": 0.5},
        "renyi": {"alpha": 0.5},
    }


@pytest.fixture(scope="module")
def hf_models():
    transformers = pytest.importorskip("transformers")

    def make(seed):
        cfg = transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
            initializer_range=0.2,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")

    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(4))
    return make(0).float(), make(1).float().eval(), ids


def _hf_logits(student, teacher, ids):
    with torch.no_grad():
        s = student(input_ids=ids).logits[:, :-1]
        t = teacher(input_ids=ids).logits[:, :-1]
    return s, t


def test_hf_distill_loss_objective_equals_kd_loss(hf_models):
    from kd_kernels import hf

    student, teacher, ids = hf_models
    s, t = _hf_logits(student, teacher, ids)
    bad = _check_entry_point(
        lambda **kw: hf.distill_loss(student, teacher, input_ids=ids, **kw), s, t
    )
    assert not bad, "hf.distill_loss: " + "; ".join(bad)


def test_hf_kd_trainer_objective_equals_kd_loss(hf_models, tmp_path):
    import transformers

    from kd_kernels import hf

    student, teacher, ids = hf_models
    s, t = _hf_logits(student, teacher, ids)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no"
    )

    def loss(**kw):
        trainer = hf.KDTrainer(student, teacher, args=args, **kw)
        student.eval()  # compute_loss outside train(): no gradient-accumulation bookkeeping
        return trainer.compute_loss(student, {"input_ids": ids})

    bad = _check_entry_point(loss, s, t)
    assert not bad, "hf.KDTrainer: " + "; ".join(bad)


BAD_CE_WEIGHTS = (1e39, math.inf, -math.inf, math.nan, -0.5, True, "1")


def _check_ce_weight_errors(fn) -> list[str]:
    """The failures of ``fn(ce_weight)`` to raise the shared check's error for each bad weight."""
    bad = []
    for x in BAD_CE_WEIGHTS:
        if isinstance(x, (bool, str)):
            exc, words = TypeError, f"ce_weight must be a float >= 0, got {type(x).__name__}"
        else:
            words = f"ce_weight={x} must be a finite number >= 0 that fits in float32"
            exc = ValueError
        try:
            fn(x)
        except exc as e:
            if words not in str(e):
                bad.append(f"{x!r}: {type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001
            bad.append(f"{x!r}: {type(e).__name__}: {e}")
        else:
            bad.append(f"{x!r}: accepted")
    return bad


def test_ce_weight_checked_alike(group):
    """fused_linear_kd, its module, the sparse and vocabulary-parallel forms reject the same
    ce_weights with the same message (1e39 is finite in float64 but inf in the fp32 loss)."""
    hs, ws, ht, wt = _inputs()
    ids, lp = _sparse_teacher(ht @ wt.T)
    labels = torch.arange(N) % V
    calls = {
        "fused_linear_kd": lambda x: kd_kernels.fused_linear_kd(
            hs, ws, ht, wt, labels=labels, ce_weight=x
        ),
        "FusedLinearKDLoss": lambda x: kd_kernels.FusedLinearKDLoss(ce_weight=x),
        "fused_linear_sparse_kd": lambda x: kd_kernels.fused_linear_sparse_kd(
            hs, ws, ids, lp, labels=labels, ce_weight=x
        ),
        "parallel.fused_linear_kd": lambda x: P.fused_linear_kd(
            hs, ws, ht, wt, group=group, labels=labels, ce_weight=x
        ),
    }
    bad = {name: _check_ce_weight_errors(fn) for name, fn in calls.items()}
    assert not any(bad.values()), bad


def test_hf_ce_weight_checked_alike(hf_models, tmp_path):
    import transformers

    from kd_kernels import hf

    student, teacher, ids = hf_models
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no"
    )
    calls = {
        "hf.distill_loss": lambda x: hf.distill_loss(
            student, teacher, input_ids=ids, labels=ids, ce_weight=x
        ),
        "hf.KDTrainer": lambda x: hf.KDTrainer(student, teacher, args=args, ce_weight=x),
    }
    bad = {name: _check_ce_weight_errors(fn) for name, fn in calls.items()}
    assert not any(bad.values()), bad
