"""linear on the GPU (being written).

LINEAR maps a weight format to fn(ops, x, w) -> [T, N].
"""

from __future__ import annotations

LINEAR: dict = {}
