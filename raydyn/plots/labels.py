"""What every raydyn figure shares: readable axis names and the figure formats it writes.

One table of readable names (with units or the usual symbol where there is one), used for
the axis labels of phase maps and curve plots; any other column reads as its name with
underscores as spaces.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from raydyn.errors import RaydynError

__all__ = ["READABLE", "readable", "FIGURE_FORMATS", "figure_format", "save_figure", "fmt_value", "fmt_tick"]

#: Readable names of common columns (swept parameters, metrics), with units or symbols.
READABLE: dict[str, str] = {
    "lr": "learning rate η",
    "width": "width (units per layer)",
    "depth": "depth (layers)",
    "batch_size": "batch size",
    "seed": "seed",
    "weight_decay": "weight decay λ",
    "momentum": "momentum β",
    "beta1": "Adam β₁",
    "beta2": "Adam β₂",
    "init_scale": "initialisation scale",
    "steps": "training steps",
    "step": "step",
    "heads": "attention heads",
    "data_n_train": "training examples",
    "data_noise": "label noise",
    "data_p": "modulus p",
}

#: Figure formats by file suffix (matplotlib's format names).
FIGURE_FORMATS: dict[str, str] = {".png": "png", ".pdf": "pdf", ".svg": "svg"}


def fig_png(fig: Any, tight: bool = True) -> bytes:
    """A matplotlib figure as PNG bytes (90 dpi), closing it; for report sections."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(fig)
    return buf.getvalue()


def readable(name: str) -> str:
    """The readable name of a column: from :data:`READABLE`, else ``data.p``/``data_p`` -> ``data p``."""
    key = name.replace(".", "_")
    return READABLE.get(key) or READABLE.get(name) or key.replace("_", " ")


def figure_format(path: str | Path, option: str = "--out") -> str:
    """The figure format of ``path`` from its suffix (png, pdf, svg); anything else is a RaydynError."""
    suffix = Path(path).suffix.lower()
    if suffix not in FIGURE_FORMATS:
        what = f"suffix {suffix!r}" if suffix else "no suffix"
        raise RaydynError(f"{option} {str(path)!r}: {what}; a figure is written as .png, .pdf or .svg "
                          "(the format follows the suffix)")
    return FIGURE_FORMATS[suffix]


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` in the format of its suffix (checked first), then close it; returns the path."""
    import matplotlib.pyplot as plt

    fmt = figure_format(path)
    if dpi <= 0:
        raise RaydynError(f"--dpi {dpi}: must be a positive number of dots per inch")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=dpi, format=fmt)
    finally:
        plt.close(fig)
    return path


def fmt_value(v: Any) -> str:
    """An axis or group value as a short label: numbers with %g, anything else as text."""
    if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)):
        return f"{v:g}"
    return str(v)


def fmt_tick(v: Any) -> str:
    """A tick label: whole numbers in full (1024), others to 3 significant digits (0.000464)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e6:
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.3g}"
    return fmt_value(v)


def text_color_on(rgb: Any) -> str:
    """Black or white, whichever reads on a cell of colour ``rgb`` (Rec. 601 luminance below 0.5: white)."""
    return "white" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5 else "black"


def grid_axes(ax: Any, x_edges: Any, y_edges: Any, x_log: bool, y_log: bool, xticks: tuple[Any, list[str]],
              yticks: tuple[Any, list[str]]) -> None:
    """One heat-map panel's axes: log scales where the values are log-spaced, limits at the outer cell edges,
    ticks at the given cell centres with their labels, no minor ticks (phase maps and category maps)."""
    if x_log:
        ax.set_xscale("log")
    if y_log:
        ax.set_yscale("log")
    ax.set_xlim(x_edges[0], x_edges[-1])
    ax.set_ylim(y_edges[0], y_edges[-1])
    ax.set_xticks(*xticks)
    ax.set_yticks(*yticks)
    ax.minorticks_off()
