#!/usr/bin/env python3
"""Figures for syncbn-study results and syncbn-train metrics files.

    plot_study.py DIR [--out FIGDIR]           one figure per experiment of DIR/summary.json
    plot_study.py --curves FILE... [--out FIGDIR]   training curves of --metrics files

Each figure is written as SVG and PNG. Error bars are the standard deviation over seeds.
Needs matplotlib (Debian: python3-matplotlib).
"""
import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STATISTICS = (("ema", "EMA statistics"), ("precise", "PreciseBN statistics"))


def set_scale(ax, scale):
    if scale == "log2":
        ax.set_xscale("log", base=2)
    elif scale == "log10":
        ax.set_xscale("log", base=10)


def finite(values):
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def finish(ax, panel, ylabel="held-out error (%)"):
    """The x scale and label of a panel, a y label and a light grid."""
    set_scale(ax, panel["xScale"])
    ax.set_xlabel(panel["xLabel"])
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def draw_final(ax, panel, key):
    drawn = False
    for series in panel["series"]:
        points = [p for p in series["points"] if p.get(key)]
        if not points:
            continue
        xs = [p["x"] for p in points]
        ys = [p[key]["mean"] for p in points]
        es = [p[key]["std"] for p in points]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=series["name"])
        drawn = True
    finish(ax, panel)
    return drawn


def draw_statistics(ax, panel):
    if len({p["x"] for series in panel["series"] for p in series["points"]}) == 1:
        return draw_statistics_bars(ax, panel)
    drawn = False
    for series in panel["series"]:
        for key, label in STATISTICS:
            points = [p for p in series["points"] if p.get(key)]
            if not points:
                continue
            ax.errorbar([p["x"] for p in points], [p[key]["mean"] for p in points],
                        yerr=[p[key]["std"] for p in points], marker="o", capsize=3,
                        label=f"{series['name']}, {label}")
            drawn = True
    finish(ax, panel)
    return drawn


def draw_statistics_bars(ax, panel):
    """One x only: a pair of bars (EMA, PreciseBN statistics) per series."""
    names, values = [], {key: ([], []) for key, _ in STATISTICS}
    for series in panel["series"]:
        point = series["points"][0]
        if not point.get("ema") or not point.get("precise"):
            continue
        names.append(series["name"].replace(", ", "\n"))
        for key, _ in STATISTICS:
            values[key][0].append(point[key]["mean"])
            values[key][1].append(point[key]["std"])
    if not names:
        return False
    return paired_bars(ax, names, [(label, *values[key]) for key, label in STATISTICS], "held-out error (%)")


def paired_bars(ax, names, pairs, ylabel):
    """Two bars per name: pairs = [(label, means, stds), (label, means, stds)]."""
    xs = list(range(len(names)))
    for offset, (label, means, stds) in zip((-0.2, 0.2), pairs):
        ax.bar([x + offset for x in xs], means, 0.4, yerr=stds, capsize=3, label=label)
    ax.set_xticks(xs)
    ax.set_xticklabels(names, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    return True


def draw_curves(ax, panel):
    drawn = False
    colors = {}
    for curve in panel["curves"]:
        color = colors.setdefault(curve["series"], f"C{len(colors)}")
        first = curve["seed"] == min(c["seed"] for c in panel["curves"] if c["series"] == curve["series"])
        for key, style in (("ema", "--"), ("precise", "-")):
            ys = [v if v is not None else math.nan for v in curve[key]]
            if not finite(ys):
                continue
            label = f"{curve['series']}, {'EMA' if key == 'ema' else 'PreciseBN'}" if first else None
            ax.plot(curve["steps"], ys, style, color=color, marker=".", label=label, alpha=0.9)
            drawn = True
    ax.set_xlabel("step")
    ax.set_ylabel("held-out error (%)")
    ax.grid(alpha=0.3)
    return drawn


def draw_diagnostics(ax, panel):
    """The first layer's feeding-conv weight norm and γ norm against x, one line per series."""
    drawn = False
    for series in panel["series"]:
        points = [p for p in series["points"] if p.get("diagnostics")]
        if not points:
            continue
        layer = sorted(points[0]["diagnostics"].keys())[0]
        for quantity, style in (("weight_norm", "-o"), ("gamma_norm", "--s")):
            ys = [p["diagnostics"].get(layer, {}).get(quantity, math.nan) for p in points]
            ax.plot([p["x"] for p in points], ys, style, label=f"{series['name']}: {quantity.replace('_', ' ')} ({layer})")
            drawn = True
    finish(ax, panel, "norm at the end of training")
    return drawn


def draw_weight_norm_curves(ax, panel):
    """The first layer's feeding weight norm against the step, seed 1 of each job, one colour per
    series and one line style per x."""
    curves = [c for c in panel.get("weightNormCurves", []) if c["seed"] == min(d["seed"] for d in panel["weightNormCurves"])]
    colors, styles = {}, {}
    for curve in curves:
        color = colors.setdefault(curve["series"], f"C{len(colors)}")
        style = styles.setdefault(curve["x"], ["-", "--", ":", "-.", (0, (1, 3))][len(styles) % 5])
        ax.plot(curve["steps"], curve["norms"], linestyle=style, color=color,
                label=f"{curve['series']}, {panel['xLabel'].split(' ')[0]} {curve['x']:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("first conv weight norm")
    ax.grid(alpha=0.3)
    return bool(curves)


def draw_leakage(ax, panel):
    """Training error beside held-out error (EMA statistics), one pair of bars per setting."""
    names, train, held, train_err, held_err = [], [], [], [], []
    for series in panel["series"]:
        for point in series["points"]:
            if not point.get("trainError") or not point.get("ema"):
                continue
            names.append(series["name"].replace(", ", "\n"))
            train.append(point["trainError"]["mean"])
            train_err.append(point["trainError"]["std"])
            held.append(point["ema"]["mean"])
            held_err.append(point["ema"]["std"])
    if not names:
        return False
    return paired_bars(ax, names, [("training error (last tenth)", train, train_err),
                                   ("held-out error (EMA)", held, held_err)], "error (%)")


def plot_experiment(experiment, out):
    axes_specs = []
    for panel in experiment["panels"]:
        single_x = len({p["x"] for series in panel["series"] for p in series["points"]}) == 1
        if panel["kind"] == "final" and single_x:
            # One grid point (arms compared at one setting): EMA and PreciseBN bars per arm.
            axes_specs.append((panel, "bars"))
        elif panel["kind"] == "final":
            axes_specs += [(panel, "ema"), (panel, "precise")]
        elif panel["kind"] == "diagnostics":
            axes_specs += [(panel, None), (panel, "curves")]
        else:
            axes_specs.append((panel, None))
    # At most four axes to a row: experiments with many panels wrap.
    columns = min(4, len(axes_specs))
    rows = (len(axes_specs) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(max(5.2 * columns, 8.5), 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(axes_specs):]:
        ax.set_visible(False)
    anything = False
    for ax, (panel, key) in zip(axes.flat, axes_specs):
        kind = panel["kind"]
        if key == "bars":
            drawn = draw_statistics_bars(ax, panel)
            ax.set_title(panel["title"], fontsize=9)
        elif kind == "final":
            drawn = draw_final(ax, panel, key)
            ax.set_title(f"{panel['title']}\n({dict(STATISTICS)[key]})", fontsize=9)
        elif kind in ("statistics",):
            drawn = draw_statistics(ax, panel)
            ax.set_title(panel["title"], fontsize=9)
        elif kind in ("budget", "crossed"):
            drawn = draw_final(ax, panel, "precise")
            ax.set_title(panel["title"], fontsize=9)
            if kind == "crossed":
                # x names settings: "label (0 first, 1 second)" gives the tick labels.
                xs = sorted({p["x"] for series in panel["series"] for p in series["points"]})
                names = dict(item.strip().split(" ", 1) for item in panel["xLabel"].split("(", 1)[-1].rstrip(")").split(",")
                             if " " in item.strip())
                ax.set_xticks(xs)
                ax.set_xticklabels([names.get(f"{x:g}", f"{x:g}") for x in xs])
                ax.set_xlabel(panel["xLabel"].split(" (", 1)[0])
        elif kind == "leakage":
            drawn = draw_leakage(ax, panel)
            ax.set_title(panel["title"], fontsize=9)
        elif kind == "curves":
            drawn = draw_curves(ax, panel)
            ax.set_title(panel["title"], fontsize=9)
        elif key == "curves":
            drawn = draw_weight_norm_curves(ax, panel)
            ax.set_title("First conv weight norm during training (seed 1)", fontsize=9)
        else:
            drawn = draw_diagnostics(ax, panel)
            ax.set_title(panel["title"], fontsize=9)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
        anything = anything or drawn
    fig.suptitle(f"{experiment['name']}: {experiment['title']}", fontsize=11)
    fig.tight_layout()
    paths = []
    for ext in ("svg", "png"):
        path = os.path.join(out, f"{experiment['name']}.{ext}")
        fig.savefig(path, dpi=110)
        paths.append(path)
    plt.close(fig)
    return paths, anything


def plot_curves(files, out):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for path in files:
        steps, losses, evals = [], [], {"ema": [], "precise": []}
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                record = json.loads(line)
                if record.get("event") == "eval":
                    evals.setdefault(record["stats"], []).append((record["step"], 100 * record["accuracy"]))
                elif "event" not in record and "loss" in record:
                    steps.append(record["step"])
                    losses.append(record["loss"])
        name = os.path.basename(path)
        axes[0].plot(steps, losses, label=name)
        for ax, key in ((axes[1], "ema"), (axes[2], "precise")):
            if evals.get(key):
                ax.plot(*zip(*evals[key]), marker=".", label=name)
    for ax, title, ylabel in ((axes[0], "training loss (interval mean)", "loss"),
                              (axes[1], "held-out accuracy, EMA statistics", "accuracy (%)"),
                              (axes[2], "held-out accuracy, PreciseBN statistics", "accuracy (%)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    paths = []
    for ext in ("svg", "png"):
        path = os.path.join(out, f"curves.{ext}")
        fig.savefig(path, dpi=110)
        paths.append(path)
    plt.close(fig)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="a study directory, or metrics files with --curves")
    parser.add_argument("--curves", action="store_true", help="plot training curves of --metrics files")
    parser.add_argument("--out", help="directory for the figures (default: DIR/figures, or . with --curves)")
    args = parser.parse_args()
    if args.curves:
        out = args.out or "."
        missing = [p for p in args.paths if not os.path.isfile(p)]
        if missing:
            sys.exit(f"plot: no such metrics file: {missing[0]}")
        os.makedirs(out, exist_ok=True)
        for path in plot_curves(args.paths, out):
            print(path)
        return
    if len(args.paths) != 1:
        sys.exit("plot: give one study directory (or --curves FILE...)")
    directory = args.paths[0]
    summary_path = os.path.join(directory, "summary.json")
    if not os.path.isfile(summary_path):
        sys.exit(f"plot: {summary_path} does not exist (run syncbn-study --out {directory} first)")
    try:
        with open(summary_path) as f:
            summary = json.load(f)
        experiments = summary["experiments"]
    except (ValueError, KeyError) as error:
        sys.exit(f"plot: {summary_path} is not a syncbn-study summary: {error}")
    out = args.out or os.path.join(directory, "figures")
    os.makedirs(out, exist_ok=True)
    for experiment in experiments:
        paths, anything = plot_experiment(experiment, out)
        for path in paths:
            print(path + ("" if anything else "  (no results yet)"))


if __name__ == "__main__":
    main()
