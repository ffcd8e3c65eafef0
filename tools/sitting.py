#!/usr/bin/env python3
"""One sitting of syncbn against PyTorch: the README's "Speed next to PyTorch" table and its
targets, measured on whatever CPU this is, in alternated rounds so that both programs see the
same machine. Each round runs, in turn: PyTorch at 1 and 2 threads (`torch_train.py`, synthetic
data), then `syncbn-bench train --norms bn,syncbn,cbn` on 1 and 2 ranks (`mpirun`), ResNet-20 on
1x28x28 at batch 32 per process; with --resnet18 also ResNet-18 on 3x32x32 (random images written
as .npy) with --weight-gradient-leaf 8. Prints a Markdown table (ranges over the rounds), the
targets with the ratios of each round's pair, the CPU's vector ISA and peak RSS; --json prints the
raw records instead (one per line, each as it is measured), and --from tabulates records saved
that way.

    python3 tools/sitting.py --torch-train PATH/torch_train.py [--rounds 2] [--resnet18]
        [--bench .build/release/syncbn-bench] [--data fashion-mnist] [--json]
    python3 tools/sitting.py --from records.jsonl
"""
import argparse, json, os, shutil, subprocess, sys, tempfile


def fail(message):
    print(f"sitting.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def run(command, env, scratch):
    """Runs a command; returns the last JSON line of its stdout and its peak RSS in MiB."""
    out_path, err_path = os.path.join(scratch, "out"), os.path.join(scratch, "err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    with open(out_path) as out, open(err_path) as err:
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        last = (stderr.strip().splitlines() or ["(no output)"])[-1]
        fail(f"{' '.join(command[:4])} … exited with {process.returncode}: {last}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        fail(f"{' '.join(command[:4])} … printed no JSON line")
    return json.loads(lines[-1]), usage.ru_maxrss / 1024


def mpirun_prefix(ranks):
    if ranks == 1:
        return []
    mpirun = shutil.which("mpirun")
    if not mpirun:
        fail("mpirun is not installed (launch/setup installs it)")
    prefix = [mpirun, "-n", str(ranks), "--bind-to", "none", "-x", "OPENBLAS_NUM_THREADS=1", "-x", "OMP_NUM_THREADS=1"]
    if os.geteuid() == 0:
        prefix.append("--allow-run-as-root")
    if ranks > (os.cpu_count() or 1):
        # As launch/train: ranks that share a core yield it while they wait.
        prefix += ["--oversubscribe", "--mca", "mpi_yield_when_idle", "1"]
    return prefix


def ranges(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    low, high = f"{min(values):.1f}", f"{max(values):.1f}"
    return low if low == high else f"{low}–{high}"


def round_ratios(numerators, denominators):
    """Each round's ratio, for the rounds both sides have (dicts keyed by round)."""
    return [numerators[k] / denominators[k] for k in numerators if k in denominators]


def ratio_text(ratios):
    if not ratios:
        return "–"
    low, high = f"{min(ratios):.2f}", f"{max(ratios):.2f}"
    return f"{low}×" if low == high else f"{low}–{high}×"


def measure(args):
    """Runs the sitting; returns its records and the workloads' names."""
    if not args.torch_train:
        fail("--torch-train PATH (PyTorch's torch_train.py) is needed to measure (or --from RECORDS to tabulate)")
    if args.rounds < 1:
        fail(f"--rounds must be at least 1, got {args.rounds}")
    if not os.path.isfile(args.torch_train):
        fail(f"{args.torch_train}: no such file")
    if not os.access(args.bench, os.X_OK):
        fail(f"{args.bench}: not an executable (build with launch/setup)")

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    torch_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    first = "ResNet-20" if args.model == "resnet20" else args.model
    workloads = [(first, args.model, args.input, ["--data", args.data], args.steps, 5, args.torch_steps, 10)]
    scratch = tempfile.mkdtemp(prefix="syncbn-sitting-")
    try:
        if args.resnet18:
            import numpy
            rng = numpy.random.default_rng(0)
            x, y = os.path.join(scratch, "x.npy"), os.path.join(scratch, "y.npy")
            numpy.save(x, rng.standard_normal((2048, 3, 32, 32), dtype=numpy.float32))
            numpy.save(y, rng.integers(0, 10, 2048).astype(numpy.int64))
            workloads.append(("ResNet-18", "resnet18", "3,32,32", ["--data", f"npy:{x},{y}", "--weight-gradient-leaf", "8"], 8, 2, 15, 3))
        records = []

        def keep(record):
            # With --json each record is printed as it comes, so a sitting cut short keeps its rounds.
            records.append(record)
            if args.json:
                print(json.dumps(record), flush=True)

        for round_ in range(1, args.rounds + 1):
            for name, model, shape, data, steps, warmup, torch_steps, torch_warmup in workloads:
                for threads in (1, 2):
                    record, rss = run([sys.executable, args.torch_train, "--model", model, "--input", shape, "--threads", str(threads),
                                       "--steps", str(torch_steps), "--warmup", str(torch_warmup)], torch_env, scratch)
                    print(f"[round {round_}] {name}, PyTorch {threads} thread(s): {record['samples_per_s']:.1f} samples/s", file=sys.stderr)
                    keep({"round": round_, "workload": name, "program": "pytorch", "threads": threads,
                          "samples_per_s": record["samples_per_s"], "peak_rss_mib": rss, "torch": record.get("torch")})
                for ranks in (1, 2):
                    record, _ = run(mpirun_prefix(ranks) + [args.bench, "train", "--model", model, "--norms", "bn,syncbn,cbn",
                                                            "--steps", str(steps), "--warmup", str(warmup)] + data, env, scratch)
                    print(f"[round {round_}] {name}, syncbn {ranks} rank(s): " +
                          ", ".join(f"{arm['norm']} {arm['samples_per_s']:.1f}" for arm in record["runs"]) + " samples/s", file=sys.stderr)
                    for arm in record["runs"]:
                        keep({"round": round_, "workload": name, "program": "syncbn", "ranks": ranks, "norm": arm["norm"],
                              "samples_per_s": arm["samples_per_s"], "peak_rss_mib": max(arm["peak_rss_mib"]),
                              "cpu_isa": record.get("cpu_isa"), "conv_backends": arm.get("conv_backends")})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    return records, [w[0] for w in workloads]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-train", help="PyTorch's benchmark script (torch_train.py)")
    parser.add_argument("--from", dest="records", help="tabulate the records of an earlier --json run instead of measuring")
    parser.add_argument("--bench", default=".build/release/syncbn-bench")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", default="fashion-mnist", help="syncbn's ResNet-20 data (as syncbn-bench train --data)")
    parser.add_argument("--model", default="resnet20", help=argparse.SUPPRESS)   # a small model for the tests
    parser.add_argument("--input", default="1,28,28", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=30, help="syncbn's timed steps (PyTorch: 100 after 10)")
    parser.add_argument("--torch-steps", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--resnet18", action="store_true", help="also ResNet-18 on 3x32x32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.records:
        try:
            with open(args.records) as f:
                records = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as error:
            fail(f"{args.records}: {error}")
        if not records or not all(isinstance(r, dict) and {"workload", "program", "round", "samples_per_s"} <= r.keys() for r in records):
            fail(f"{args.records}: not the records of tools/sitting.py --json")
        names = list(dict.fromkeys(r["workload"] for r in records))
        args.rounds = max(r["round"] for r in records)
    else:
        records, names = measure(args)
    if args.json:
        if args.records:
            for record in records:
                print(json.dumps(record))
        return
    isa = next((r["cpu_isa"] for r in records if r.get("cpu_isa")), "unknown")
    torch_version = next((r["torch"] for r in records if r.get("torch")), "unknown")
    print(f"CPU vector ISA (oneDNN): {isa}; PyTorch {torch_version}; {args.rounds} round(s), alternated; samples/s\n")
    for name in names:
        def pick(program, **keys):
            return [r for r in records if r["workload"] == name and r["program"] == program
                    and all(r.get(k) == v for k, v in keys.items())]

        def per_round(program, **keys):
            return {r["round"]: r["samples_per_s"] for r in pick(program, **keys)}

        print(f"**{name}**, batch 32 per process\n")
        # syncbn-bench runs its arms in one process, so an arm's peak RSS includes the arms before it.
        print("| setup | samples/s | peak RSS per process (MiB; syncbn: BN's arm / all three) |\n|---|---|---|")
        for threads in (1, 2):
            rows = pick("pytorch", threads=threads)
            print(f"| PyTorch, {threads} thread{'s' if threads > 1 else ''} | {ranges([r['samples_per_s'] for r in rows])} | "
                  f"{ranges([r['peak_rss_mib'] for r in rows])} |")
        for ranks in (1, 2):
            cells = [ranges([r["samples_per_s"] for r in pick("syncbn", ranks=ranks, norm=n)]) for n in ("bn", "syncbn", "cbn")]
            rss = " / ".join(ranges([r["peak_rss_mib"] for r in pick("syncbn", ranks=ranks, norm=n)]) for n in ("bn", "cbn"))
            print(f"| syncbn, {ranks} rank{'s' if ranks > 1 else ''}, BN / SyncBN / CBN | {' / '.join(cells)} | {rss} |")
        print("\n| target | each round's ratio | |\n|---|---|---|")
        torch1, torch2 = per_round("pytorch", threads=1), per_round("pytorch", threads=2)
        best = max((1, 2), key=lambda n: sum(per_round("syncbn", ranks=n, norm="syncbn").values()))
        # (label, each round's ratio, whether a ratio meets the target)
        limit = 1.0 if name == "ResNet-18" else 1.25
        targets = [(f"best rank count ({best}) SyncBN ≥ {limit}× PyTorch 2 threads",
                    round_ratios(per_round("syncbn", ranks=best, norm="syncbn"), torch2), lambda r, limit=limit: r >= limit)]
        if name != "ResNet-18":
            targets.append(("1 rank SyncBN ≥ 1.1× PyTorch 1 thread", round_ratios(per_round("syncbn", ranks=1, norm="syncbn"), torch1),
                            lambda r: r >= 1.1))
        for ranks in (1, 2):
            bn = per_round("syncbn", ranks=ranks, norm="bn")
            for norm, limit in (("syncbn", 1.05), ("cbn", 1.15)):
                other = per_round("syncbn", ranks=ranks, norm=norm)
                # The step-time ratio is BN's samples/s over the other arm's.
                targets.append((f"{ranks} rank{'s' if ranks > 1 else ''}: {norm} step ≤ {limit}× BN's", round_ratios(bn, other),
                                lambda r, limit=limit: r <= limit))
        for label, ratios, meets in targets:
            verdict = "–" if not ratios else ("met in every round" if all(map(meets, ratios)) else
                                              "met in some rounds" if any(map(meets, ratios)) else "missed")
            print(f"| {label} | {ratio_text(ratios)} | {verdict} |")
        print()


if __name__ == "__main__":
    main()
