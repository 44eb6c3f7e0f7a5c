"""Build a tiny, randomly initialised Qwen2.5-VL checkpoint locally, for offline runs on CPU.

The offline preset can't download weights, so it builds a model with the real Qwen2.5-VL
architecture (vision tower, M-RoPE, chat template, image processor) but a few thousand random
parameters and a small byte-level BPE tokenizer trained here. It goes through exactly the code
path the real model does in Ray Data LLM and vLLM. Its captions are random tokens: meaningless.

    python -m helpers.tiny_model [OUT_DIR]
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".cache" / "tiny-qwen2_5-vl"
BUILD_VERSION = "2"  # bump to rebuild cached copies when the recipe changes

ADDED_TOKENS = [  # Qwen2.5-VL's added tokens, in their real order
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
NOT_SPECIAL = {
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
}

# Qwen2-VL / Qwen2.5-VL Instruct chat template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A small corpus for the tokenizer: a 512-token vocabulary keeps tokenizer loads and engine
# start-up fast on CPU (the real 151k vocabulary makes both many times slower).
CORPUS = (
    "A photo of a red square on a white background. A picture of a blue circle. "
    "Describe this image in one or two sentences. The image shows a cat, a dog, a tree, a car, "
    "a house, the sky, the sea, green grass, a yellow sun, black and white stripes. "
    "You are a helpful assistant that writes accurate, concise captions for images. "
    "What is in the picture? It is a small colourful pattern. "
    "0 1 2 3 4 5 6 7 8 9 , . ! ? : ; ' \" ( ) [ ] { } - _ / \\ \n\t"
)

MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112  # <= 16 image tokens per image: fast on 2 CPU cores


def _build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([CORPUS] * 20, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    base = len(vocab)
    vocab.update({t: base + i for i, t in enumerate(ADDED_TOKENS)})
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        errors="replace",
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    for i, t in enumerate(ADDED_TOKENS):
        special = t not in NOT_SPECIAL
        tok.add_tokens([AddedToken(t, special=special, normalized=False)], special_tokens=special)
        assert tok.convert_tokens_to_ids(t) == base + i, t
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 32768
    return tok


def _speak_only_text(model, first_special: int) -> None:
    """Make the random model's captions text from start to end: it never samples an added token
    (end of turn, image pads) or a padding id of its rounded-up vocabulary. Random logits would
    otherwise start about one caption in 300 with an end token: an empty caption by chance,
    which the tests rightly read as a lost caption.

    Every token embedding gets the same large first coordinate, so the last layer's normalised
    hidden state at a text position points along it (the two small random layers add little),
    and the head's rows for those ids point against it: their logits are about -40, the others'
    within about 1 of 0."""
    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 1.0
        head = model.get_output_embeddings().weight
        head[first_special:] = 0.0
        head[first_special:, 0] = -5.0


def build_tiny_model(out_dir: str | os.PathLike, hidden: int = 64, seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-VL (config, safetensors, tokenizer, processor) to out_dir."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )

    torch.manual_seed(seed)
    tok = _build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ADDED_TOKENS}
    n_heads = max(1, hidden // 32)  # head_dim 32 is supported by vLLM's CPU attention
    half = hidden // n_heads // 2
    t_sec = half // 4
    hw = (half - t_sec) // 2
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=((len(tok) + 63) // 64) * 64,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=n_heads,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            hidden_act="silu",
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [half - 2 * hw, hw, hw],
            },
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            use_sliding_window=False,
            max_window_layers=2,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=hidden,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
            hidden_act="silu",
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        # A tied head on random weights keeps emitting the same token; untied gives variety.
        tie_word_embeddings=False,
    )
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16)
    _speak_only_text(model, first_special=len(tok) - len(ADDED_TOKENS))

    out = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    ).save_pretrained(tmp)
    image_processor = Qwen2VLImageProcessor(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    video_processor = None
    try:  # the processor builds a video processor when torchvision imports
        from transformers import Qwen2VLVideoProcessor
        from transformers.utils import is_torchvision_available

        if is_torchvision_available():
            video_processor = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    except ImportError:
        pass
    Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tok.backend_tokenizer.save(str(tmp / "tokenizer.json"), pretty=False)
    (tmp / "BUILD_VERSION").write_text(BUILD_VERSION)
    # Publish atomically so a concurrent or interrupted build never leaves a half model behind.
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def ensure_tiny_model(out_dir: str | os.PathLike | None = None) -> str:
    """Return the path of the cached tiny model, building it first if needed (~5 s)."""
    out = Path(out_dir) if out_dir else DEFAULT_DIR
    stamp = out / "BUILD_VERSION"

    def built() -> bool:
        return stamp.exists() and stamp.read_text() == BUILD_VERSION

    if not built():
        out.parent.mkdir(parents=True, exist_ok=True)
        # One builder at a time (the test workers, a notebook and a job may all start at once);
        # the others wait, then find it built.
        with open(out.parent / f".{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not built():
                build_tiny_model(out)
    return str(out)


if __name__ == "__main__":
    print(ensure_tiny_model(sys.argv[1] if len(sys.argv) > 1 else None))
