"""The row functions, on every kind of odd and broken input."""

import dataclasses
import io

import pytest
from conftest import WHITE, bad_and_odd_images, encode, near, png_claiming_size
from PIL import Image
from vllm.sampling_params import RequestOutputKind

from helpers.pipeline import processor_config, row_kwargs
from helpers.presets import get_preset, resolve_model
from helpers.rows import (
    ENGINE_ERROR_COLUMN,
    OUTPUT_COLUMNS,
    ImageDecodeError,
    decode_image,
    finalize,
    pixel_uuid,
    postprocess,
    preprocess,
)

CASES = bad_and_odd_images()


RED = (200, 30, 30)
# name -> (size as displayed, colour): transparency onto white, EXIF rotation applied, the first
# frame of an animation. Lossy formats and the web palette come near the colour (conftest.near).
DECODED = {
    "rgb.jpg": ((64, 48), RED),
    "cmyk.jpg": ((64, 48), RED),
    "gray16.png": ((32, 32), (127, 127, 127)),
    "palette.png": ((64, 48), RED),
    "palette_transparent.png": ((20, 20), WHITE),
    "la.png": ((32, 32), WHITE),
    "rgba.png": ((32, 32), WHITE),
    "rotated.jpg": ((20, 40), (0, 128, 0)),
    "animated.gif": ((16, 16), (255, 0, 0)),
    "tiny_1x1.png": ((1, 1), (9, 9, 9)),
    "webp.webp": ((64, 48), RED),
    "bitmap.bmp": ((64, 48), RED),
}


@pytest.mark.parametrize("name", sorted(CASES["good"]))
def test_every_valid_image_decodes_to_rgb_as_displayed(name):
    image = decode_image(CASES["good"][name])
    size, colour = DECODED[name]
    assert image.mode == "RGB" and image.size == size
    assert near(image.getpixel((0, 0)), colour), name


@pytest.mark.parametrize(
    "name, reason",
    [
        ("empty.jpg", "empty file"),
        ("text_as_image.jpg", "not an image"),
        ("truncated.jpg", "truncated or corrupt"),
        ("bomb.png", "image too large"),
        ("garbage.png", "not an image: unrecognised format"),
        ("bad_header.bmp", "unreadable image header: OSError"),
    ],
)
def test_every_bad_image_raises_a_short_clear_reason(name, reason):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(CASES["bad"][name])
    assert reason in str(info.value)
    assert len(str(info.value)) < 300


def test_none_is_a_decode_error():
    with pytest.raises(ImageDecodeError, match="no image data"):
        decode_image(None)


def test_pixel_limit_is_checked_before_decoding():
    # 12000 x 12000 = 144M pixels: under Pillow's own hard limit (179M), so ours must catch it.
    with pytest.raises(ImageDecodeError, match="12000x12000 is over the limit"):
        decode_image(png_claiming_size(12_000, 12_000), max_pixels=100_000_000)


def test_exif_orientation_is_applied():
    assert decode_image(CASES["good"]["rotated.jpg"]).size == (20, 40)


def test_animated_image_gives_its_first_frame():
    assert decode_image(CASES["good"]["animated.gif"]).getpixel((0, 0)) == (255, 0, 0)  # not blue


def test_transparency_goes_onto_white_and_16_bit_is_rescaled():
    assert decode_image(CASES["good"]["rgba.png"]).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(CASES["good"]["la.png"]).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(CASES["good"]["gray16.png"]).getpixel((0, 0)) == (127, 127, 127)
    # Float pixels in 0-1 (a scientific TIFF): 0.5 is mid-grey, not black; NaN is black.
    for value, grey in ((0.5, 127), (float("nan"), 0)):
        tiff = io.BytesIO()
        Image.new("F", (8, 8), value).save(tiff, "TIFF")
        assert decode_image(tiff.getvalue()).getpixel((0, 0)) == (grey, grey, grey)


def test_cmyk_keeps_its_colour():
    r, g, b = decode_image(CASES["good"]["cmyk.jpg"]).getpixel((32, 24))
    assert r > 150 and g < 80 and b < 80


@pytest.mark.parametrize("separate", [True, False])
def test_exactly_one_of_engine_and_ray_data_llm_detokenizes(separate):
    # Both: wasted work; neither: empty captions. Run for real in test_pipeline.py.
    preset = dataclasses.replace(get_preset(smoke_test=False), separate_tokenizer_stages=separate)
    ray_stage = processor_config(preset, resolve_model("tiny")).detokenize_stage["enabled"]
    assert ray_stage is separate and row_kwargs(preset)["detokenize"] is not separate


def test_preprocess_builds_a_chat_request_with_a_resized_image():
    row = {"id": "a", "image_bytes": encode(Image.new("RGB", (640, 480), "blue"), "JPEG")}
    out = preprocess(row, image_size=225, temperature=0.3, max_tokens=256, instruction="Caption it.")
    assert out["id"] == "a" and out["decode_error"] is None and out["image_bytes"] is None
    system, user = out["messages"]
    assert system["role"] == "system" and isinstance(system["content"], str)
    image_part, text_part = user["content"]
    assert image_part["type"] == "image_pil" and image_part["image_pil"].size == (225, 225)
    assert text_part == {"type": "text", "text": "Caption it."}
    assert out["sampling_params"] == {
        "temperature": 0.3,
        "max_tokens": 256,
        "output_kind": RequestOutputKind.FINAL_ONLY,  # one result per request, not one per token
    }
    raw = preprocess(row, final_only=False, detokenize=False)["sampling_params"]
    assert "output_kind" not in raw and raw["detokenize"] is False


def test_preprocess_turns_a_bad_image_into_a_one_token_placeholder():
    out = preprocess({"id": "b", "image_bytes": b""}, max_tokens=256)
    assert out["decode_error"] == "empty file (0 bytes)"
    assert out["sampling_params"]["max_tokens"] == 1
    assert out["messages"][1]["content"][0]["image_pil"].size == (28, 28)


# vLLM takes an image part's uuid as the image's identity: its processor cache and its prefix cache
# hand back what they hold under that name. So the name must follow the pixels, never the row.
def test_image_uuid_names_the_pixels_not_the_row():
    def part(row_id, image, **kwargs):
        row = {"id": row_id, "image_bytes": encode(image, "PNG")}
        return preprocess(row, image_size=224, **kwargs)["messages"][1]["content"][0]

    blue, red = Image.new("RGB", (300, 200), "blue"), Image.new("RGB", (300, 200), "blue")
    red.putpixel((150, 100), (255, 0, 0))  # one pixel apart
    named = part("a", blue, image_uuid=True)
    assert named["uuid"] == pixel_uuid(named["image_pil"]) and named["uuid"].startswith("px-")
    assert part("b", blue, image_uuid=True)["uuid"] == named["uuid"]  # another row, the same pixels
    assert part("a", red, image_uuid=True)["uuid"] != named["uuid"]  # the same id, other pixels
    assert pixel_uuid(Image.new("RGB", (224, 224))) != pixel_uuid(Image.new("RGB", (112, 448)))
    assert "uuid" not in part("a", blue)  # off by default: vLLM hashes the pixels itself
    placeholder = preprocess({"id": "c", "image_bytes": b""}, image_uuid=True)["messages"][1]["content"][0]
    assert placeholder["uuid"] == pixel_uuid(Image.new("RGB", (28, 28)))


def test_postprocess_keeps_text_only():
    engine_row = {
        "id": "a",
        "decode_error": None,
        "generated_text": "A red house.",
        "num_input_tokens": 102,
        "num_generated_tokens": 5,
        "messages": "...",
        "multimodal_data": "...",
    }
    assert postprocess(engine_row, model="m") == {
        "id": "a",
        "caption": "A red house.",
        "error": None,
        "num_input_tokens": 102,
        "num_generated_tokens": 5,
        "model": "m",
    }
    failed = postprocess({**engine_row, "decode_error": "empty file (0 bytes)"}, model="m")
    assert failed["caption"] is None and failed["error"] == "empty file (0 bytes)"
    assert failed["num_input_tokens"] == failed["num_generated_tokens"] == 0 and failed["model"] == "m"


def test_finalize_gives_engine_rejections_the_output_schema():
    ok = {name: "x" for name in OUTPUT_COLUMNS} | {ENGINE_ERROR_COLUMN: ""}
    assert finalize(ok, model="m") == {name: "x" for name in OUTPUT_COLUMNS}
    rejected = {"id": "c", ENGINE_ERROR_COLUMN: "ValueError: prompt is too long", "messages": [1]}
    out = finalize(rejected, model="m")
    assert tuple(out) == OUTPUT_COLUMNS
    assert out["caption"] is None and "prompt is too long" in out["error"]
    long = finalize({"id": "c", ENGINE_ERROR_COLUMN: "x" * 1000, "num_input_tokens": 7}, model="m")
    assert len(long["error"]) == 500 and long["error"].startswith("engine rejected the request: x")
    assert (long["num_input_tokens"], long["num_generated_tokens"], long["model"]) == (7, 0, "m")
