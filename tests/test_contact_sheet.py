"""Contact sheet geometry and marking, without a model."""

from __future__ import annotations

import numpy as np
import pytest

from cosmos_train.contact_sheet import (BORDER, CONDITION_COLOUR, FRAME_COLOUR, HEADER_H, LABEL_H, cell_size,
                                        contact_sheet, sheet_columns, sheet_size, write_png)


def test_columns_are_evenly_spaced_and_include_both_ends():
    assert sheet_columns(13, 5) == [0, 3, 6, 9, 12]
    assert sheet_columns(93, 8) == [0, 13, 26, 39, 53, 66, 79, 92]
    assert sheet_columns(5, 8) == [0, 1, 2, 3, 4]  # fewer frames than columns: every frame
    assert sheet_columns(1, 8) == [0]
    with pytest.raises(ValueError):
        sheet_columns(0, 4)


def test_cells_grow_small_frames_and_shrink_large_ones():
    assert cell_size(16, 16) == (64, 64)  # x4, nearest
    assert cell_size(16, 24) == (64, 96)
    assert cell_size(100, 200) == (100, 200)
    assert cell_size(704, 1280) == (256, 465)  # 720p-class frames shrink to 256 rows


def test_sheet_marks_the_condition_frames(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(f"s{i}", rng.integers(0, 255, (4, 32, 48, 3), dtype=np.uint8)) for i in range(3)]
    image = contact_sheet(rows, [0, 4, 8, 12], condition_frames=5)  # 2 latent frames -> pixel frames 0..4
    ch, cw = cell_size(32, 48)
    assert image.size == sheet_size(3, 4, 32, 48) == (4 * (cw + 2 * BORDER), HEADER_H + 3 * (LABEL_H + ch + 2 * BORDER))
    px = np.asarray(image)
    y = HEADER_H + LABEL_H  # the top border row of the first row of cells
    step = cw + 2 * BORDER
    assert [tuple(px[y, c * step + 1]) for c in range(4)] == [CONDITION_COLOUR, CONDITION_COLOUR,
                                                               FRAME_COLOUR, FRAME_COLOUR]
    # the frame itself is pasted inside the border, unchanged (integer enlargement)
    assert np.array_equal(px[y + BORDER, BORDER + cw - 1], rows[0][1][0, 31 * 0, 47])
    out = write_png(image, tmp_path / "s.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*"))
    with pytest.raises(ValueError, match="row 'bad'"):
        contact_sheet([("bad", rows[0][1][:2])], [0, 4, 8, 12], condition_frames=1)
