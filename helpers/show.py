"""A contact sheet: thumbnails in a grid with wrapped text under each, as one PIL image.

Jupyter displays the returned image inline; the job saves it as a PNG.
"""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

from helpers.rows import ImageDecodeError, decode_image


def contact_sheet(
    items: list[tuple[bytes | Image.Image | None, str]],
    columns: int = 4,
    thumb: int = 192,
    text_lines: int = 5,
    title: str = "",
) -> Image.Image:
    """items: (image bytes or PIL image, text). Undecodable images get a grey tile.

    A title, if given, is written across the top (say there that random-weight captions are
    meaningless, wherever they are shown)."""
    font = ImageFont.load_default()
    line_height = 12
    chars_per_line = max(10, thumb // 6)
    cell_w, cell_h = thumb + 16, thumb + 16 + text_lines * line_height
    rows = max(1, -(-len(items) // columns))
    top = 2 * line_height if title else 0
    sheet = Image.new("RGB", (columns * cell_w, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, line_height // 2), title, fill=(180, 0, 0), font=font)
    for i, (image, text) in enumerate(items):
        x, y = (i % columns) * cell_w + 8, top + (i // columns) * cell_h + 8
        if not isinstance(image, Image.Image):
            try:
                image = decode_image(image)
            except ImageDecodeError:
                image = Image.new("RGB", (thumb, thumb), (200, 200, 200))
        image = image.copy()
        image.thumbnail((thumb, thumb))
        sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        lines = textwrap.wrap(" ".join(str(text).split()), chars_per_line)
        if len(lines) > text_lines:
            lines = lines[: text_lines - 1] + [lines[text_lines - 1][: chars_per_line - 3] + "..."]
        for j, line in enumerate(lines):
            draw.text((x, y + thumb + 4 + j * line_height), line, fill="black", font=font)
    return sheet
