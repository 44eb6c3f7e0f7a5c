"""The offline test model: small, real Qwen2.5-VL architecture, untied head, text-only captions."""

import json

import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from helpers.tiny_model import ADDED_TOKENS, build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


def test_tiny_model_is_small_and_complete(tiny):
    size = sum(f.stat().st_size for f in tiny.iterdir())
    assert size < 1_000_000
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["tie_word_embeddings"] is False  # random tied weights repeat one token
    processor = AutoProcessor.from_pretrained(tiny)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert "<|vision_start|><|image_pad|><|vision_end|>Hi" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_tiny_model_never_samples_an_end_token_or_a_padding_id(tiny):
    # An end token first is an empty caption; the notebook's check reads it as a lost one.
    processor = AutoProcessor.from_pretrained(tiny)
    text_ids = len(processor.tokenizer) - len(ADDED_TOKENS)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32)
    ids = torch.randint(0, len(processor.tokenizer), (8, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] > text_ids + len(ADDED_TOKENS)  # the vocabulary is padded: those ids too
    # At the presets' temperature the added and padding ids get no probability at all, while the
    # text tokens keep spread logits (random captions, not one token repeated).
    probs = torch.softmax(logits / 0.3, dim=-1)
    assert probs[..., text_ids:].sum(-1).max() < 1e-9
    assert logits[..., :text_ids].std(-1).min() > 0.05
