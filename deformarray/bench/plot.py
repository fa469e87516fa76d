"""``deformarray bench --plot FILE``: the report as a grouped bar chart.

One group of bars per result row: forward and forward+backward time of ours and of every
reference measured for that row (a reference the row lacks takes no room; a contender that
failed leaves an empty slot labelled "error"). Times are in ms on a log axis rather than ratios to the floor: the
rows span four orders of magnitude (a launch-bound RoI row against a detection-size
convolution), and a ratio would leave the rows without a reference (CPU RoI rows without
torchvision) with no bar at all; on a log axis the gap between two bars *is* the ratio.

Pure: ``check_target(path)`` says up front why a path cannot work, ``plot_report(report,
path)`` writes the file and returns the Figure. matplotlib is imported inside the functions
only, and only its Agg canvas (no pyplot: no global state, no GUI backend).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, NamedTuple

from . import common, registry

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# contender key of a row -> (legend name, (fwd colour, fwd+bwd colour)): one hue per
# contender, light = forward, dark = forward+backward (matplotlib's tab20 pairs)
CONTENDERS = {
    "ours": ("deformarray", ("#aec7e8", "#1f77b4")),
    "torchvision": ("torchvision", ("#98df8a", "#2ca02c")),
    "dense": ("dense", ("#c7c7c7", "#7f7f7f")),
    "composition": ("torch", ("#ffbb78", "#ff7f0e")),
}
PHASES = (("fwd", "fwd"), ("fwdbwd", "fwd+bwd"))


class Chart(NamedTuple):
    labels: list[str]  # one per group (result row)
    members: list[list[str]]  # per group, the contenders measured in that row (failed ones included)
    series: dict[tuple[str, str], list[float | None]]  # (contender, phase) -> ms per group; None: no bar
    legend: dict[str, str]  # contender -> legend name
    errors: list[list[str]]  # per group, the contenders that failed (their untimed slots say "error")


def plot_format(path: str) -> str:
    """The image format ``path`` asks for: its extension, PNG without one."""
    return os.path.splitext(path)[1].lstrip(".").lower() or "png"


def check_target(path: str) -> str | None:
    """Why ``--plot path`` cannot work, as one line, or None. Run it before the benchmark:
    finding out after minutes of timing that the chart cannot be drawn or written is worse."""
    if not path:
        return "--plot needs a file name"
    for module in ("matplotlib", "matplotlib.backends.backend_agg"):
        mod, reason = common.optional_import(module)
        if mod is None:  # "not installed" or "not importable (ImportError: ...)"
            return (
                f"--plot needs matplotlib, which is {reason.removeprefix(module + ' ')}: "
                'pip install "deformarray[plot]" (or pip install matplotlib)'
            )
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fmt = plot_format(path)
    if fmt not in FigureCanvasAgg.get_supported_filetypes():
        return f"--plot {path}: unknown image format '.{fmt}' (use .png, .svg or .pdf)"
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"--plot {path}: directory {directory} does not exist"
    if os.path.isdir(path):
        return f"--plot {path}: is a directory"
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):  # appends nothing: an existing file is left as it is
            pass
    except OSError as exc:
        return f"--plot {path}: cannot write ({exc.strerror or common.one_line(exc)})"
    if not existed:
        with contextlib.suppress(OSError):
            os.remove(path)
    return None


def group_label(row: dict) -> str:
    """``op [variant] / shape / device dtype`` on three short lines."""
    op, shape = registry.family_of(row).chart_label(row)
    device = "GPU" if row["backend"] == "cupy" else "CPU"
    return f"{op}\n{shape}\n{device} {row['dtype'].replace('float', 'f')}"


def chart_data(report: dict) -> Chart:
    """Bars of the report: per row, the contenders it has and those that failed; per
    contender and phase, a time or None (absent from the row, or not timed)."""
    rows = report["results"]
    present = [name for name in CONTENDERS if any(name in row for row in rows)]
    series: dict[tuple[str, str], list[float | None]] = {
        (name, phase): [row.get(name, {}).get(f"{phase}_ms") for row in rows] for phase, _ in PHASES for name in present
    }
    legend = {}
    for name in present:
        # reference labels name the operator and its version: keep the operator ("conv2d", "roi_align(...)")
        labels = sorted({row[name]["label"].split(" (")[0].rsplit(".", 1)[-1] for row in rows if name in row})
        legend[name] = CONTENDERS[name][0] + ("" if name == "ours" else f" {', '.join(labels)}")
    members = [[name for name in present if name in row] for row in rows]
    errors = [[name for name in present if "error" in row.get(name, {})] for row in rows]
    return Chart([group_label(row) for row in rows], members, series, legend, errors)


def _title(report: dict) -> str:
    env, rows = report.get("environment", {}), report["results"]
    repeat = report.get("settings", {}).get("repeat")
    head = f"deformarray {env.get('deformarray', '')} bench: time per call"
    head += f", median of {repeat} interleaved runs" if repeat else ""
    where = []
    if any(row["backend"] == "numpy" for row in rows):
        threads = env.get("threads", {}).get("numba")
        cpu = "CPU" + (f", {threads} threads" if threads else "")
        cpu += f", torch {env['torch']}" if env.get("torch") else ""
        load = env.get("other_cpu_load")
        cpu += f" (other processes used {load:.0%} of the CPUs: inflated)" if load and load > 0.1 else ""
        where.append(cpu)
    if any(row["backend"] == "cupy" for row in rows):
        where.append(f"GPU: {env.get('gpu') or 'unknown'}")
    return head + ("\n" + "; ".join(where) if where else "")


def plot_report(report: dict, path: str) -> Figure:
    """Draw the report's chart, save it to ``path`` (format from the extension, PNG by
    default) and return the Figure: its axes hold one bar per measured time, and an
    "error" label where a contender of a row failed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter
    from matplotlib.transforms import blended_transform_factory

    chart = chart_data(report)
    rows, groups = report["results"], len(chart.labels)
    most = max((len(m) for m in chart.members), default=1)
    width = 0.84 / (2 * most + 0.5)  # the widest group: its fwd bars, half a bar of gap, its fwd+bwd bars
    fig = Figure(figsize=(max(4.5, groups * max(0.95, 0.25 * most + 0.3)) + 3.6, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_yscale("log")
    on_axis = blended_transform_factory(ax.transData, ax.transAxes)  # x in groups, y in axes
    bars: dict[tuple[str, str], list[tuple[float, float]]] = {slot: [] for slot in chart.series}
    for i, names in enumerate(chart.members):
        # each group is packed and centred: a reference missing from a row leaves no hole
        slots = [(name, phase) for phase, _ in PHASES for name in names]
        for k, slot in enumerate(slots):
            x = i + (k + 0.5 * (k >= len(names)) - (len(slots) - 0.5) / 2) * width
            t = chart.series[slot][i]
            if t:
                bars[slot].append((x, t))
            elif slot[0] in chart.errors[i]:  # in the row but not timed: it failed
                ax.text(x, 0.02, "error", transform=on_axis, rotation=90, ha="center", va="bottom", color="#d62728")
    for (name, phase), xy in bars.items():
        if not xy:  # e.g. a reference that failed in every row: no legend entry without a bar
            continue
        label = f"{dict(PHASES)[phase]}: {chart.legend[name]}"
        colour = CONTENDERS[name][1][phase == "fwdbwd"]
        ax.bar([x for x, _ in xy], [t for _, t in xy], width, color=colour, label=label)
    times = [t for xy in bars.values() for _, t in xy]
    if times:
        ax.set_ylim(min(times) / 2, max(times) * 2)
    section = [(registry.family_of(row).NAME, row["backend"]) for row in rows]
    for i in range(1, groups):  # a faint line where the operator family or the device changes
        if section[i] != section[i - 1]:
            ax.axvline(i - 0.5, color="#999999", linestyle=":", linewidth=1)
    ax.set_xticks(range(groups), chart.labels, fontsize=7)
    ax.set_xlim(-0.5, groups - 0.5)
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.5, 20, 300 rather than 5x10^-1 ...
    ax.yaxis.set_major_formatter(plain)
    # label the 2..9 ticks too when the times span under 25x (the axis may then hold a single power of ten)
    ax.yaxis.set_minor_formatter(plain if times and max(times) / min(times) < 25 else NullFormatter())
    ax.tick_params(axis="y", which="both", labelsize=8)
    ax.set_ylabel("ms per call (log scale; lower is better)")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(_title(report), fontsize=9)
    if times:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.savefig(path, format=plot_format(path), dpi=110)
    return fig
