#!/usr/bin/env python3
"""Per-layer ratio of a checkpoint's EMA running variance to its PreciseBN running variance.

A checkpoint trained with PreciseBN keeps both: `NAME.running_var` (PreciseBN's population
estimate) and `ema.NAME.running_var` (the EMA of the training batches' variances). Their ratio
per channel says how far the EMA built from the training batches is from the population: below
1 where small batches miss the variance between samples.

    python3 tools/variance_ratio.py CHECKPOINT [CHECKPOINT…] [--json]

For each BN layer (in the file's order): the median, the smallest and the largest channel ratio,
over the channels of every checkpoint given. Standard library only (no numpy).
"""
import argparse
import array
import json
import statistics
import struct
import sys


def tensors(path):
    """The float32 tensors of a safetensors file by name, and its metadata."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        sys.exit(f"variance_ratio.py: {path}: not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", data[:8])
    if 8 + length > len(data):
        sys.exit(f"variance_ratio.py: {path}: header length {length} exceeds the file")
    header = json.loads(data[8:8 + length])
    metadata = header.pop("__metadata__", {})
    body = data[8 + length:]
    result = {}
    for name, entry in header.items():
        if entry.get("dtype") != "F32":
            continue
        start, end = entry["data_offsets"]
        values = array.array("f")
        values.frombytes(body[start:end])
        if sys.byteorder != "little":
            values.byteswap()
        result[name] = values
    return result, metadata


def ratios(paths):
    """Per layer, every channel's EMA / PreciseBN variance ratio over the checkpoints."""
    layers = {}
    for path in paths:
        state, metadata = tensors(path)
        if metadata.get("statistics") != "precise":
            sys.exit(f"variance_ratio.py: {path} holds EMA statistics only (train with --eval-stats both or precise)")
        for name, values in state.items():
            if not name.endswith(".running_var") or name.startswith("ema."):
                continue
            ema = state.get("ema." + name)
            if ema is None or len(ema) != len(values):
                continue
            layer = name[: -len(".running_var")]
            layers.setdefault(layer, []).extend(e / p for e, p in zip(ema, values) if p > 0)
    if not layers:
        sys.exit("variance_ratio.py: no layer has both statistics")
    return layers


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--json", action="store_true", help="one JSON object: layer → median, min, max, channels")
    args = parser.parse_args()
    layers = ratios(args.checkpoints)
    summary = {layer: {"median": statistics.median(values), "min": min(values), "max": max(values), "channels": len(values)}
               for layer, values in layers.items()}
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"EMA / PreciseBN running variance over {len(args.checkpoints)} checkpoint(s):")
    print(f"{'layer':<24} {'median':>7} {'min':>7} {'max':>7} channels")
    for layer, s in summary.items():
        print(f"{layer:<24} {s['median']:7.3f} {s['min']:7.3f} {s['max']:7.3f} {s['channels']:8d}")


if __name__ == "__main__":
    main()
