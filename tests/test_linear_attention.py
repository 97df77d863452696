"""Bidirectional linear attention (LINA division, InLine subtraction) against float64 explicit weights."""

import importlib

import pytest
import torch
from helpers import max_err, randn

from lina_pl import ops
from lina_pl.ops.linear_attention import reference, torch_impl

SHAPES = [(1, 1, 1, 4), (2, 37, 3, 8), (3, 50, 2, 5), (1, 129, 4, 16)]
GATES = ["none", "key", "value", "both"]


def _gates(kind, b, n, h, per_batch=False):
    shape = (b if per_batch else 1, n, h, 1)
    key = torch.rand(shape, dtype=torch.float64) + 0.25 if kind in ("key", "both") else None
    value = torch.randn(shape, dtype=torch.float64) if kind in ("value", "both") else None
    return key, value


@pytest.mark.parametrize("normalization", ["division", "subtraction"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_explicit_weights(normalization, gate, shape):
    b, n, h, d = shape
    q, k, v = randn(*shape), randn(*shape), randn(b, n, h, d + 3)
    key_gate, value_gate = _gates(gate, b, n, h, per_batch=(n % 2 == 1))
    out = ops.linear_attention(q, k, v, normalization=normalization, key_gate=key_gate, value_gate=value_gate)
    ref = reference.linear_attention(
        q, k, v, normalization=normalization, key_gate=key_gate, value_gate=value_gate
    )
    assert out.shape == (b, n, h, d + 3)
    assert max_err(out, ref) < 1e-10


def test_cross_attention_lengths():
    """Queries and keys may differ in length (the op is a read-out of a key/value summary)."""
    q, k, v = randn(2, 7, 2, 4), randn(2, 19, 2, 4), randn(2, 19, 2, 6)
    for norm in ("division", "subtraction"):
        assert (
            max_err(
                ops.linear_attention(q, k, v, normalization=norm),
                reference.linear_attention(q, k, v, normalization=norm),
            )
            < 1e-10
        )


def test_division_weights_are_a_convex_combination():
    q, k = randn(2, 40, 3, 8), randn(2, 40, 3, 8)
    gate = torch.rand(1, 40, 3, 1, dtype=torch.float64) + 0.1
    w = reference.linear_attention_weights(q, k, normalization="division", key_gate=gate)
    assert (w >= 0).all()
    # rows sum to one up to the N·eps regulariser in the denominator
    assert (w.sum(-1) - 1).abs().max() < 1e-4


def test_subtraction_weights_sum_to_one_and_can_be_negative():
    q, k = randn(2, 40, 3, 8) * 3, randn(2, 40, 3, 8) * 3
    w = reference.linear_attention_weights(q, k, normalization="subtraction")
    assert (w.sum(-1) - 1).abs().max() < 1e-12
    assert (w < 0).any()


@pytest.mark.parametrize("normalization", ["division", "subtraction"])
def test_constant_values_pass_through(normalization):
    """Weights that sum to one reproduce a constant value vector."""
    q, k = randn(2, 33, 2, 8), randn(2, 33, 2, 8)
    v = torch.full((2, 33, 2, 5), 3.5, dtype=torch.float64)
    out = ops.linear_attention(q, k, v, normalization=normalization)
    tol = 1e-10 if normalization == "subtraction" else 1e-3
    assert max_err(out, v) < tol


@pytest.mark.parametrize("normalization", ["division", "subtraction"])
def test_gradcheck_with_gates(normalization):
    b, n, h, d = 2, 6, 2, 3
    q = randn(b, n, h, d, requires_grad=True)
    k = randn(b, n, h, d, requires_grad=True)
    v = randn(b, n, h, d, requires_grad=True)
    gk = (torch.rand(1, n, h, 1, dtype=torch.float64) + 0.5).requires_grad_()
    gv = randn(1, n, h, 1, requires_grad=True)

    def fn(q, k, v, gk, gv):
        return ops.linear_attention(q, k, v, normalization=normalization, key_gate=gk, value_gate=gv)

    assert torch.autograd.gradcheck(fn, (q, k, v, gk, gv))


@pytest.mark.parametrize("block", [1, 5, 16])
@pytest.mark.parametrize("gate_shape", [(1, 23, 2, 1), (2, 23, 1, 1), (1, 1, 2, 1)])
def test_blocked_division_kernel_forward_and_backward(monkeypatch, block, gate_shape):
    """The division kernel walks the sequence in blocks; every block split must give the same values and
    gradients as explicit weights (gates per position, per batch, or broadcast over positions)."""
    monkeypatch.setattr(torch_impl, "TOKEN_BLOCK", block)
    q, k = randn(2, 19, 2, 4, requires_grad=True), randn(2, 23, 2, 4, requires_grad=True)
    v = randn(2, 23, 2, 3, requires_grad=True)
    gk = (torch.rand(gate_shape, dtype=torch.float64) + 0.5).requires_grad_()
    gv = randn(*gate_shape, requires_grad=True)
    grads = []
    for fn in (ops.linear_attention, reference.linear_attention):
        out = fn(q, k, v, key_gate=gk, value_gate=gv)
        weight = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        grads.append((out, *torch.autograd.grad((out * weight).sum(), [q, k, v, gk, gv])))
    for a, b in zip(*grads, strict=True):
        assert max_err(a, b) < 1e-10


def test_blocked_division_kernel_gradcheck(monkeypatch):
    monkeypatch.setattr(torch_impl, "TOKEN_BLOCK", 3)
    q, k, v = (randn(1, 8, 2, 3, requires_grad=True) for _ in range(3))
    gk = (torch.rand(1, 8, 2, 1, dtype=torch.float64) + 0.5).requires_grad_()
    gv = randn(1, 1, 2, 1, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *xs: ops.linear_attention(*xs[:3], key_gate=xs[3], value_gate=xs[4]), (q, k, v, gk, gv)
    )


@pytest.mark.parametrize("normalization", ["division", "subtraction"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_16k_tokens_is_finite_and_close(normalization, dtype):
    """16k tokens in bf16/fp16: the fp32 state keeps the result finite and close to fp64."""
    b, n, h, d = 1, 16384, 2, 32
    q, k, v = (torch.randn(b, n, h, d).to(dtype) for _ in range(3))
    gate = (torch.rand(1, n, h, 1) + 0.5).to(dtype)
    out = ops.linear_attention(q, k, v, normalization=normalization, key_gate=gate, value_gate=gate)
    ref = ops.linear_attention(
        q.double(),
        k.double(),
        v.double(),
        normalization=normalization,
        key_gate=gate.double(),
        value_gate=gate.double(),
    )
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    scale = ref.abs().max().item()
    assert max_err(out, ref) / scale < 2e-2


def test_half_precision_output_keeps_input_dtype_and_fp32_accumulates():
    """Summing 16k positive fp16 terms would overflow fp16 (max 65504); the fp32 state does not."""
    n = 16384
    q = torch.full((1, n, 1, 4), 4.0, dtype=torch.float16)
    k = torch.full((1, n, 1, 4), 4.0, dtype=torch.float16)
    v = torch.full((1, n, 1, 4), 8.0, dtype=torch.float16)
    out = ops.linear_attention(q, k, v)
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), torch.full_like(out.float(), 8.0), atol=1e-2)


def test_bad_shapes_and_options_raise():
    q = randn(2, 5, 2, 4)
    with pytest.raises(ValueError, match="batch, seq, heads, head_dim"):
        ops.linear_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="normalization"):
        ops.linear_attention(q, q, q, normalization="softmax")
    with pytest.raises(ValueError, match="broadcast"):
        ops.linear_attention(q, q, q, key_gate=torch.ones(1, 4, 2, 1))
    with pytest.raises(ValueError, match="head dims"):
        ops.linear_attention(q, randn(2, 5, 2, 3), q)


@pytest.mark.parametrize("normalization", ["division", "subtraction"])
def test_auto_backend_on_cpu_is_torch(normalization):
    q, k, v = randn(2, 9, 2, 4), randn(2, 9, 2, 4), randn(2, 9, 2, 3)
    gate = torch.rand(1, 9, 2, 1, dtype=torch.float64) + 0.5
    kwargs = dict(normalization=normalization, key_gate=gate, value_gate=gate)
    auto = ops.linear_attention(q, k, v, **kwargs)
    assert torch.equal(auto, ops.linear_attention(q, k, v, backend="torch", **kwargs))
    assert torch.equal(auto, ops.linear_attention(q, k, v, backend="auto", **kwargs))


def test_unknown_backend_names_the_choices():
    q = randn(1, 4, 1, 2)
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'torch', got 'fla'"):
        ops.linear_attention(q, q, q, backend="fla")


def test_unavailable_backend_is_refused_and_skipped_by_auto(monkeypatch):
    """A kernel that cannot run on these inputs (a CUDA-only Triton kernel on CPU) is a ValueError when
    asked for by name, and "auto" passes over it even when it comes first in the table."""
    module = importlib.import_module("lina_pl.ops.linear_attention")  # ops.linear_attention is the function

    def never(*args, **kwargs):
        raise AssertionError("an unavailable kernel ran")

    kernels = {"triton": module.Kernel(available=lambda q: q.is_cuda, run=never), **module.KERNELS}
    monkeypatch.setattr(module, "KERNELS", kernels)
    q = randn(1, 4, 1, 2)
    with pytest.raises(ValueError, match=r"'triton' is not available for cpu .*'auto', 'triton', 'torch'"):
        ops.linear_attention(q, q, q, backend="triton")
    assert torch.equal(ops.linear_attention(q, q, q), ops.linear_attention(q, q, q, backend="torch"))


def test_functional_facade_reexports_the_ops():
    """``lina_pl.nn.functional`` (the documented entry point) re-exports the objects of ``lina_pl.ops``."""
    from lina_pl.nn import functional as LF

    for name in [*LF.__all__, "Normalization", "Backend", "SadMode", "SadPosition"]:
        assert getattr(LF, name) is getattr(ops, name), name
    assert set(LF.__all__) <= set(ops.__all__)
