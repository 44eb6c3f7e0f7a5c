"""Row functions of the captioning pipeline: decode, preprocess, postprocess, finalize.

Every function takes one row (a dict) and returns one row, so Ray Data can run them anywhere.
They are pure: configuration comes in as keyword arguments (bind them with functools.partial),
because environment variables set on the driver do not reach Ray workers.

Rows in = rows out: an image that can't be decoded still becomes a row. It goes through the
engine as a tiny placeholder request of one token, and postprocess turns it into an error row.
That keeps the pipeline a single pass with no filter that could drop rows.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

SYSTEM_PROMPT = (
    "You are an image captioning assistant. Write one accurate, concise caption that names the "
    "main subject, what it is doing, the setting, and any clearly legible text. Do not guess."
)
INSTRUCTION = "Write a caption for this image."
IMAGE_SIZE = 225  # pixels per side: 64 image tokens for Qwen2.5-VL, a fixed cost per image
MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused before decoding (decompression bombs)
PLACEHOLDER_SIZE = 28  # the smallest image Qwen2.5-VL accepts: one image token
# Qwen2.5-VL's patch grid: 14-pixel patches merged 2x2. vLLM's processor resizes every image to a
# multiple of it (225 -> 224); an image that is one already can skip that step (Preset.prepared_images).
PATCH_GRID = 28

# Never let Pillow guess at truncated data: a truncated file is an error row, not a grey caption.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """The bytes of a row are not a usable image; the message says why, in a few words."""


def decode_image(data: bytes | None, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB image: first frame, EXIF orientation applied.

    Raises ImageDecodeError with a short reason for empty, unreadable, truncated or
    oversized input. The pixel limit is checked from the header, before any pixel is decoded.
    """
    if data is None:
        raise ImageDecodeError("no image data")
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image: unrecognised format") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large: {e}") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad file, not a crashed job
        raise ImageDecodeError(f"unreadable image header: {type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image too large: {width}x{height} is over the limit of {max_pixels:,} pixels"
        )
    try:
        image.seek(0)  # animated GIF/WebP/APNG: the first frame
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except Exception as e:  # noqa: BLE001
        raise ImageDecodeError(f"truncated or corrupt {image.format} image: {e}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: transparency onto white, 16/32-bit and float depths rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        import numpy as np

        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if image.mode.startswith("I;16"):
            peak = 65535.0
        elif image.mode == "F" and pixels.max() <= 1.0:
            peak = 1.0  # floating-point pixels in 0-1, as scientific TIFFs store them
        else:
            peak = max(float(pixels.max()), 255.0)
        scaled = np.clip(pixels * (255.0 / peak), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def preprocess(
    row: dict[str, Any],
    *,
    image_size: int = IMAGE_SIZE,
    max_pixels: int = MAX_IMAGE_PIXELS,
    system_prompt: str = SYSTEM_PROMPT,
    instruction: str = INSTRUCTION,
    temperature: float = 0.3,
    max_tokens: int = 256,
    ignore_eos: bool = False,
    final_only: bool = True,
    detokenize: bool = True,
    image_uuid: bool = False,
) -> dict[str, Any]:
    """Turn an `{"id", "image_bytes", "read_error"}` row into a chat request for the engine.

    The image is resized to image_size x image_size (bicubic) so every request costs the same
    number of vision tokens. An undecodable image, or a file the reader couldn't read
    (`read_error`), becomes a one-token placeholder request that carries its reason in
    `decode_error`. `ignore_eos` (benchmarks only) makes every
    request generate exactly max_tokens.

    `final_only` asks the engine for the finished caption only. Ray Data LLM otherwise gets a
    cumulative update of every request at every token, which keeps the engine actor's event loop
    (where vLLM also prepares the images) busy. `detokenize=False` leaves the text to Ray Data
    LLM's own detokenize stage: set it only when that stage is enabled.

    `image_uuid` names the image by a hash of its pixels (`pixel_uuid`), which vLLM then uses
    as the image's cache and prefix-cache key instead of hashing the pixels itself on the engine
    actor's thread (Preset.prepared_images).
    """
    try:
        if row.get("read_error"):
            raise ImageDecodeError(row["read_error"])
        image = decode_image(row.get("image_bytes"), max_pixels=max_pixels)
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        decode_error = None
    except ImageDecodeError as e:
        image = Image.new("RGB", (PLACEHOLDER_SIZE, PLACEHOLDER_SIZE))
        decode_error = str(e)
    sampling_params: dict[str, Any] = {
        "temperature": temperature,
        "max_tokens": 1 if decode_error else max_tokens,
    }
    if ignore_eos:
        sampling_params["ignore_eos"] = True
    if final_only:
        from vllm.sampling_params import RequestOutputKind  # preprocess runs where vLLM is

        sampling_params["output_kind"] = RequestOutputKind.FINAL_ONLY
    if not detokenize:
        sampling_params["detokenize"] = False
    image_part: dict[str, Any] = {"type": "image_pil", "image_pil": image}
    if image_uuid:
        image_part["uuid"] = pixel_uuid(image)
    return {
        "id": row["id"],
        "decode_error": decode_error,
        "image_bytes": None,  # the decoded image travels in `messages`; don't carry the bytes
        "messages": [
            {"role": "system", "content": system_prompt},
            {
                "role": "user",
                "content": [
                    image_part,
                    {"type": "text", "text": instruction},
                ],
            },
        ],
        "sampling_params": sampling_params,
    }


def pixel_uuid(image: Image.Image) -> str:
    """A name for exactly these pixels: a BLAKE2b hash of the mode, the size and the pixel bytes.
    vLLM trusts a uuid as the image's identity (its processor cache and prefix cache reuse what
    they hold under it), so it must be derived from the pixels, never from a row's id, which a
    user's data may repeat for different images."""
    digest = hashlib.blake2b(f"{image.mode}:{image.width}x{image.height}:".encode(), digest_size=16)
    digest.update(image.tobytes())
    return "px-" + digest.hexdigest()


OUTPUT_COLUMNS = ("id", "caption", "error", "num_input_tokens", "num_generated_tokens", "model")


def postprocess(row: dict[str, Any], *, model: str) -> dict[str, Any]:
    """Keep the caption, its id and token counts; never the image. Decode failures become errors."""
    decode_error = row.get("decode_error")
    return {
        "id": row["id"],
        "caption": None if decode_error else row["generated_text"],
        "error": decode_error,
        "num_input_tokens": 0 if decode_error else int(row.get("num_input_tokens") or 0),
        "num_generated_tokens": 0 if decode_error else int(row.get("num_generated_tokens") or 0),
        "model": model,
    }


ENGINE_ERROR_COLUMN = "__inference_error__"


def finalize(row: dict[str, Any], *, model: str) -> dict[str, Any]:
    """Give every row the output schema, including rows the engine rejected.

    With `should_continue_on_error=True`, Ray Data LLM routes a request the engine rejects
    (a prompt that's too long, say) around postprocess with its whole request attached and the
    reason in `__inference_error__`. This turns those into the same error rows as the rest.
    """
    engine_error = row.get(ENGINE_ERROR_COLUMN) or ""
    if not engine_error:
        return {name: row.get(name) for name in OUTPUT_COLUMNS}
    return {
        "id": row["id"],
        "caption": None,
        "error": f"engine rejected the request: {engine_error}"[:500],
        "num_input_tokens": int(row.get("num_input_tokens") or 0),
        "num_generated_tokens": 0,
        "model": model,
    }
