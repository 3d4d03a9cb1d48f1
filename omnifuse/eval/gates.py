"""Gate curves of a gated-fusion run (Flamingo): ``tanh(α)`` of every gate against the training step.

``FlamingoLM`` logs each gate as ``gates/layer{i}_attn`` and ``gates/layer{i}_ffn``
(:mod:`omnifuse.training.flamingo`); :func:`gate_results` turns a run's training log
(:func:`omnifuse.eval.report.read_training_log`) into ``gate_curves.png`` and the ``gates``
section of the results dict, and :func:`gate_section` into report.md's lines. A run without gate
logs (every other arm) gets neither.

The ``gates`` results section: ``{"curve": "gate_curves.png", "final": {name: value},
"max_abs": {name: value}, "step": last logged step}``, ``name`` without the ``gates/`` prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

GATE_PREFIX = "gates/"
GATE_CURVE_FILE = "gate_curves.png"
_GATE_NAME = re.compile(r"layer(\d+)_(\w+)")


def gate_curves(log: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """The gate series of a training log, ``{"layer3_attn": [(step, tanh α), …]}``, ordered by
    layer then gate kind; ``{}`` when the run logged no gates."""
    curves = {k[len(GATE_PREFIX):]: list(v) for k, v in log.items() if k.startswith(GATE_PREFIX) and v}

    def order(name: str) -> tuple[int, str]:
        m = _GATE_NAME.fullmatch(name)
        return (int(m.group(1)), m.group(2)) if m else (-1, name)

    return {k: curves[k] for k in sorted(curves, key=order)}


def plot_gate_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | Path,
                     title: str = "") -> dict[str, tuple[list[float], list[float]]]:
    """Draw every gate against the step (one colour per layer; attention solid, feed-forward
    dashed) to a PNG. Returns the data of the drawn lines, read back from the figure
    (``{name: (steps, values)}``), so that a caller can check what the picture shows."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    colours: dict[str, str] = {}
    lines = {}
    for name, series in curves.items():
        m = _GATE_NAME.fullmatch(name)
        layer, kind = (f"layer {m.group(1)}", m.group(2)) if m else (name, "")
        colour = colours.setdefault(layer, f"C{len(colours) % 10}")
        steps, values = zip(*series)
        (line,) = ax.plot(steps, values, "--" if kind == "ffn" else "-", color=colour,
                          label=f"{layer} {kind}".strip())
        lines[name] = line
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gate value tanh(α)")
    ax.set_title(title or "gates (0 = the media change nothing)")
    if lines:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(Path(path), format="png", dpi=120, bbox_inches="tight")
    return {name: ([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
            for name, line in lines.items()}


def gate_results(log: Mapping[str, Sequence[tuple[int, float]]], out_dir: str | Path, title: str = "") -> dict:
    """``{"gates": {...}}`` (module docstring) with ``gate_curves.png`` written into ``out_dir``,
    or ``{}`` when the log has no gates."""
    curves = gate_curves(log)
    if not curves:
        return {}
    plot_gate_curves(curves, Path(out_dir) / GATE_CURVE_FILE, title=title)
    return {"gates": {
        "curve": GATE_CURVE_FILE,
        "final": {k: v[-1][1] for k, v in curves.items()},
        "max_abs": {k: max(abs(x) for _, x in v) for k, v in curves.items()},
        "step": max(v[-1][0] for v in curves.values()),
    }}


def gate_section(gates: Mapping) -> list[str]:
    """report.md lines for a ``gates`` results section."""
    from omnifuse.eval.report import markdown_table

    rows = [[name, gates["final"][name], gates["max_abs"].get(name)] for name in gates["final"]]
    return [
        "## Gates (tanh α)", "",
        f"Gate values at the last logged step ({gates.get('step')}); 0 = the media change nothing. "
        "`attn`: the cross-attention output's gate, `ffn`: the feed-forward output's.", "",
        markdown_table(["gate", "final", "max |value|"], rows), "",
        f"![gate values against step]({gates['curve']})", "",
    ]
