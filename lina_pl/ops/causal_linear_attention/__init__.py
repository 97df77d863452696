"""Normalised causal linear attention with numerator-only RoPE (the linear + RoPE baseline)."""

from lina_pl.ops.causal_linear_attention import reference, torch_impl
from lina_pl.ops.causal_linear_attention.torch_impl import causal_linear_attention, elu_feature_map

__all__ = ["causal_linear_attention", "elu_feature_map", "reference", "torch_impl"]
