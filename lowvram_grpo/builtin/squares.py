"""The offline vision task: count the coloured squares in a picture.

Every prompt has the same text ("how many squares?"): the answer is only in the image, a 2 x 2
grid of cells of which 1 to 4 hold a red square. So a model can only earn the reward by
looking, and the same run with the images blanked (`builtin:squares-blank`, the same answers
with white pictures) cannot learn anything but the most common count: the demo's control.
Generated on the fly, nothing downloaded; one grid cell is one vision token of the tiny model.
"""

from __future__ import annotations

import random

PROMPT = "how many squares?"
IMAGE_SIZE = 56  # the tiny Qwen2.5-VL's 2 x 2 grid of merged 28-pixel patches
SQUARE_COLOUR = (220, 30, 30)


def squares_image(cells: list[int], colour: tuple[int, int, int] = SQUARE_COLOUR, size: int = IMAGE_SIZE):
    """A white picture with a square of `colour` in each of `cells` (0..3, row by row)."""
    from PIL import Image

    image = Image.new("RGB", (size, size), (255, 255, 255))
    half = size // 2
    margin = half // 6
    for cell in cells:
        x, y = (cell % 2) * half, (cell // 2) * half
        image.paste(Image.new("RGB", (half - 2 * margin, half - 2 * margin), colour), (x + margin, y + margin))
    return image


def squares_rows(num_rows: int = 400, seed: int = 0, blank: bool = False) -> list[dict]:
    """`num_rows` pictures with 1-4 squares (each count equally often) and their counts; with
    `blank`, the same rows with white pictures."""
    from PIL import Image

    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        count = rng.randint(1, 4)
        cells = rng.sample(range(4), count)
        image = squares_image(cells)
        if blank:
            image = Image.new("RGB", image.size, (255, 255, 255))
        rows.append({"prompt": PROMPT, "image": image, "answer": str(count)})
    return rows
