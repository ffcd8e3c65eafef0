#!/usr/bin/env python3
"""ResNet-20's convolution layers (1x28x28 input, width 1, batch 32), forward + backward at one
thread: syncbn's im2col and oneDNN backends (`syncbn-bench conv`) beside PyTorch's own oneDNN
path (when torch is importable), interleaved in one sitting, best of --rounds. Prints a Markdown
table with the CPU's vector ISA; the README's and docs/performance.md's per-layer tables come
from it.

    python3 tools/conv_layers.py [--bench .build/release/syncbn-bench] [--batch 32] [--rounds 3]
"""
import argparse, json, os, subprocess, time

# (C_in, C_out, H, kernel, stride, count in ResNet-20)
LAYERS = [(1, 16, 28, 3, 1, 1), (16, 16, 28, 3, 1, 6), (16, 32, 28, 3, 2, 1), (16, 32, 28, 1, 2, 1),
          (32, 32, 14, 3, 1, 5), (32, 64, 14, 3, 2, 1), (32, 64, 14, 1, 2, 1), (64, 64, 7, 3, 1, 5)]


def syncbn(bench, batch, layer, backend, repeat):
    cin, cout, h, k, s, _ = layer
    out = subprocess.run([bench, "conv", "--shape", f"{batch},{cin},{h},{h}", "--out-channels", str(cout), "--kernel", str(k),
                          "--stride", str(s), "--repeat", str(repeat), "--backend", backend],
                         check=True, capture_output=True, text=True, env=dict(os.environ, OPENBLAS_NUM_THREADS="1")).stdout
    record = json.loads(out.strip().splitlines()[-1])
    return record["forward_s"] + record["backward_s"], record["cpu_isa"]


def pytorch(batch, layer, repeat):
    import torch
    torch.set_num_threads(1)
    cin, cout, h, k, s, _ = layer
    conv = torch.nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
    x = torch.randn(batch, cin, h, h, requires_grad=True)
    def step():
        y = conv(x)
        y.backward(torch.ones_like(y))
    for _ in range(2):
        step()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default=".build/release/syncbn-bench")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args()
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    rows, isa = [], "?"
    totals = {"im2col": 0.0, "onednn": 0.0, "pytorch": 0.0, "best": 0.0}
    for layer in LAYERS:
        best = {"im2col": float("inf"), "onednn": float("inf"), "pytorch": float("inf")}
        for _ in range(a.rounds):
            for backend in ("im2col", "onednn"):
                t, isa = syncbn(a.bench, a.batch, layer, backend, a.repeat)
                best[backend] = min(best[backend], t)
            if have_torch:
                best["pytorch"] = min(best["pytorch"], pytorch(a.batch, layer, a.repeat))
        count = layer[5]
        for key in ("im2col", "onednn", "pytorch"):
            totals[key] += count * best[key]
        totals["best"] += count * min(best["im2col"], best["onednn"])
        rows.append((layer, best))
    print(f"CPU (oneDNN's ISA): {isa}; batch {a.batch}, 1 thread, forward + backward, ms (best of {a.rounds} medians)\n")
    print("| layer | × | im2col | onednn | PyTorch (oneDNN) | onednn / PyTorch |")
    print("|---|---|---|---|---|---|")
    for (cin, cout, h, k, s, count), best in rows:
        ratio = f"{best['onednn'] / best['pytorch']:.2f}" if have_torch else "–"
        torch_ms = f"{best['pytorch'] * 1e3:.2f}" if have_torch else "–"
        print(f"| {cin}→{cout} {k}×{k} s{s} @{h}×{h} | {count} | {best['im2col'] * 1e3:.2f} | {best['onednn'] * 1e3:.2f} | {torch_ms} | {ratio} |")
    torch_total = f"{totals['pytorch'] * 1e3:.1f}" if have_torch else "–"
    print(f"| per step (× counts) | | {totals['im2col'] * 1e3:.1f} | {totals['onednn'] * 1e3:.1f} | {torch_total} | "
          f"{(totals['onednn'] / totals['pytorch']) if have_torch else float('nan'):.2f} |")
    print(f"\nfaster backend per layer: {totals['best'] * 1e3:.1f} ms per step")


if __name__ == "__main__":
    main()
