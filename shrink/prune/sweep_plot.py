"""The pictures of a sweep: sweep.png (matplotlib, Agg, no pyplot state) and sweep.html (plotly, the
library inlined so the file opens offline). Both show measured speedup on x, the sweep's quality
figure on y, one marker and colour per recipe, each point labelled with its target, the original at
1.0x, and the Pareto frontier as a step line through its highlighted points.

`view` is shrink.prune.sweep.plot_rows(document): {"model", "metric", "rows", "plotted"}, each plotted
row with "speedup", "y", "frontier", "recipe", "target" and its figures.
"""

from __future__ import annotations

import io
from html import escape

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
PLOTLY_MARKERS = ["circle", "square", "triangle-up", "diamond", "triangle-down", "cross", "x", "triangle-left", "triangle-right", "hexagon"]
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
X_LABEL = "measured speedup over the original (ONNX Runtime p50, b=1, s=128, 1 thread)"


def write_plots(view: dict, png_path, html_path, write) -> str | None:
    """Write both files with `write(path, bytes_or_text)`; returns the missing library's name, if any."""
    missing = []
    try:
        write(png_path, png(view))
    except ImportError:
        missing.append("matplotlib")
    try:
        write(html_path, html(view))
    except ImportError:
        missing.append("plotly")
    return " and ".join(missing) or None


def _groups(view: dict) -> list[tuple[str, list[dict]]]:
    """(recipe, its plotted points) in order of first appearance, the original excluded."""
    groups: dict[str, list[dict]] = {}
    for row in view["plotted"]:
        if row.get("source") != "original":
            groups.setdefault(row["recipe"], []).append(row)
    return list(groups.items())


def _steps(view: dict) -> tuple[list[float], list[float]]:
    """The frontier by speedup: for any speedup x, the best quality of a point at least that fast."""
    points = sorted((r["speedup"], r["y"]) for r in view["plotted"] if r["frontier"])
    return [p[0] for p in points], [p[1] for p in points]


def _label(row: dict) -> str:
    """The point's annotation: its target ("target 1.5x", "heads_fraction=0.3"); none for a measured row."""
    target = row["target"]
    if target in ("-", "as written"):
        return "" if target == "-" else target
    return target if "=" in target else f"target {target}"


def _ylabel(view: dict) -> str:
    return f"held-out {view['metric']}" if view["metric"] else "quality"


def png(view: dict) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(9, 6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs, ys = _steps(view)
    if xs:
        ax.step(xs, ys, where="pre", color="#444444", linewidth=1.2, alpha=0.8, zorder=1, label="Pareto frontier")
    for index, (recipe, rows) in enumerate(_groups(view)):
        colour, marker = COLOURS[index % len(COLOURS)], MARKERS[index % len(MARKERS)]
        ax.scatter([r["speedup"] for r in rows], [r["y"] for r in rows], s=55, color=colour, marker=marker, zorder=3, label=recipe)
        for k, r in enumerate(rows):
            ax.annotate(_label(r), (r["speedup"], r["y"]), textcoords="offset points", xytext=(7, 5 if k % 2 == 0 else -11),
                        fontsize=8, color=colour)
    original = [r for r in view["plotted"] if r.get("source") == "original"]
    if original:
        ax.scatter([1.0], [original[0]["y"]], s=160, marker="*", color="black", zorder=4, label="original (1.0x)")
    on = [r for r in view["plotted"] if r["frontier"]]
    if on:
        ax.scatter([r["speedup"] for r in on], [r["y"] for r in on], s=190, facecolors="none", edgecolors="#222222",
                   linewidths=1.5, zorder=2, label="on the frontier")
    if view["plotted"]:
        lo, hi = min(r["y"] for r in view["plotted"]), max(r["y"] for r in view["plotted"])
        pad = (hi - lo) * 0.08 or 0.01
        ax.set_ylim(lo - pad, hi + pad)
        left, right = min(r["speedup"] for r in view["plotted"]), max(r["speedup"] for r in view["plotted"])
        ax.set_xlim(min(left, 1.0) - 0.05 * max(right - left, 0.2), right + 0.12 * max(right - left, 0.2))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(_ylabel(view))
    ax.set_title(f"shrink sweep: {view['model']} ({len(view['plotted']) - len(original)} points)")
    ax.grid(True, alpha=0.3)
    ax.ticklabel_format(axis="y", useOffset=False)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _hover(row: dict, metric: str | None) -> str:
    lines = [f"<b>{escape(row['recipe'])}</b> at {escape(row['target'])}", f"speedup {row['speedup']:.3f}x"]
    if row.get("target_set"):
        lines.append("target set: " + ", ".join(f"{k} {v}" for k, v in row["target_set"].items()))
    for key, value in (row.get("quality") or {}).items():
        if isinstance(value, float):
            lines.append(f"{'<b>' + key + '</b>' if key == metric else key}: {value:.4f}")
    for key, label in (("params_total", "params"), ("gflops_s128", "GFLOPs (s=128)"), ("seconds", "seconds"), ("checkpoint", "checkpoint"),
                       ("model", "model"), ("cell", "measured")):
        value = row.get(key)
        if value is not None:
            lines.append(f"{label}: {value / 1e6:.2f}M" if key == "params_total" else f"{label}: {escape(str(value))}")
    if row["frontier"]:
        lines.append("on the Pareto frontier")
    return "<br>".join(lines)


def html(view: dict) -> str:
    import plotly.graph_objects as go

    fig = go.Figure()
    xs, ys = _steps(view)
    if xs:
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"shape": "vh", "color": "#444444", "width": 1.5},
                                 name="Pareto frontier", hoverinfo="skip"))
    on = [r for r in view["plotted"] if r["frontier"]]
    if on:
        fig.add_trace(go.Scatter(x=[r["speedup"] for r in on], y=[r["y"] for r in on], mode="markers", name="on the frontier",
                                 marker={"size": 20, "color": "rgba(0,0,0,0)", "line": {"color": "#222222", "width": 2}}, hoverinfo="skip"))
    for index, (recipe, rows) in enumerate(_groups(view)):
        fig.add_trace(go.Scatter(
            x=[r["speedup"] for r in rows], y=[r["y"] for r in rows], mode="markers+text", name=escape(recipe),
            text=[escape(_label(r)) for r in rows], textposition="top right",
            marker={"size": 11, "color": COLOURS[index % len(COLOURS)], "symbol": PLOTLY_MARKERS[index % len(PLOTLY_MARKERS)]},
            textfont={"color": COLOURS[index % len(COLOURS)]},
            hovertext=[_hover(r, view["metric"]) for r in rows], hoverinfo="text",
        ))
    for row in (r for r in view["plotted"] if r.get("source") == "original"):
        fig.add_trace(go.Scatter(x=[1.0], y=[row["y"]], mode="markers+text", name="original (1.0x)", text=["original"],
                                 textposition="bottom right", marker={"size": 16, "symbol": "star", "color": "black"},
                                 hovertext=[_hover(row, view["metric"])], hoverinfo="text"))
    fig.update_layout(title=f"shrink sweep: {view['model']}", xaxis_title=X_LABEL, yaxis_title=_ylabel(view),
                      template="plotly_white", hoverlabel={"align": "left"})
    fig.update_xaxes(ticksuffix="x")
    return fig.to_html(include_plotlyjs=True, full_html=True)
