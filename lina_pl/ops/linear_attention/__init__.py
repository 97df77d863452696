"""Bidirectional linear attention (LINA division, InLine subtraction), dispatched on ``backend=``.

``reference`` holds the quadratic float64 form the kernels are tested against, ``torch_impl`` the
PyTorch path. A kernel joins by adding an entry to :data:`KERNELS`, ahead of ``"torch"`` if ``"auto"``
should prefer it where it is available.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lina_pl.ops.common import check_qkv
from lina_pl.ops.linear_attention import reference, torch_impl

Normalization = Literal["division", "subtraction"]
LinearAttentionBackend = Literal["auto", "torch"]


class Kernel(NamedTuple):
    """One backend: whether it can run on ``q`` (device, dtype, installed packages) and its function."""

    available: Callable[[Tensor], bool]
    run: Callable[..., Tensor]


KERNELS: dict[str, Kernel] = {
    "torch": Kernel(available=lambda q: True, run=torch_impl.linear_attention),
}


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    normalization: Normalization = "division",
    key_gate: Tensor | None = None,
    value_gate: Tensor | None = None,
    eps: float = 1e-6,
    backend: LinearAttentionBackend = "auto",
) -> Tensor:
    """Bidirectional ReLU-kernel linear attention in O(N·d²), never forming the N×N weights.

    ``division`` (LINA): ``φ(x) = ReLU(x) + eps`` and, with ``w_ij = φ(q_i)·g^k_j φ(k_j)``,
    ``o_i = Σ_j w_ij g^v_j v_j / (Σ_j w_ij + N·eps)`` — the ``N·eps`` is the original ``+eps`` applied
    after the 1/N state scaling that keeps the fp32 state in range.

    ``subtraction`` (InLine): ``φ = ReLU``, ``s = d^-1/2``, weights ``a_ij = 1/N + (s/N)(φ(q_i)·φ(k_j) −
    φ(q_i)·k̄)`` that sum to one over j but may be negative; ``eps`` is unused (no denominator).

    Gates (the LINA KV gate) multiply ``φ(k)`` and ``v`` before both sums and broadcast to ``[B, N, H, 1]``.

    ``backend``: ``"torch"`` runs the PyTorch path on any device; ``"auto"`` picks the first kernel of
    :data:`KERNELS` available for ``q`` (today always ``"torch"``).
    """
    check_qkv(q, k, v)
    if normalization not in ("division", "subtraction"):
        raise ValueError(f"normalization must be 'division' or 'subtraction', got {normalization!r}")
    key_gate = None if key_gate is None else _check_gate(key_gate, k)
    value_gate = None if value_gate is None else _check_gate(value_gate, k)
    kernel = _resolve_backend(backend, q)
    return kernel.run(q, k, v, normalization=normalization, key_gate=key_gate, value_gate=value_gate, eps=eps)


def _resolve_backend(backend: str, q: Tensor) -> Kernel:
    choices = ", ".join(repr(name) for name in ("auto", *KERNELS))
    if backend == "auto":
        return next(kernel for kernel in KERNELS.values() if kernel.available(q))
    if backend not in KERNELS:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")
    if not KERNELS[backend].available(q):
        raise ValueError(
            f"backend {backend!r} is not available for {q.device.type} {q.dtype} inputs here; "
            f"choose one of {choices}"
        )
    return KERNELS[backend]


def _check_gate(gate: Tensor, like: Tensor) -> Tensor:
    b, n, h, _ = like.shape
    if gate.dim() != 4 or gate.shape[-1] != 1:
        raise ValueError(f"gates must have shape [B|1, N|1, H|1, 1], got {tuple(gate.shape)}")
    try:
        torch.broadcast_shapes(gate.shape, (b, n, h, 1))
    except RuntimeError as err:
        raise ValueError(f"gate of shape {tuple(gate.shape)} does not broadcast to {(b, n, h, 1)}") from err
    return gate


__all__ = [
    "KERNELS",
    "Kernel",
    "LinearAttentionBackend",
    "Normalization",
    "linear_attention",
    "reference",
    "torch_impl",
]
