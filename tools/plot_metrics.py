#!/usr/bin/env python3
"""Plots a syncbn-train metrics file (--metrics): training loss and accuracy per logged step,
the learning rate, and the held-out accuracy of every evaluation with EMA and PreciseBN
statistics.

    launch/plot --metrics metrics.jsonl out.png [--title TEXT]

launch/plot runs it with Debian's python3 and python3-matplotlib (installed when missing); run
directly, it needs a python3 with matplotlib.
"""
import argparse
import json
import sys

try:
    import matplotlib
except ImportError:
    sys.exit(f"plot_metrics.py: {sys.executable} has no matplotlib; run launch/plot --metrics … (Debian's python3-matplotlib) or install matplotlib for it")

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics")
    parser.add_argument("out")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    steps, losses, accuracies, rates, evals = [], [], [], [], {"ema": [], "precise": []}
    with open(args.metrics) as f:
        for line in f:
            record = json.loads(line)
            if record.get("event") == "eval":
                evals.setdefault(record["stats"], []).append((record["step"], record["accuracy"] * 100))
            elif "loss" in record:
                steps.append(record["step"])
                losses.append(record["loss"])
                accuracies.append(record["accuracy"] * 100)
                rates.append(record["lr"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    window = max(1, len(steps) // 100)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
    top.plot(steps, losses, color="0.8", linewidth=0.5, label="training loss (logged steps)")
    top.plot(steps, smooth, color="C0", label=f"training loss (mean of {window} logged steps)")
    top.set_ylabel("loss")
    top.set_yscale("log")
    right = top.twinx()
    for stats, color, marker in (("ema", "C1", "o"), ("precise", "C2", "s")):
        if evals.get(stats):
            xs, ys = zip(*evals[stats])
            right.plot(xs, ys, color=color, marker=marker, label=f"held-out accuracy, {'EMA' if stats == 'ema' else 'PreciseBN'} statistics")
            right.annotate(f"{ys[-1]:.2f}%", (xs[-1], ys[-1]), textcoords="offset points",
                           xytext=(-48, 8 if stats == "precise" else -16), color=color)
    right.set_ylabel("held-out accuracy (%)")
    low, high = right.get_ylim()
    right.set_ylim(low, high + 0.08 * (high - low))
    lines = top.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = top.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    top.legend(lines, labels, loc="center right", fontsize=8)
    top.set_title(args.title)
    bottom.plot(steps, rates, color="C3")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
