"""Exact IoU of two convex polygons by Sutherland-Hodgman clipping: the oracle of the shape-loss checks (and of our
tests), in numpy float64, one pair at a time.

Polygons are (V, 2) arrays of vertices in order, either direction. Speed does not matter here; readability does.
"""

from __future__ import annotations

import numpy as np


def signed_area(polygon: np.ndarray) -> float:
    """Shoelace area: positive for counter-clockwise order in a y-up frame."""
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * float(x @ np.roll(y, -1) - np.roll(x, -1) @ y)


def _counter_clockwise(polygon: np.ndarray) -> np.ndarray:
    return polygon if signed_area(polygon) >= 0 else polygon[::-1]


def _side(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> float:
    """Positive when p is left of the directed line a -> b (inside, for a counter-clockwise clipper)."""
    return float((b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]))


def _clip_by_edge(subject: list[np.ndarray], a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    out = []
    for i, current in enumerate(subject):
        previous = subject[i - 1]
        s_cur, s_prev = _side(a, b, current), _side(a, b, previous)
        if (s_cur >= 0) != (s_prev >= 0):  # the edge previous -> current crosses the clip line
            out.append(previous + (s_prev / (s_prev - s_cur)) * (current - previous))
        if s_cur >= 0:
            out.append(current)
    return out


def intersection(subject: np.ndarray, clipper: np.ndarray) -> np.ndarray:
    """The convex polygon subject ∩ clipper (K, 2), counter-clockwise; K = 0 when they do not overlap."""
    clipper = _counter_clockwise(np.asarray(clipper, dtype=np.float64))
    out = list(_counter_clockwise(np.asarray(subject, dtype=np.float64)))
    for i in range(len(clipper)):
        if not out:
            break
        out = _clip_by_edge(out, clipper[i], clipper[(i + 1) % len(clipper)])
    return np.array(out).reshape(-1, 2)


def polygon_iou(p: np.ndarray, q: np.ndarray) -> float:
    """Area(p ∩ q) / area(p ∪ q) of two convex polygons with positive area."""
    a_p, a_q = abs(signed_area(np.asarray(p, dtype=np.float64))), abs(signed_area(np.asarray(q, dtype=np.float64)))
    inter = intersection(p, q)
    a_i = abs(signed_area(inter)) if len(inter) >= 3 else 0.0
    return a_i / (a_p + a_q - a_i)
