"""GPU only: fla's Triton kernels against the pure-PyTorch reference path (forward, backward, decoding).

Tolerance as in fla's own GLA tests: max-abs ≤ 1e-6, else relative RMS error below a ratio. Half
precision only: fla 0.6.0's chunk_gla crashed with "misaligned address" on fp32 inputs (H100, triton
3.6), which is why ``backend="auto"`` keeps fp32 on the torch path.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import max_err, rel_rms

from lina_pl import ops
from lina_pl.nn import LasadAttention
from lina_pl.ops.linear_attention import reference

pytestmark = pytest.mark.gpu
RATIO = {torch.bfloat16: 0.02}


def _close(a, b, dtype):
    return max_err(a, b) <= 1e-6 or rel_rms(a, b) < RATIO[dtype]


def _hgrn2_inputs(b, t, h, dk, dv, dtype, sad):
    """HGRN2-style inputs: q = SiLU, log-decay = logsigmoid with a lower bound, k = 1 − λ."""
    dev = "cuda"
    q = F.silu(torch.randn(b, t, h, dk, device=dev)).to(dtype)
    g = ops.lower_bounded_log_sigmoid(
        torch.randn(b, t, h, dk, device=dev), torch.full((dk,), 0.3, device=dev)
    )
    k = (1 - g.exp()).to(dtype)
    v = torch.randn(b, t, h, dv, device=dev).to(dtype)
    if sad:
        g = ops.spatial_aware_log_decay(g, 16)
    h0 = torch.randn(b, h, dk, dv, device=dev)
    return [x.requires_grad_() for x in (q, k, v, g, h0)]


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("t", [1, 17, 64, 256, 576])
@pytest.mark.parametrize("sad", [False, True])
def test_gla_kernel_matches_torch_forward_and_backward(dtype, t, sad):
    inputs = _hgrn2_inputs(2, t, 4, 64, 64, dtype, sad)
    results = {}
    for backend in ("fla", "torch"):
        for x in inputs:
            x.grad = None
        q, k, v, g, h0 = inputs
        o, ht = ops.gated_linear_attention(
            q, k, v, g, initial_state=h0, output_final_state=True, backend=backend
        )
        (o.float().square().sum() + ht.square().sum()).backward()
        results[backend] = [o.detach(), ht.detach()] + [x.grad.detach().clone() for x in inputs]
    names = ["o", "ht", "dq", "dk", "dv", "dg", "dh0"]
    for name, a, b in zip(names, results["fla"], results["torch"], strict=True):
        assert _close(a, b, dtype), f"{name}: rel_rms={rel_rms(a, b):.2e} max={max_err(a, b):.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_prefill_then_recurrent_decode_matches_one_call(dtype):
    q, k, v, g, _ = (x.detach() for x in _hgrn2_inputs(2, 80, 4, 64, 64, dtype, sad=True))
    full, _ = ops.gated_linear_attention(q, k, v, g, backend="fla")
    out, state = ops.gated_linear_attention(
        q[:, :33], k[:, :33], v[:, :33], g[:, :33], output_final_state=True, backend="fla"
    )
    pieces = [out]
    for i in range(33, 80):  # one token at a time: fused_recurrent_gla
        o, state = ops.gated_linear_attention(
            q[:, i : i + 1],
            k[:, i : i + 1],
            v[:, i : i + 1],
            g[:, i : i + 1],
            initial_state=state,
            output_final_state=True,
            backend="fla",
        )
        pieces.append(o)
    assert _close(torch.cat(pieces, 1), full, dtype)


def test_lasad_module_fla_equals_torch():
    module = LasadAttention(256, expand_ratio=64).cuda().to(torch.bfloat16)
    x = torch.randn(2, 1 + 16 * 16, 256, device="cuda", dtype=torch.bfloat16)
    module.backend = "fla"
    a = module(x, grid_hw=(16, 16))
    module.backend = "torch"
    b = module(x, grid_hw=(16, 16))
    assert rel_rms(a, b) < 0.02


def test_lina_attention_bf16_16k_tokens_on_gpu():
    q, k, v = (torch.randn(2, 16384, 16, 96, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = ops.linear_attention(q, k, v)
    ref = ops.linear_attention(q.double(), k.double(), v.double())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert max_err(out, ref) / ref.abs().max().item() < 2e-2


def test_division_backward_on_gpu_matches_float64_autograd():
    args = [
        torch.randn(2, 33, 3, 8, device="cuda", dtype=torch.float64, requires_grad=True) for _ in range(3)
    ]
    gate = (torch.rand(1, 33, 3, 1, device="cuda", dtype=torch.float64) + 0.5).requires_grad_()
    grads = []
    for fn in (ops.linear_attention, reference.linear_attention):
        out = fn(*args, key_gate=gate, value_gate=gate)
        grads.append(torch.autograd.grad(out.square().sum(), [*args, gate]))
    for a, b in zip(*grads, strict=True):
        assert max_err(a, b) < 1e-9
