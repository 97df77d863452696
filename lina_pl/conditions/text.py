"""Text condition: frozen-encoder features of a prompt -> ``max_length`` prefix tokens; null = empty prompt.

As in LINA/NOVA (Phi-2 features, 256 tokens): the sequence is always ``max_length`` long; positions beyond
the prompt are filled by a fixed random padding table (N(0, 0.02), drawn from a fixed seed, a persistent
buffer that is never trained); prompt dropout replaces the whole prompt by padding, so the null condition is
the all-padding sequence, which is also what the empty prompt gives; then ``Linear(feature_dim -> dim)`` and
a LayerNorm without affine parameters (the original's affine is frozen at identity).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lina_pl.conditions.base import Condition
from lina_pl.text.encoder import KINDS, TextEncoder, shared_text_encoder

PADDINGS = ("table", "mask")
#: seed of the padding table, so every instance (and every rank) draws the same one
PADDING_SEED = 20250101


class TextCondition(Condition):
    """Prompt features -> ``[B, max_length, dim]`` condition tokens.

    Batch fields, in order of preference: cached ``text_emb`` (float/half ``[B, T, feature_dim]``, ``T ≤
    max_length``, zero or anything at padded positions) with ``text_mask`` (bool ``[B, T]``, True on prompt
    tokens), or raw ``text`` (a list of strings) that a frozen ``TextEncoder`` loaded from ``encoder_path``
    (a local directory, or ``"bundled:minilm"``) encodes online. The encoder is shared per process, kept out
    of the module tree (never in a state_dict or an optimizer) and moved to this module's device on use.

    ``padding="table"`` (the paper) fills masked positions with the padding table. ``padding="mask"`` fills
    them with zero features instead; it is the option for a generator that applies an attention mask over the
    prefix: ``tokens_and_mask(batch)`` returns the tokens together with the bool mask ``[B, max_length]``
    (True = prompt token; all False for a dropped or empty prompt, so such a mask must not be the only thing a
    softmax attends to) and ``null_mask(n)`` the null rows' mask. ``forward`` returns the tokens only.

    ``display_prompts`` overrides ``DISPLAY_PROMPTS``, the prompts a sample grid shows by default.
    """

    keys = ("text_emb", "text_mask", "text")
    DISPLAY_PROMPTS: tuple[str, ...] = (
        "a photo of a cat",
        "a red apple on a wooden table",
        "a lighthouse on a cliff at sunset",
        "a handwritten digit seven",
    )

    def __init__(
        self,
        dim: int,
        feature_dim: int,
        max_length: int = 256,
        padding: str = "table",
        dropout: float = 0.1,
        encoder_path: str | None = None,
        encoder_kind: str = "auto",
        encoder_dtype: str = "float32",
        display_prompts: Sequence[str] | None = None,
    ):
        super().__init__(dim, dropout)
        if feature_dim < 1 or max_length < 1:
            raise ValueError(f"feature_dim and max_length must be ≥ 1, got {feature_dim} and {max_length}")
        if padding not in PADDINGS:
            raise ValueError(f"unknown text padding {padding!r}; choose from {', '.join(PADDINGS)}")
        if encoder_kind not in KINDS:
            raise ValueError(f"unknown text encoder kind {encoder_kind!r}; choose from {', '.join(KINDS)}")
        if display_prompts is not None and (
            isinstance(display_prompts, str) or not all(isinstance(p, str) for p in display_prompts)
        ):
            raise ValueError("display_prompts must be a list of strings")
        self.feature_dim, self.max_length, self.padding = feature_dim, max_length, padding
        self.num_tokens = max_length
        self.encoder_path, self.encoder_kind, self.encoder_dtype = encoder_path, encoder_kind, encoder_dtype
        self.display_prompts = list(display_prompts) if display_prompts is not None else None
        if padding == "table":
            seeded = torch.Generator().manual_seed(PADDING_SEED)
            table = torch.randn(max_length, feature_dim, generator=seeded) * 0.02
            self.register_buffer("padding_table", table, persistent=True)
        self.proj = nn.Linear(feature_dim, dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self._encoder: TextEncoder | None = None  # a plain attribute: TextEncoder is not an nn.Module

    # -- inputs -----------------------------------------------------------------------------------------

    def check(self, batch: Mapping[str, Any]) -> None:
        if "text_emb" in batch or "text_mask" in batch:
            missing = [k for k in ("text_emb", "text_mask") if k not in batch]
            if missing:
                raise ValueError(
                    f"the batch has text_emb or text_mask but not {missing[0]}; cache both together"
                )
        elif "text" not in batch:
            raise ValueError(
                f"the batch has neither text_emb + text_mask (cached features) nor text (prompts) "
                f"(fields: {', '.join(sorted(batch))}); a {type(self).__name__} needs one of them"
            )

    @property
    def encoder(self) -> TextEncoder:
        """The frozen text encoder for raw ``text``, loaded on first use and moved to this module's device."""
        if self.encoder_path is None:
            raise ValueError(
                "the batch holds raw text but the text condition has no encoder_path; set encoder_path "
                "(a local model directory or 'bundled:minilm') or feed cached text_emb + text_mask"
            )
        if self._encoder is None:
            encoder = shared_text_encoder(
                self.encoder_path, self.encoder_kind, self.max_length, dtype=self.encoder_dtype
            )
            if encoder.feature_dim != self.feature_dim:
                raise ValueError(
                    f"the text encoder in {encoder.path} gives {encoder.feature_dim}-d features, "
                    f"but the condition's feature_dim is {self.feature_dim}"
                )
            self._encoder = encoder
        device = self.proj.weight.device
        if self._encoder.device != device:
            self._encoder.to(device)
        return self._encoder

    def features(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Features ``[B, max_length, feature_dim]`` (float32) and mask ``[B, max_length]`` of the prompts."""
        self.check(batch)
        device = self.proj.weight.device
        if "text_emb" not in batch:
            return self.encoder.encode(list(batch["text"]))
        emb = torch.as_tensor(batch["text_emb"], device=device)
        mask = torch.as_tensor(batch["text_mask"], device=device)
        if emb.dim() != 3 or not emb.is_floating_point():
            raise ValueError(
                f"text_emb must be float [B, T, {self.feature_dim}], got {emb.dtype} {tuple(emb.shape)}"
            )
        if emb.shape[2] != self.feature_dim:
            raise ValueError(
                f"text_emb has {emb.shape[2]}-d features, "
                f"but the condition's feature_dim is {self.feature_dim}"
            )
        if mask.shape != emb.shape[:2]:
            raise ValueError(f"text_mask {tuple(mask.shape)} does not match text_emb {tuple(emb.shape)}[:2]")
        if emb.shape[1] > self.max_length:
            raise ValueError(
                f"text_emb has {emb.shape[1]} tokens, more than the condition's max_length {self.max_length}"
            )
        extra = self.max_length - emb.shape[1]
        emb = nn.functional.pad(emb.float(), (0, 0, 0, extra))
        mask = nn.functional.pad(mask.bool(), (0, extra), value=False)
        return emb, mask

    # -- tokens -----------------------------------------------------------------------------------------

    def embed(self, features: Tensor, mask: Tensor) -> Tensor:
        """Fill masked positions (padding table or zeros), project to ``dim`` and normalise."""
        keep = mask[..., None]
        if self.padding == "table":
            x = torch.where(keep, features.to(self.padding_table.dtype), self.padding_table)
        else:
            x = features * keep
        return self.norm(self.proj(x.to(self.proj.weight.dtype)))

    def tokens_and_mask(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Condition tokens ``[B, max_length, dim]`` and the prompt mask ``[B, max_length]`` after dropout."""
        features, mask = self.features(batch)
        if self.training and self.dropout > 0:
            drop = torch.rand(mask.shape[0], device=mask.device) < self.dropout
            mask = mask & ~drop[:, None]
        return self.embed(features, mask), mask

    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        return self.tokens_and_mask(batch)[0]

    def null_mask(self, batch_size: int) -> Tensor:
        return torch.zeros(batch_size, self.max_length, dtype=torch.bool, device=self.proj.weight.device)

    def null(self, batch_size: int) -> Tensor:
        """All padding: the tokens of a dropped prompt and of the empty prompt."""
        mask = self.null_mask(batch_size)
        features = torch.zeros(*mask.shape, self.feature_dim, device=mask.device)
        return self.embed(features, mask)

    # -- batches ----------------------------------------------------------------------------------------

    def batch_size(self, batch: Mapping[str, Any]) -> int:
        self.check(batch)
        return len(batch["text_emb"] if "text_emb" in batch else batch["text"])

    def display_batch(self, values: Sequence[Any], repeat: int) -> dict[str, Any]:
        if isinstance(values, str) or not all(isinstance(v, str) for v in values):
            raise ValueError("text display values must be a list of prompts (strings)")
        return {"text": [prompt for prompt in values for _ in range(repeat)]}

    def default_display_values(self) -> list[Any]:
        return list(self.display_prompts if self.display_prompts is not None else self.DISPLAY_PROMPTS)

    def extra_repr(self) -> str:
        return (
            f"feature_dim={self.feature_dim}, max_length={self.max_length}, padding={self.padding!r}, "
            f"dropout={self.dropout}, encoder_path={self.encoder_path!r}"
        )
