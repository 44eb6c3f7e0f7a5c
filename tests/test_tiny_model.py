"""The offline test model: small, real Qwen2.5-VL architecture, untied head."""

import json

from transformers import AutoProcessor

from helpers.tiny_model import build_tiny_model


def test_tiny_model_is_small_and_complete(tmp_path):
    out = build_tiny_model(tmp_path / "tiny")
    size = sum(f.stat().st_size for f in out.iterdir())
    assert size < 1_000_000
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["tie_word_embeddings"] is False  # random tied weights repeat one token
    processor = AutoProcessor.from_pretrained(out)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert "<|vision_start|><|image_pad|><|vision_end|>Hi" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
