"""Learning curves at equal training time: power-law fits, where two curves would meet, and the plot.

A curve is a list of points ``{"tokens": ..., "seconds": ..., "nll": ...}`` (validation NLL per
token after so many training tokens and seconds), as
:class:`sentence_lm.trainer.LearningCurveCallback` records them during training;
``benchmarks/from_scratch.py`` and ``examples/sentence_lm_from_smollm2.py`` record them for a
SentenceLM and its token model.
"""

from __future__ import annotations

import math

AXES = (("tokens", "training tokens"), ("seconds", "training seconds"))


def power_law(points: list[dict], key: str) -> dict | None:
    """``NLL = a * x ** -b`` fitted by least squares in log-log space on the points with ``x > 0``
    (``None`` with fewer than two)."""
    xs = [(math.log(p[key]), math.log(p["nll"])) for p in points if p.get(key, 0) > 0]
    if len(xs) < 2:
        return None
    mean_x, mean_y = sum(x for x, _ in xs) / len(xs), sum(y for _, y in xs) / len(xs)
    var = sum((x - mean_x) ** 2 for x, _ in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in xs) / var if var else 0.0
    return {"a": math.exp(mean_y - slope * mean_x), "b": -slope, "points": len(xs)}


def meeting(fit_1: dict | None, fit_2: dict | None, budget: float) -> dict:
    """Where two power laws cross (``x``, if past ``budget``; else ``None``; ``math.inf`` when
    their exponents are so close that the crossing lies beyond any float), and their gap (first
    minus second) at ten times ``budget``; ``{}`` when a fit is missing."""
    if not fit_1 or not fit_2:
        return {}
    at = lambda fit, x: fit["a"] * x ** -fit["b"]  # noqa: E731
    result = {"gap_at_10x": at(fit_1, 10 * budget) - at(fit_2, 10 * budget), "ten_times": 10 * budget}
    if fit_1["b"] != fit_2["b"]:
        # In logs: (a1 / a2) ** (1 / (b1 - b2)) overflows when the exponents nearly agree.
        log_cross = math.log(fit_1["a"] / fit_2["a"]) / (fit_1["b"] - fit_2["b"])
        cross = math.exp(log_cross) if log_cross < math.log(2.0**1000) else math.inf
        result["cross"] = cross if cross > budget else None
    return result


def fit_text(fit: dict | None) -> str:
    """A fit as ``"a, b"`` for a table (``"-"`` when there is none)."""
    return f"{fit['a']:.3g}, {fit['b']:.3f}" if fit else "-"


def outlook_lines(outlook: dict, first: str, second: str) -> list[str]:
    """Markdown lines saying, per axis of ``outlook`` (``{axis: meeting(...)}``), where ``first``'s
    and ``second``'s fits meet or their gap at ten times the budget."""
    lines = []
    for axis, result in outlook.items():
        if not result:
            continue
        cross = result.get("cross")
        said = f"the fits cross at {cross:.3g} {axis}" if cross else "the fits do not cross past the budget"
        lines.append(f"- Against {axis}: {said}; at {result['ten_times']:,.0f} {axis} (10x) {first}'s NLL "
                     f"minus {second}'s is {result['gap_at_10x']:+.3f}.")
    return lines


def pyplot():
    """matplotlib's ``pyplot`` on the file-only Agg backend; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(figure, path) -> str:
    """A legend on every panel that has labels, the layout tightened, the PNG written, the
    figure closed; the path written."""
    for ax in figure.axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot().close(figure)
    return str(path)


def plot_curves(curves: dict[str, list[dict]], fits: dict[str, dict], path, ylabel: str = "validation NLL per token"):
    """Log-log plot of each labelled curve against training tokens and seconds (one panel each),
    with its power-law fit (``fits[label][axis]``) drawn to ten times its last point; ``None``
    (nothing written) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    palette = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for ax, (key, label) in zip(axes, AXES):
        for number, (name, curve) in enumerate(curves.items()):
            points = [p for p in curve if p.get(key, 0) > 0]
            if not points:
                continue
            colour = palette(number % palette.N)  # a curve and its fit share one colour
            ax.loglog([p[key] for p in points], [p["nll"] for p in points], "o-", label=name, color=colour)
            fit = fits.get(name, {}).get(key)
            if fit:
                xs = [points[0][key] * (10 * points[-1][key] / points[0][key]) ** (i / 50) for i in range(51)]
                ax.loglog(xs, [fit["a"] * x ** -fit["b"] for x in xs], "--", alpha=0.6, color=colour)
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
    return save_figure(figure, path)
