"""Seams: is an image's gradient energy across tile borders the same as everywhere else?"""

from __future__ import annotations

import numpy as np


def seam_ratio(image: np.ndarray, borders_x: list[int], borders_y: list[int], period: int = 1) -> float:
    """Mean squared RGB step across the given pixel boundaries (x: between columns x-1 and x; y: rows) over the
    mean squared step across the other boundaries at the same phase of `period` (a latent decoder's factor:
    its output has a texture of that period, and tile borders lie on its grid): about 1.0 when the borders
    cannot be told apart, well above 1 where tiles were pasted side by side."""
    pixels = image.astype(np.float64)
    across_columns = ((pixels[:, 1:] - pixels[:, :-1]) ** 2).sum(-1)  # (H, W-1): boundary x sits at index x-1
    across_rows = ((pixels[1:] - pixels[:-1]) ** 2).sum(-1)
    at_x = np.zeros(across_columns.shape[1], bool)
    at_x[[x - 1 for x in borders_x if 0 < x < pixels.shape[1]]] = True
    at_y = np.zeros(across_rows.shape[0], bool)
    at_y[[y - 1 for y in borders_y if 0 < y < pixels.shape[0]]] = True
    phase_x = (np.arange(1, pixels.shape[1]) % period)[:, None] == np.asarray(borders_x)[None] % period
    phase_y = (np.arange(1, pixels.shape[0]) % period)[:, None] == np.asarray(borders_y)[None] % period
    in_x, in_y = phase_x.any(1) & ~at_x, phase_y.any(1) & ~at_y
    border = np.concatenate([across_columns[:, at_x].ravel(), across_rows[at_y].ravel()])
    inside = np.concatenate([across_columns[:, in_x].ravel(), across_rows[in_y].ravel()])
    if not border.size or not inside.size:
        raise ValueError("seam_ratio needs boundaries both at and away from the borders")
    return float(border.mean() / inside.mean())
