"""Label colours shared by overlays, the review page and reports (stable per label value)."""

from __future__ import annotations

# Distinct, colour-blind-friendly-ish colours (Okabe–Ito first, then tab10 extras).
PALETTE: list[tuple[int, int, int]] = [
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
    (213, 94, 0), (204, 121, 167), (148, 103, 189), (140, 86, 75), (188, 189, 34),
    (23, 190, 207), (227, 119, 194),
]


def label_color(value: int) -> tuple[int, int, int]:
    """RGB colour of a positive label value."""
    return PALETTE[(value - 1) % len(PALETTE)]


def label_colors(labels: dict[str, int]) -> dict[str, str]:
    """label name → ``#rrggbb`` for front ends."""
    return {name: "#{:02x}{:02x}{:02x}".format(*label_color(value)) for name, value in labels.items()}
