"""Token-mixer modules: exact references, decode == full call, options, dtypes."""

import pytest
import torch
import torch.nn.functional as F
from helpers import max_err, randn

from lina_pl.nn import (
    GlaAttention,
    LasadAttention,
    LinaAttention,
    LinearRopeAttention,
    SoftmaxAttention,
    TnlAttention,
    create_mixer,
    parameter_groups,
)
from lina_pl.nn.position import apply_rope, rope_2d
from lina_pl.ops.causal_linear_attention import reference as causal_reference
from lina_pl.ops.linear_attention import reference as linear_reference
from lina_pl.ops.softmax_attention import reference as softmax_reference

DIM, HEADS = 32, 4

CAUSAL_MIXERS = {
    "lasad_keep_row_last": lambda: LasadAttention(DIM, expand_ratio=8),
    "lasad_keep_second_last": lambda: LasadAttention(DIM, expand_ratio=8, sad_position="row_second_last"),
    "lasad_reset_row_first": lambda: LasadAttention(
        DIM, expand_ratio=8, sad_mode="reset", sad_position="row_first"
    ),
    "lasad_off": lambda: LasadAttention(DIM, expand_ratio=8, sad_mode="off"),
    "gla": lambda: GlaAttention(DIM, 2),
    "gla_sad": lambda: GlaAttention(DIM, 2, sad_mode="keep"),
    "tnl_lightning": lambda: TnlAttention(DIM, HEADS, layer_idx=1, num_layers=3),
    "tnl_alibi": lambda: TnlAttention(DIM, HEADS, layer_idx=2, num_layers=3, decay="alibi"),
    "linear_rope": lambda: LinearRopeAttention(DIM, HEADS),
    "softmax_rope": lambda: SoftmaxAttention(DIM, HEADS, causal=True, rope="2d"),
    "softmax_rope_identity_prefix": lambda: SoftmaxAttention(
        DIM, HEADS, causal=True, rope="2d", prefix_rope="identity"
    ),
}


@pytest.mark.parametrize("name", sorted(CAUSAL_MIXERS))
@pytest.mark.parametrize("n_cond,grid_hw", [(1, (3, 5)), (2, (4, 4)), (1, (5, 2))])
def test_decode_step_by_step_equals_full_call(name, n_cond, grid_hw):
    mixer = CAUSAL_MIXERS[name]().double().eval()
    n = n_cond + grid_hw[0] * grid_hw[1]
    x = randn(2, n, DIM)
    kwargs = {"lower_bound": torch.rand(mixer.key_dim) * 0.5} if isinstance(mixer, LasadAttention) else {}
    full = mixer(x, n_cond=n_cond, grid_hw=grid_hw, **kwargs)
    outs, state, pos = [], None, 0
    for size in [n_cond, 2] + [1] * (n - n_cond - 2):  # prefill the prefix, then 2 tokens, then one by one
        y, state = mixer.step(x[:, pos : pos + size], state, pos, n_cond=n_cond, grid_hw=grid_hw, **kwargs)
        outs.append(y)
        pos += size
    assert pos == n
    assert max_err(torch.cat(outs, dim=1), full) < 1e-10


def _lasad_algorithm_1(mixer: LasadAttention, x, width, lower_bound, sad_mode, sad_position):
    """LASAD Algorithm 1 token by token in float64, straight from the paper's pseudocode."""
    h, e = mixer.num_heads, mixer.key_dim // mixer.num_heads
    b, t, d = x.shape
    state = torch.zeros(b, h, e, d // h, dtype=torch.float64)
    residue = {"row_last": 0, "row_second_last": width - 1, "row_first": 1}[sad_position]
    outs = []
    for i in range(t):
        xi = x[:, i]
        q = F.silu(xi @ mixer.q_proj.weight.T).view(b, h, e)
        lam = torch.sigmoid(xi @ mixer.f_proj.weight.T)
        if lower_bound is not None:
            lam = lower_bound + (1 - lower_bound) * lam
        lam = lam.view(b, h, e)
        v = (xi @ mixer.i_proj.weight.T).view(b, h, d // h)
        key = 1 - lam  # from the unmasked lambda
        if sad_mode != "off" and i % width == residue:
            lam = torch.ones_like(lam) if sad_mode == "keep" else torch.zeros_like(lam)
        state = lam[..., None] * state + key[..., None] * v[:, :, None, :]
        o = torch.einsum("bhk,bhkv->bhv", q * e**-0.5, state).reshape(b, d)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + mixer.norm.eps) * mixer.norm.weight
        outs.append(o @ mixer.o_proj.weight.T)
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("sad_mode", ["keep", "off", "reset"])
@pytest.mark.parametrize("sad_position", ["row_last", "row_second_last", "row_first"])
def test_lasad_matches_algorithm_1(sad_mode, sad_position):
    mixer = LasadAttention(DIM, expand_ratio=8, sad_mode=sad_mode, sad_position=sad_position).double()
    torch.nn.init.normal_(mixer.norm.weight)
    x = randn(2, 1 + 3 * 5, DIM)
    beta = torch.rand(mixer.key_dim, dtype=torch.float64) * 0.8
    out = mixer(x, n_cond=1, grid_hw=(3, 5), lower_bound=beta)
    ref = _lasad_algorithm_1(mixer, x, 5, beta, sad_mode, sad_position)
    tol = 1e-10 if sad_mode != "reset" else 1e-9  # reset uses exp(-60) instead of an exact 0
    assert max_err(out, ref) < tol


def test_lasad_defaults_follow_the_reference():
    mixer = LasadAttention(768)
    assert mixer.num_heads == 12 and mixer.key_dim == 768  # expand ratio 64 -> 12 heads at d=768
    assert sum(p.numel() for p in mixer.parameters()) == 4 * 768 * 768 + 768  # 4d² + RMSNorm weight
    assert all(lin.bias is None for lin in (mixer.q_proj, mixer.f_proj, mixer.i_proj, mixer.o_proj))


def test_sad_changes_lasad_output():
    base = LasadAttention(DIM, expand_ratio=8, sad_mode="off").double()
    sad = LasadAttention(DIM, expand_ratio=8).double()
    sad.load_state_dict(base.state_dict())
    x = randn(1, 17, DIM)
    assert max_err(base(x, grid_hw=(4, 4)), sad(x, grid_hw=(4, 4))) > 1e-3


def _lina_reference(module: LinaAttention, x, n_cond, grid_hw):
    """Explicit composition in float64: qkv -> explicit-weight attention -> + depthwise conv -> proj."""
    q, k, v = (t.reshape(*x.shape[:2], module.num_heads, -1) for t in module.qkv(x).chunk(3, -1))
    gk = gv = None
    if module.kv_gate is not None:
        gk, gv = module.kv_gate(n_cond, grid_hw)
    out = linear_reference.linear_attention(
        q, k, v, normalization=module.normalization, key_gate=gk, value_gate=gv
    )
    out = out.reshape(*x.shape)
    if module.conv is not None:
        gh, gw = grid_hw
        img = x[:, n_cond:].transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
        conv = F.conv2d(img, module.conv.conv.weight, module.conv.conv.bias, padding=2, groups=x.shape[-1])
        out[:, n_cond:] += conv.flatten(2).transpose(1, 2)
    return module.proj(out)


@pytest.mark.parametrize("normalization", ["division", "subtraction"])
@pytest.mark.parametrize("gate", [None, "absolute", "grid"])
@pytest.mark.parametrize("n_cond,grid_hw", [(1, (4, 6)), (5, (3, 3)), (0, (2, 7))])
def test_lina_decoder_attention_matches_reference(normalization, gate, n_cond, grid_hw):
    module = LinaAttention(
        DIM,
        HEADS,
        normalization=normalization,
        conv_kernel_size=5,
        kv_gate=gate,
        n_cond=n_cond,
        grid_hw=grid_hw,
    ).double()
    if gate is not None:  # move gates away from their init so they matter
        for p in module.kv_gate.parameters():
            torch.nn.init.uniform_(p, 0.5, 1.5) if gate == "absolute" else torch.nn.init.normal_(p, std=0.3)
    x = randn(2, n_cond + grid_hw[0] * grid_hw[1], DIM)
    assert (
        max_err(module(x, n_cond=n_cond, grid_hw=grid_hw), _lina_reference(module, x, n_cond, grid_hw))
        < 1e-10
    )


def test_lina_encoder_form_takes_any_length():
    module = LinaAttention(DIM, HEADS).double()
    for n in (1, 7, 30):
        x = randn(2, n, DIM)
        assert max_err(module(x), _lina_reference(module, x, 0, None)) < 1e-10


def test_fresh_kv_gate_is_identity():
    plain = LinaAttention(DIM, HEADS, conv_kernel_size=5).double()
    for form in ("absolute", "grid"):
        gated = LinaAttention(DIM, HEADS, conv_kernel_size=5, kv_gate=form, n_cond=2, grid_hw=(3, 4)).double()
        gated.load_state_dict(plain.state_dict(), strict=False)
        x = randn(2, 14, DIM)
        assert max_err(gated(x, n_cond=2, grid_hw=(3, 4)), plain(x, n_cond=2, grid_hw=(3, 4))) < 1e-12


def test_lina_layout_errors_are_clear():
    module = LinaAttention(DIM, HEADS, conv_kernel_size=5, kv_gate="absolute", n_cond=1, grid_hw=(4, 4))
    with pytest.raises(ValueError, match="n_cond"):
        module(torch.randn(2, 16, DIM), n_cond=1, grid_hw=(4, 4))
    with pytest.raises(ValueError, match="grid_hw"):
        module(torch.randn(2, 17, DIM))
    with pytest.raises(ValueError, match="absolute KV gate"):
        module(torch.randn(2, 26, DIM), n_cond=1, grid_hw=(5, 5))
    with pytest.raises(ValueError, match="divisible"):
        LinaAttention(30, 4)
    with pytest.raises(ValueError, match="layout"):
        LinaAttention(DIM, HEADS, kv_gate="grid")


def test_lina_gradients_reach_gates_and_conv():
    module = LinaAttention(DIM, HEADS, conv_kernel_size=5, kv_gate="grid", n_cond=1, grid_hw=(3, 3))
    module(torch.randn(2, 10, DIM), n_cond=1, grid_hw=(3, 3)).square().mean().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_softmax_bidirectional_matches_explicit():
    module = SoftmaxAttention(DIM, HEADS).double()
    x = randn(2, 11, DIM)
    q, k, v = (t.reshape(2, 11, HEADS, -1) for t in module.qkv(x).chunk(3, -1))
    ref = module.proj(softmax_reference.softmax_attention(q, k, v).reshape(2, 11, DIM))
    assert max_err(module(x), ref) < 1e-12


def test_softmax_rope_prefix_rows():
    """LlamaGen's zero rows erase the class query/key; identity rows keep them unrotated."""
    module = SoftmaxAttention(DIM, HEADS, causal=True, rope="2d").double()
    x = randn(1, 1 + 9, DIM)
    q, _, _ = module._qkv(x, 0, 1, (3, 3))
    assert torch.all(q[:, 0] == 0)
    module.prefix_rope = "identity"
    q_id, _, _ = module._qkv(x, 0, 1, (3, 3))
    raw = module.qkv(x).chunk(3, -1)[0].reshape(1, 10, HEADS, -1)
    assert max_err(q_id[:, 0], raw[:, 0]) < 1e-12


def test_linear_rope_numerator_only():
    module = LinearRopeAttention(DIM, HEADS).double()
    x = randn(2, 1 + 12, DIM)
    q, k, v = (t.reshape(2, 13, HEADS, -1) for t in module.qkv(x).chunk(3, -1))
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    cos, sin = rope_2d(DIM // HEADS, (3, 4), n_prefix=1, prefix="identity")
    ref = causal_reference.causal_linear_attention(
        fq, fk, v, q_rotated=apply_rope(fq, cos, sin), k_rotated=apply_rope(fk, cos, sin)
    )
    assert max_err(module(x, grid_hw=(3, 4)), module.proj(ref.reshape(2, 13, DIM))) < 1e-10


def test_gla_defaults_follow_fla():
    module = GlaAttention(64, 4)
    assert module.q_proj.out_features == 32 and module.v_proj.out_features == 64  # expand_k 0.5, expand_v 1
    assert module.gk_proj[0].out_features == 16 and module.normalizer == 16


@pytest.mark.parametrize("name", ["lina", "inline", "softmax", "lasad", "gla", "tnl", "linear_rope"])
def test_registry_and_bf16_forward(name):
    mixer = create_mixer(name, DIM, HEADS).to(torch.bfloat16)
    x = torch.randn(2, 1 + 16, DIM, dtype=torch.bfloat16)
    y = mixer(x, n_cond=1, grid_hw=(4, 4))
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_registry_rejects_unknown():
    with pytest.raises(ValueError, match="unknown mixer"):
        create_mixer("mamba", DIM, HEADS)


def test_parameter_groups_exclude_gates_norms_and_biases():
    model = torch.nn.ModuleDict(
        {
            "attn": LinaAttention(DIM, HEADS, conv_kernel_size=5, kv_gate="grid", n_cond=1, grid_hw=(2, 2)),
            "lasad": LasadAttention(DIM, expand_ratio=8),
            "norm": torch.nn.LayerNorm(DIM),
        }
    )
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {
        "attn.kv_gate.key",
        "attn.kv_gate.value",
        "attn.kv_gate.key_cond",
        "attn.kv_gate.value_cond",
    } <= no_decay_names
    assert {"norm.weight", "norm.bias", "lasad.norm.weight", "attn.qkv.bias"} <= no_decay_names
    assert "attn.qkv.weight" in {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    # LINA's original recipe decays biases but still never the gates or norms
    decay_all, no_decay_all = parameter_groups(model, 0.02, decay_1d=True)
    assert "attn.qkv.bias" in {names[id(p)] for p in decay_all["params"]}
    assert "attn.kv_gate.key" in {names[id(p)] for p in no_decay_all["params"]}
    assert len(decay_all["params"]) + len(no_decay_all["params"]) == len(list(model.parameters()))
