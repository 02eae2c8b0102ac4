"""Contact sheet: one PNG with a row per sample clip and evenly spaced frames as columns.

Layout (all sizes in pixels, computed by `sheet_size` so a reader can check a file):

    HEADER_H                    frame numbers ("f0 cond", "f4", ...)
    per row: LABEL_H            the sample's name (and caption, cut to fit)
             cell + 2*BORDER    the frames, each framed by a border; the frames that were
                                given as conditioning get the CONDITION_COLOUR border

Small frames are enlarged by an integer factor (nearest) to at least MIN_CELL pixels high so a
16x16 test clip is visible; large frames are shrunk to MAX_CELL pixels high.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_CELL, MAX_CELL = 64, 256
BORDER = 3
HEADER_H = LABEL_H = 14
BACKGROUND = (24, 24, 24)
FRAME_COLOUR = (70, 70, 70)
CONDITION_COLOUR = (255, 140, 0)  # orange: the frame(s) the model was given, not generated
TEXT_COLOUR = (230, 230, 230)


def sheet_columns(num_frames: int, columns: int) -> list[int]:
    """Up to `columns` evenly spaced frame indices from 0 to num_frames - 1 (both ends included)."""
    if num_frames < 1 or columns < 1:
        raise ValueError(f"need num_frames >= 1 and columns >= 1 (got {num_frames}, {columns})")
    n = min(columns, num_frames)
    if n == 1:
        return [0]
    return sorted({round(i * (num_frames - 1) / (n - 1)) for i in range(n)})


def cell_size(height: int, width: int) -> tuple[int, int]:
    """(h, w) of one frame's cell: enlarged by an integer factor below MIN_CELL, shrunk above MAX_CELL."""
    if height < MIN_CELL:
        f = math.ceil(MIN_CELL / height)
        return height * f, width * f
    if height > MAX_CELL:
        return MAX_CELL, max(1, round(width * MAX_CELL / height))
    return height, width


def sheet_size(rows: int, columns: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) of the PNG for `rows` samples and `columns` frames of height x width."""
    ch, cw = cell_size(height, width)
    return columns * (cw + 2 * BORDER), HEADER_H + rows * (LABEL_H + ch + 2 * BORDER)


def contact_sheet(rows: list[tuple[str, np.ndarray]], frame_indices: list[int], *,
                  condition_frames: int) -> Image.Image:
    """Compose the sheet from (label, frames (N, H, W, 3) uint8) rows, N = len(frame_indices).

    `condition_frames`: pixel frames [0, condition_frames) were conditioning inputs; their
    cells are framed in CONDITION_COLOUR and their header says "cond".
    """
    if not rows:
        raise ValueError("a contact sheet needs at least one row")
    H, W = rows[0][1].shape[1:3]
    ch, cw = cell_size(H, W)
    size = sheet_size(len(rows), len(frame_indices), H, W)
    sheet = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    step = cw + 2 * BORDER
    for c, index in enumerate(frame_indices):
        cond = index < condition_frames
        draw.text((c * step + BORDER, 1), f"f{index}" + (" cond" if cond else ""),
                  fill=CONDITION_COLOUR if cond else TEXT_COLOUR, font=font)
    y = HEADER_H
    for label, frames in rows:
        if frames.shape != (len(frame_indices), H, W, 3) or frames.dtype != np.uint8:
            raise ValueError(f"row {label!r}: expected uint8 {(len(frame_indices), H, W, 3)} (got "
                             f"{frames.dtype} {frames.shape})")
        draw.text((BORDER, y + 1), label, fill=TEXT_COLOUR, font=font)
        y += LABEL_H
        for c, (index, frame) in enumerate(zip(frame_indices, frames)):
            x = c * step
            colour = CONDITION_COLOUR if index < condition_frames else FRAME_COLOUR
            draw.rectangle([x, y, x + step - 1, y + ch + 2 * BORDER - 1], fill=colour)
            image = Image.fromarray(frame)
            resample = Image.Resampling.NEAREST if ch >= H else Image.Resampling.BILINEAR
            sheet.paste(image.resize((cw, ch), resample), (x + BORDER, y + BORDER))
        y += ch + 2 * BORDER
    return sheet


def write_png(image: Image.Image, path: Path) -> Path:
    """Write atomically (temp file + rename), so a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
