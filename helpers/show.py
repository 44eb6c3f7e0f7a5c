"""A contact sheet: thumbnails in a grid with wrapped text under each, as one PIL image.

Jupyter displays the returned image inline; the job saves it as a PNG.
"""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

from helpers.rows import ImageDecodeError, decode_image

GREY = (200, 200, 200)  # the tile of an image that can't be decoded
LINE_HEIGHT = 12


def _cell_size(thumb: int, text_lines: int) -> tuple[int, int]:
    return thumb + 16, thumb + 16 + text_lines * LINE_HEIGHT


def _title_height(titled: bool) -> int:
    return 2 * LINE_HEIGHT if titled else 0


def tile_boxes(index: int, columns: int = 4, thumb: int = 192, text_lines: int = 5, titled: bool = False):
    """(image box, text box) of tile `index` on a contact sheet, as (left, top, right, bottom).
    Separate so that a test can check what each tile shows."""
    cell_w, cell_h = _cell_size(thumb, text_lines)
    top = _title_height(titled)
    x, y = (index % columns) * cell_w + 8, top + (index // columns) * cell_h + 8
    text_top = y + thumb + 4
    return (x, y, x + thumb, y + thumb), (x, text_top, x + thumb + 8, text_top + text_lines * LINE_HEIGHT)


def draw_tile_text(
    draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, thumb: int = 192, text_lines: int = 5
):
    """Write text wrapped to the tile's width, at most text_lines lines (the last cut with ...)."""
    font = ImageFont.load_default()
    chars_per_line = max(10, thumb // 6)
    lines = textwrap.wrap(" ".join(str(text).split()), chars_per_line)
    if len(lines) > text_lines:
        lines = lines[: text_lines - 1] + [lines[text_lines - 1][: chars_per_line - 3] + "..."]
    for j, line in enumerate(lines):
        draw.text((xy[0], xy[1] + j * LINE_HEIGHT), line, fill="black", font=font)


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
    cell_w, cell_h = _cell_size(thumb, text_lines)
    rows = max(1, -(-len(items) // columns))
    top = _title_height(bool(title))
    sheet = Image.new("RGB", (columns * cell_w, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, LINE_HEIGHT // 2), title, fill=(180, 0, 0), font=ImageFont.load_default())
    for i, (image, text) in enumerate(items):
        image_box, text_box = tile_boxes(i, columns, thumb, text_lines, bool(title))
        x, y = image_box[:2]
        if not isinstance(image, Image.Image):
            try:
                image = decode_image(image)
            except ImageDecodeError:
                image = Image.new("RGB", (thumb, thumb), GREY)
        image = image.copy()
        image.thumbnail((thumb, thumb))
        sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        draw_tile_text(draw, text_box[:2], text, thumb, text_lines)
    return sheet
