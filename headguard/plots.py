"""PNG curves for the faces (`headguard check --plots DIR`, the write-ups in docs/): the harness's one plotting module.

Each named series gets its own panel, all panels share the step axis: a training canary's curves (each loss item,
the gradient norm, the range of BatchNorm statistics) have unrelated scales, so one shared y axis would flatten all
but the largest. Non-finite values are drawn as gaps and marked (a red x on the panel's bottom edge, and a legend
entry naming the steps), because a NaN that vanished from a plot is exactly what these plots are for.

matplotlib is an optional extra, `pip install 'headguard[plots]'`: it is imported only when a figure is drawn, and
used through its object API (`Figure` with the Agg canvas), so pyplot's global state and the backend are untouched.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["INSTALL_HINT", "PlotsUnavailableError", "curves_figure", "require_matplotlib", "write_curves"]

INSTALL_HINT = "pip install 'headguard[plots]'"
_PANEL_HEIGHT_IN = 1.7
_MAX_STEPS_NAMED = 6  # steps listed in a panel's non-finite legend entry before it says "and N more"


class PlotsUnavailableError(ImportError):
    """matplotlib, the optional extra that draws PNGs, is not installed."""


def write_curves(
    path: str | os.PathLike,
    curves: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str = "step",
    log_scale: Collection[str] = (),
    dpi: int = 100,
) -> Path:
    """Draw `curves` (name -> one value per step) as stacked panels and write them to `path` (a .png) as PNG.

    `log_scale` names the series drawn on a logarithmic y axis (their finite values must be > 0). The PNG's text
    chunks hold the title and the series names. Parent directories are created. Returns the path written."""
    target = _png_path(path)
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi <= 0:
        raise ValueError(f"Expected an int dpi > 0, got dpi={dpi!r}")
    figure = curves_figure(curves, title=title, xlabel=xlabel, log_scale=log_scale)
    target.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"Title": title, "Description": "series: " + ", ".join(curves)}
    figure.savefig(target, format="png", dpi=dpi, metadata=metadata)
    return target


def curves_figure(
    curves: Mapping[str, Sequence[float]], *, title: str, xlabel: str = "step", log_scale: Collection[str] = ()
) -> Any:
    """The `matplotlib.figure.Figure` that `write_curves` saves: one panel per series, titled with its name."""
    series = _validated_curves(curves)
    _check_text("title", title)
    _check_text("xlabel", xlabel)
    logs = _validated_log_scale(log_scale, series)
    figure_cls, canvas_cls, integer_locator = _matplotlib()
    figure = figure_cls(figsize=(7.0, 0.9 + _PANEL_HEIGHT_IN * len(series)), layout="constrained")
    canvas_cls(figure)  # attaches the Agg canvas: rendering never consults pyplot or the configured backend
    axes = figure.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, values) in zip(axes, series.items()):
        _draw_series(ax, name, values, log=name in logs)
    axes[-1].set_xlabel(xlabel)
    axes[-1].xaxis.set_major_locator(integer_locator(integer=True))  # steps are whole numbers
    figure.suptitle(title)
    return figure


def _draw_series(ax, name: str, values: list[float], *, log: bool) -> None:
    steps = range(len(values))
    # Non-finite values become NaN, which matplotlib draws as a gap in the line (an inf would wreck the y limits).
    ax.plot(steps, [v if math.isfinite(v) else math.nan for v in values], marker=".", markersize=4, linewidth=1.2)
    ax.set_title(name, loc="left", fontsize=9)
    ax.grid(True, alpha=0.3)
    if log:
        ax.set_yscale("log")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        # x in data units, y in axes units: the marks sit on the panel's bottom edge whatever the y range.
        ax.plot(bad, [0.0] * len(bad), linestyle="none", marker="x", color="tab:red", markersize=7, clip_on=False,
                transform=ax.get_xaxis_transform(), label=_nonfinite_label(bad))
        ax.legend(loc="upper right", fontsize=8)


def _nonfinite_label(bad: list[int]) -> str:
    shown = ", ".join(str(i) for i in bad[:_MAX_STEPS_NAMED])
    more = f" and {len(bad) - _MAX_STEPS_NAMED} more" if len(bad) > _MAX_STEPS_NAMED else ""
    return f"non-finite (gap) at step{'s' if len(bad) > 1 else ''} {shown}{more}"


def require_matplotlib() -> None:
    """Raise PlotsUnavailableError (with the install hint) now, when a face is asked for plots it cannot draw."""
    _matplotlib()


def _matplotlib():
    """(Figure, FigureCanvasAgg, MaxNLocator), or a PlotsUnavailableError that says how to install the extra."""
    try:
        import matplotlib  # noqa: F401  (the optional extra; a missing one fails here with the hint below)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as err:
        raise PlotsUnavailableError(
            f"drawing PNG curves needs matplotlib, which is not installed ({err}); install the extra with "
            f"{INSTALL_HINT}"
        ) from err
    return Figure, FigureCanvasAgg, MaxNLocator


# -------------------------------------------------------------------------------------------------- validation
def _png_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected a str or os.PathLike for path, got path={path!r} (type={type(path).__name__})")
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"Expected a path ending in .png (the file is written as PNG), got path={str(target)!r}")
    return target


def _check_text(name: str, value) -> None:
    if not isinstance(value, str):
        raise TypeError(f"Expected str for {name}, got {name}={value!r} (type={type(value).__name__})")


def _validated_curves(curves) -> dict[str, list[float]]:
    if not isinstance(curves, Mapping):
        raise TypeError(
            f"Expected a mapping of series name -> values for curves, got type={type(curves).__name__}"
        )
    if not curves:
        raise ValueError("Expected at least one series in curves, got an empty mapping")
    return {_series_name(name): _series_values(name, values) for name, values in curves.items()}


def _series_name(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"Expected a non-empty str for every series name in curves, got {name!r}")
    return name


def _series_values(name: str, values) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(
            f"Expected a sequence of numbers for curves[{name!r}], got type={type(values).__name__}"
            + (" (a tensor or array: pass .tolist())" if hasattr(values, "tolist") else "")
        )
    if not values:
        raise ValueError(f"Expected at least one value in curves[{name!r}], got an empty sequence")
    for step, value in enumerate(values):
        # bool is an int subclass, but a True/False flag drawn as 1/0 is a plot of the wrong thing.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"Expected a real number at curves[{name!r}][{step}], got {value!r} (type={type(value).__name__})"
            )
    return [float(v) for v in values]


def _validated_log_scale(log_scale, series: Mapping[str, list[float]]) -> frozenset[str]:
    if isinstance(log_scale, str) or not isinstance(log_scale, Collection):
        raise TypeError(f"Expected a collection of series names for log_scale, got log_scale={log_scale!r}")
    unknown = [n for n in log_scale if n not in series]
    if unknown:
        raise ValueError(f"Expected log_scale to name series of curves {list(series)}, got unknown {unknown}")
    for name in log_scale:
        nonpositive = [i for i, v in enumerate(series[name]) if math.isfinite(v) and v <= 0]
        if nonpositive:
            raise ValueError(
                f"Expected values > 0 in curves[{name!r}] (drawn on a log scale), got "
                f"{series[name][nonpositive[0]]!r} at step {nonpositive[0]}"
            )
    return frozenset(log_scale)
