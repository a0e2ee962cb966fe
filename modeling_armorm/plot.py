# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""A score's explanation as a horizontal bar chart: one bar per objective, its contribution c_i r_i to the score.

matplotlib is needed here only (`pip install "armorm[plot]"`); the chart is a `matplotlib.figure.Figure`, drawn
without pyplot, so it needs no display and leaves no global state behind.
"""

import os

from .explanation import Explanation


__all__ = ["plot_explanation"]

POSITIVE, NEGATIVE = "#2a9d5c", "#d1495b"


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plot_explanation draws with matplotlib, which is not installed: pip install matplotlib (or "
            '"armorm[plot]").'
        ) from None
    return Figure


def plot_explanation(explanation: Explanation, path: str | os.PathLike | None = None, *, title: str | None = None):
    """Draw `explanation`'s contributions, largest |contribution| on top, green when it raises the score and red when
    it lowers it; each bar is labelled `reward × coefficient = contribution`.

    Args:
        explanation: what `ArmoRMPipeline.explain` returns.
        path: where to save the chart; the format follows the suffix (`.png`, `.svg`, `.pdf`, ...).
        title: the chart's title (default: the score).

    Returns:
        the `matplotlib.figure.Figure`.
    """
    objectives = explanation.objectives
    if not objectives:
        raise ValueError("The explanation holds no objective to draw.")
    figure = _figure_class()(figsize=(8, 1.2 + 0.42 * len(objectives)), layout="constrained")
    axes = figure.add_subplot()
    # Top to bottom in the explanation's order (largest |contribution| first).
    rows = list(range(len(objectives)))[::-1]
    values = [o.contribution for o in objectives]
    axes.barh(rows, values, color=[POSITIVE if v >= 0 else NEGATIVE for v in values], height=0.65)
    axes.set_yticks(rows, [o.name for o in objectives])
    axes.axvline(0, color="#444444", linewidth=0.8)
    labels = [f"{o.reward:.3f} × {o.coefficient:+.3f} = {o.contribution:+.3f}" for o in objectives]
    for row, value, label in zip(rows, values, labels):
        axes.annotate(
            label,
            (value, row),
            xytext=(4 if value >= 0 else -4, 0),
            textcoords="offset points",
            ha="left" if value >= 0 else "right",
            va="center",
            fontsize=8,
        )
    # Room on both sides for the labels.
    low, high = min(0.0, *values), max(0.0, *values)
    span = (high - low) or 1.0
    axes.set_xlim(low - (0.45 if low < 0 else 0.02) * span, high + (0.45 if high > 0 else 0.02) * span)
    axes.set_xlabel("contribution to the score  (reward r_i × coefficient c_i, c = g Tᵀ)")
    axes.set_title(title if title is not None else f"score {explanation.score:+.3f} (the sum of the bars)")
    axes.spines[["top", "right"]].set_visible(False)
    if path is not None:
        figure.savefig(path, dpi=150)
    return figure
