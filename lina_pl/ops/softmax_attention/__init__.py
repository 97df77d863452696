"""Softmax attention, the baseline every linear mixer is compared against."""

from lina_pl.ops.softmax_attention import reference, torch_impl
from lina_pl.ops.softmax_attention.torch_impl import softmax_attention

__all__ = ["reference", "softmax_attention", "torch_impl"]
