#!/usr/bin/env python3
"""α–β cost model of SyncBN's collectives, fitted from `syncbn-bench allreduce` output.

Fit. Each JSON file is one `syncbn-bench allreduce` run on 2 ranks (one exchange per
all-reduce): t(n) = α + β·n for a message of n bytes. α is the median time of the messages up to
256 B (pure latency), β the least-squares slope of t over the messages from 64 KiB up.

Model of one all-reduce of n bytes over P ranks (what Open MPI's tuned module does: recursive
doubling for small messages, a ring for large ones):

    T_rd(P, n)   = ⌈log2 P⌉·(α + β·n)
    T_ring(P, n) = 2·(P − 1)·α + 2·(P − 1)/P·β·n
    T(P, n)      = min(T_rd, T_ring)

On machines of G ranks each, with the fit `s` inside a machine (shared memory) and `t` between
machines (the network), a flat all-reduce over P = G·m ranks does log2 G steps inside and log2 m
across (hierarchical recursive doubling); a node-grouped one (`--sync-group-size node`) stays
inside the machine whatever P is:

    flat:    T_s(G, n) + T_t(m, n)
    grouped: T_s(G, n)

SyncBN issues two all-reduces per BN layer and step, neither overlapped with compute: forward
(count, Σx, Σx² as Float64: 8·(2C + 1) bytes), backward (Σdy, Σdy·x̂: 8·2C bytes). The predicted
per-step overhead is the sum over layers.

With --step, a `syncbn-bench train` measurement on one machine (P ranks over shared memory) is
carried to P/G machines of G ranks: compute = the measured step − the model's shared-memory
collectives for it; predicted = compute + the gradient buckets and (synchronized norms) the
statistics all-reduces across the machines, each as above. --compare sets the same job measured
across the machines beside it. Not in the model: waiting for the slowest rank at each
of these synchronization points (compute jitter), which on a busy machine is larger than the
transfer itself.
"""
import argparse
import json
import math
import statistics
import sys

# BN channel counts, in network order.
MODELS = {
    # CIFAR ResNet-20 (16/32/64 channels, projection shortcuts with their own BN).
    "resnet20": [16] + [16] * 6 + [32] * 7 + [64] * 7,
    # ResNet-50 (torchvision): stem, then bottlenecks (C, C, 4C) with a projection BN in the
    # first block of each stage.
    "resnet50": [64]
    + sum(([c, c, 4 * c] * blocks + [4 * c] for c, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]), []),
}


def fail(message):
    print(f"cost_model: {message}", file=sys.stderr)
    sys.exit(2)


def fit(path):
    """(α seconds, β seconds per byte) from one allreduce JSON file of a 2-rank run."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as error:
        fail(f"{path}: {error}")
    if data.get("benchmark") != "allreduce" or "sizes" not in data:
        fail(f"{path}: not the JSON line of `syncbn-bench allreduce`")
    if data.get("ranks") != 2:
        fail(f"{path}: the fit needs a 2-rank run (one exchange per all-reduce), this one has {data.get('ranks')} ranks")
    rows = [(int(r["bytes"]), float(r["median_s"])) for r in data["sizes"]]
    small = [t for n, t in rows if n <= 256]
    large = [(n, t) for n, t in rows if n >= 64 << 10]
    if not small or len(large) < 2:
        fail(f"{path}: needs sizes up to 256 B and at least two from 64 KiB up")
    alpha = statistics.median(small)
    mean_n = sum(n for n, _ in large) / len(large)
    mean_t = sum(t for _, t in large) / len(large)
    beta = sum((n - mean_n) * (t - mean_t) for n, t in large) / sum((n - mean_n) ** 2 for n, _ in large)
    if beta <= 0:
        fail(f"{path}: times do not grow with the message size; measure again")
    return alpha, beta


def allreduce(P, n, alpha, beta):
    """Seconds for one all-reduce of n bytes over P ranks."""
    if P <= 1:
        return 0.0
    recursive = math.ceil(math.log2(P)) * (alpha + beta * n)
    ring = 2 * (P - 1) * alpha + 2 * (P - 1) / P * beta * n
    return min(recursive, ring)


def machines_allreduce(P, G, n, inside, across, grouped=False):
    """Seconds for one all-reduce of n bytes over P ranks on machines of G: inside each machine,
    then (unless grouped to the machine) across the machines."""
    within = allreduce(min(P, G), n, *inside)
    return within + (0.0 if grouped or P <= G else allreduce(math.ceil(P / G), n, *across))


def syncbn_step(channels, P, G, inside, across, grouped):
    """Seconds of SyncBN collectives per training step for BN layers of `channels`."""
    return sum(machines_allreduce(P, G, n, inside, across, grouped) for C in channels for n in (8 * (2 * C + 1), 8 * 2 * C))


def load_train(path):
    """The `syncbn-bench train` JSON line of `path`: {norm: run}, ranks, and the file's object."""
    try:
        with open(path) as f:
            lines = [line for line in f if line.startswith("{")]
        data = json.loads(lines[-1])
    except (OSError, ValueError, IndexError) as error:
        fail(f"{path}: {error if not isinstance(error, IndexError) else 'no JSON line'}")
    if data.get("benchmark") != "train" or not data.get("runs"):
        fail(f"{path}: not the JSON line of `syncbn-bench train`")
    for run in data["runs"]:
        if "gradient_bytes" not in run or "normalization_channels" not in run:
            fail(f"{path}: written by an older syncbn-bench (no gradient_bytes / normalization_channels)")
    return {run["norm"]: run for run in data["runs"]}, data["ranks"], data


def step_collectives(run, P, G, inside, across):
    """Seconds of one step's collectives on P ranks, G per machine: the gradient buckets (the
    collectives that are not BN statistics, equal in size) and, for synchronized norms, two
    statistics all-reduces per normalization layer."""
    channels = run["normalization_channels"] if run["norm"] != "bn" else []
    statistics = 2 * len(channels)
    buckets = max(round(run["collectives_per_step"]) - statistics, 1)
    gradients = buckets * machines_allreduce(P, G, run["gradient_bytes"] / buckets, inside, across)
    return gradients, syncbn_step(channels, P, G, inside, across, grouped=False), buckets


def predict_steps(a, inside, across):
    """Predicted step on G ranks per machine × m machines from a step measured on one machine
    with as many ranks: its compute (the measured step less the model's shared-memory
    collectives) plus the model's collectives across the machines."""
    runs, P, data = load_train(a.step)
    G = a.ranks_per_node
    if P % G or P == G:
        fail(f"--step: the measurement has {P} ranks; --ranks-per-node {G} must divide it into two or more machines")
    compared = load_train(a.compare)[0] if a.compare else {}
    rows = []
    for norm, run in runs.items():
        local = sum(step_collectives(run, P, P, inside, inside)[:2])
        gradients, stats, buckets = step_collectives(run, P, G, inside, across)
        channels = run["normalization_channels"] if norm != "bn" else []
        statistics_bytes = sum(8 * (2 * C + 1) + 16 * C for C in channels)
        # Above this bandwidth the statistics' all-reduces cost more than the gradients' (on two
        # machines, one exchange each: K·α + β·Σn against k·α + β·N).
        K = 2 * len(channels)
        break_even = (run["gradient_bytes"] - statistics_bytes) / (across[0] * (K - buckets)) if K > buckets else None
        row = {"norm": norm, "ranks": P, "ranks_per_node": G, "measured_one_machine_ms": 1e3 * run["step_s"],
               "compute_ms": 1e3 * (run["step_s"] - local), "gradients_ms": 1e3 * gradients, "statistics_ms": 1e3 * stats,
               "predicted_ms": 1e3 * (run["step_s"] - local + gradients + stats),
               "gradient_bytes": run["gradient_bytes"], "statistics_bytes": statistics_bytes, "collectives": K + buckets,
               "break_even_gb_per_s": break_even / 1e9 if break_even else None}
        if norm in compared:
            row["measured_ms"] = 1e3 * compared[norm]["step_s"]
            row["predicted_over_measured"] = row["predicted_ms"] / row["measured_ms"]
        rows.append(row)
    return rows


def fit_line(fits, network_digits=2):
    """The fitted α and 1/β of both transports, as the tables' first line."""
    return (f"Fit: shared memory α = {fits['shm']['alpha_us']:.2f} µs, 1/β = {fits['shm']['gb_per_s']:.2f} GB/s; "
            f"network α = {fits['net']['alpha_us']:.2f} µs, 1/β = {fits['net']['gb_per_s']:.{network_digits}f} GB/s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shm", required=True, help="allreduce JSON of a 2-rank run inside one machine")
    p.add_argument("--net", required=True, help="allreduce JSON of a 2-rank run across the network (e.g. TCP)")
    p.add_argument("--ranks-per-node", type=int, default=8, help="G, ranks per machine (default 8)")
    p.add_argument("--ranks", default="8,64,256,1024", help="comma-separated total rank counts P")
    p.add_argument("--models", default="resnet20,resnet50", help=f"from {', '.join(MODELS)}")
    p.add_argument("--net-alpha-us", type=float, help="override the network α (µs), e.g. a real cluster's")
    p.add_argument("--net-gbps", type=float, help="override the network bandwidth 1/β (GB/s)")
    p.add_argument("--step", help="`syncbn-bench train` output measured on one machine: predict that step across machines "
                   "of --ranks-per-node ranks each")
    p.add_argument("--compare", help="`syncbn-bench train` output of the same job across the machines, to set beside --step's prediction")
    p.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    a = p.parse_args(argv)
    if a.ranks_per_node < 1:
        fail(f"--ranks-per-node must be at least 1, got {a.ranks_per_node}")
    try:
        ranks = [int(v) for v in a.ranks.split(",") if v]
    except ValueError:
        fail(f"--ranks must be comma-separated integers, got '{a.ranks}'")
    if not ranks or min(ranks) < 1:
        fail(f"--ranks must be positive, got '{a.ranks}'")
    models = a.models.split(",")
    for m in models:
        if m not in MODELS:
            fail(f"unknown model '{m}' (known: {', '.join(MODELS)})")
    inside, across = fit(a.shm), fit(a.net)
    if a.net_alpha_us is not None:
        across = (a.net_alpha_us * 1e-6, across[1])
    if a.net_gbps is not None:
        if a.net_gbps <= 0:
            fail("--net-gbps must be positive")
        across = (across[0], 1 / (a.net_gbps * 1e9))
    G = a.ranks_per_node
    fits = {"shm": {"alpha_us": inside[0] * 1e6, "gb_per_s": 1 / inside[1] / 1e9},
            "net": {"alpha_us": across[0] * 1e6, "gb_per_s": 1 / across[1] / 1e9}}
    if a.step:
        steps = predict_steps(a, inside, across)
        if a.json:
            print(json.dumps({"fit": fits, "steps": steps}, sort_keys=True))
            return
        print(fit_line(fits, network_digits=3) + ".\n")
        print("| norm | ranks | on one machine, ms | compute | + gradients | + statistics | predicted, ms | measured, ms | predicted / measured | bytes per step (gradients + statistics) | statistics dominate above |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in steps:
            measured = f"{r['measured_ms']:.1f}" if "measured_ms" in r else "—"
            ratio = f"{r['predicted_over_measured']:.2f}" if "measured_ms" in r else "—"
            even = f"{r['break_even_gb_per_s']:.2f} GB/s" if r["break_even_gb_per_s"] else "—"
            print(f"| {r['norm']} | {r['ranks']} ({r['ranks'] // r['ranks_per_node']} × {r['ranks_per_node']}) | {r['measured_one_machine_ms']:.1f} | "
                  f"{r['compute_ms']:.1f} | {r['gradients_ms']:.2f} | {r['statistics_ms']:.2f} | {r['predicted_ms']:.1f} | {measured} | {ratio} | "
                  f"{r['gradient_bytes']} + {r['statistics_bytes']} | {even} |")
        return
    rows = []
    for m in models:
        for P in ranks:
            rows.append({"model": m, "layers": len(MODELS[m]), "ranks": P, "ranks_per_node": G,
                         "flat_ms": 1e3 * syncbn_step(MODELS[m], P, G, inside, across, grouped=False),
                         "grouped_ms": 1e3 * syncbn_step(MODELS[m], P, G, inside, across, grouped=True)})
    if a.json:
        print(json.dumps({"fit": fits, "predictions": rows}, sort_keys=True))
        return
    print(fit_line(fits) + f"; G = {G} ranks per machine.\n")
    print("| model (BN layers) | ranks P | flat SyncBN, ms/step | node-grouped, ms/step |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} ({r['layers']}) | {r['ranks']} | {r['flat_ms']:.3f} | {r['grouped_ms']:.3f} |")


if __name__ == "__main__":
    main()
