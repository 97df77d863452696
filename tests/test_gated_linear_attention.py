"""Causal gated linear attention: chunked == recurrent == float64 quadratic reference."""

import pytest
import torch
from helpers import log_decay, max_err, randn

from lina_pl import ops
from lina_pl.ops.causal_linear_attention import reference as causal_reference
from lina_pl.ops.gated_linear_attention import reference
from lina_pl.ops.softmax_attention import reference as softmax_reference


def _inputs(b, t, h, dk, dv, strength=1.0):
    return (
        randn(b, t, h, dk),
        randn(b, t, h, dk),
        randn(b, t, h, dv),
        log_decay(b, t, h, dk, strength=strength),
    )


@pytest.mark.parametrize("t", [1, 2, 15, 16, 17, 63, 64, 65, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_recurrent_naive_agree(t, with_state):
    b, h, dk, dv = 2, 3, 8, 5
    q, k, v, g = _inputs(b, t, h, dk, dv)
    h0 = randn(b, h, dk, dv) if with_state else None
    ref_o, ref_s = reference.gated_linear_attention(q, k, v, g, initial_state=h0)
    for fn in (ops.chunk_gated_linear_attention, ops.recurrent_gated_linear_attention):
        o, s = fn(q, k, v, g, initial_state=h0)
        assert o.shape == (b, t, h, dv) and s.shape == (b, h, dk, dv)
        assert max_err(o, ref_o) < 1e-10, fn.__name__
        assert max_err(s, ref_s) < 1e-10, fn.__name__


@pytest.mark.parametrize(
    "chunk_size,sub_chunk_size", [(4, 2), (8, 8), (16, 4), (32, 16), (64, 16), (128, 32)]
)
def test_chunk_sizes_and_strong_decay(chunk_size, sub_chunk_size):
    """Strong decays (exp(b) far below fp32 range within a chunk) must not overflow or lose accuracy."""
    q, k, v, g = _inputs(2, 77, 2, 8, 4, strength=40.0)
    o, s = ops.chunk_gated_linear_attention(q, k, v, g, chunk_size=chunk_size, sub_chunk_size=sub_chunk_size)
    ref_o, ref_s = reference.gated_linear_attention(q, k, v, g)
    assert torch.isfinite(o).all()
    assert max_err(o, ref_o) < 1e-10 and max_err(s, ref_s) < 1e-10


def test_fp32_strong_decay_stays_finite():
    q, k, v, g = (x.float() for x in _inputs(1, 200, 2, 16, 16, strength=200.0))
    o, s = ops.chunk_gated_linear_attention(q, k, v, g)
    ref_o, _ = reference.gated_linear_attention(q, k, v, g)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert max_err(o, ref_o) < 1e-4


def test_continuation_equals_one_call():
    """Prefill + state + continuation (in pieces of odd sizes) equals one call: the decoding contract."""
    q, k, v, g = _inputs(2, 50, 2, 8, 6)
    full, full_state = ops.gated_linear_attention(q, k, v, g, output_final_state=True, backend="torch")
    pieces, state, start = [], None, 0
    for size in (7, 1, 1, 13, 1, 27):
        sl = slice(start, start + size)
        o, state = ops.gated_linear_attention(
            q[:, sl],
            k[:, sl],
            v[:, sl],
            g[:, sl],
            initial_state=state,
            output_final_state=True,
            backend="torch",
        )
        pieces.append(o)
        start += size
    assert max_err(torch.cat(pieces, 1), full) < 1e-10
    assert max_err(state, full_state) < 1e-10


@pytest.mark.parametrize("fn", [ops.chunk_gated_linear_attention, ops.recurrent_gated_linear_attention])
def test_gradcheck(fn):
    b, t, h, dk, dv = 1, 9, 2, 3, 2
    q, k, v = (
        randn(b, t, h, dk, requires_grad=True),
        randn(b, t, h, dk, requires_grad=True),
        randn(b, t, h, dv, requires_grad=True),
    )
    g = log_decay(b, t, h, dk).requires_grad_()
    h0 = randn(b, h, dk, dv, requires_grad=True)
    kwargs = {"chunk_size": 4, "sub_chunk_size": 2} if fn is ops.chunk_gated_linear_attention else {}

    def run(q, k, v, g, h0):
        o, s = fn(q, k, v, g, initial_state=h0, **kwargs)
        return o, s

    assert torch.autograd.gradcheck(run, (q, k, v, g, h0))


def test_default_scale_and_explicit_scale():
    q, k, v, g = _inputs(1, 10, 1, 16, 4)
    o_default, _ = ops.gated_linear_attention(q, k, v, g, backend="torch")
    o_scaled, _ = ops.gated_linear_attention(q * 0.25, k, v, g, scale=1.0, backend="torch")
    assert max_err(o_default, o_scaled) < 1e-12  # 16 ** -0.5 == 0.25


def test_final_state_only_when_asked():
    q, k, v, g = _inputs(1, 5, 1, 4, 4)
    _, state = ops.gated_linear_attention(q, k, v, g, backend="torch")
    assert state is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_long_sequence(dtype):
    """16k tokens in half precision: fp32 state, output close to fp64 on the same inputs."""
    b, t, h, dk, dv = 1, 16384, 2, 16, 16
    q, k, v = (torch.randn(b, t, h, d).to(dtype) for d in (dk, dk, dv))
    g = (torch.nn.functional.logsigmoid(torch.randn(b, t, h, dk) + 4.0)).float()
    o, s = ops.gated_linear_attention(q, k, v, g, output_final_state=True, backend="torch")
    ref, ref_s = ops.chunk_gated_linear_attention(q.double(), k.double(), v.double(), g.double())
    assert o.dtype == dtype and s.dtype == torch.float32
    assert torch.isfinite(o).all()
    assert max_err(o, ref) / ref.abs().max().item() < 2e-2
    assert max_err(s, ref_s) / ref_s.abs().max().item() < 1e-3


def test_bad_arguments_raise():
    q, k, v, g = _inputs(1, 4, 2, 4, 4)
    with pytest.raises(ValueError, match="log_decay"):
        ops.gated_linear_attention(q, k, v, g[..., :2])
    with pytest.raises(ValueError, match="initial_state"):
        ops.gated_linear_attention(q, k, v, g, initial_state=torch.zeros(1, 2, 4, 3))
    with pytest.raises(ValueError, match="backend"):
        ops.gated_linear_attention(q, k, v, g, backend="triton")
    with pytest.raises(RuntimeError, match="CUDA"):
        ops.gated_linear_attention(q, k, v, g, backend="fla")
    with pytest.raises(ValueError, match="multiple"):
        ops.chunk_gated_linear_attention(q, k, v, g, chunk_size=24, sub_chunk_size=16)


def test_auto_backend_on_cpu_is_torch():
    q, k, v, g = _inputs(1, 20, 1, 4, 4)
    o_auto, _ = ops.gated_linear_attention(q, k, v, g)
    o_torch, _ = ops.gated_linear_attention(q, k, v, g, backend="torch")
    assert torch.equal(o_auto, o_torch)


def test_causal_linear_attention_matches_explicit():
    """Normalised causal linear attention (numerator-only RoPE) against explicit causal weights."""
    b, t, h, d = 2, 23, 2, 6
    fq, fk = ops.elu_feature_map(randn(b, t, h, d)), ops.elu_feature_map(randn(b, t, h, d))
    qr, kr, v = randn(b, t, h, d), randn(b, t, h, d), randn(b, t, h, 5)
    out, _ = ops.causal_linear_attention(fq, fk, v, q_rotated=qr, k_rotated=kr)
    ref = causal_reference.causal_linear_attention(fq, fk, v, q_rotated=qr, k_rotated=kr)
    assert max_err(out, ref) < 1e-10
    plain, _ = ops.causal_linear_attention(fq, fk, v)
    assert max_err(plain, causal_reference.causal_linear_attention(fq, fk, v)) < 1e-10


def test_softmax_attention_matches_explicit_including_cache_offsets():
    q, k, v = randn(2, 9, 3, 8), randn(2, 9, 3, 8), randn(2, 9, 3, 8)
    for causal in (False, True):
        assert (
            max_err(
                ops.softmax_attention(q, k, v, causal=causal),
                softmax_reference.softmax_attention(q, k, v, causal=causal),
            )
            < 1e-12
        )
    # fewer queries than keys: the queries are the last ones (decoding with a KV cache)
    for nq in (1, 4):
        out = ops.softmax_attention(q[:, -nq:], k, v, causal=True)
        assert max_err(out, softmax_reference.softmax_attention(q, k, v, causal=True)[:, -nq:]) < 1e-12
