#!/usr/bin/env python3
"""Independent float64 forward pass of a syncbn checkpoint, written with NumPy alone from
PyTorch's definitions (Conv2d cross-correlation with zero padding, BatchNorm2d in eval mode,
ReLU, adaptive average pooling to 1x1, Linear y = x W^T + b), reading the checkpoint's tensors by
their torchvision names. It checks that a checkpoint means what a torch.nn model with those
names would compute:

    syncbn-train evaluate --resume CKPT --inputs x.npy --logits logits.npy
    python3 tools/reference_forward.py CKPT x.npy logits.npy

CKPT may also be the output of `syncbn-train export-torch` (the model state alone).

prints the largest difference relative to the largest logit and exits 1 above --tolerance.
Models: the CIFAR ResNets, resnet18 and the convnet, with BN (or SyncBN) statistics.
"""
import argparse
import json
import re
import struct
import sys

import numpy as np


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    kinds = {"F32": np.float32, "F64": np.float64, "I64": np.int64}
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(body[start:end], dtype=kinds[info["dtype"]]).reshape(info["shape"])
    return tensors, header.get("__metadata__", {})


def conv2d(x, w, stride, padding):
    n, c, h, wd = x.shape
    out_c, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh = (h + 2 * padding - k) // stride + 1
    ow = (wd + 2 * padding - k) // stride + 1
    cols = np.empty((n, c, k, k, oh, ow))
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
    return np.einsum("nckluv,ockl->nouv", cols, w, optimize=True)


def batch_norm(x, t, prefix, eps=1e-5):
    scale = t[prefix + ".weight"] / np.sqrt(t[prefix + ".running_var"].astype(np.float64) + eps)
    shift = t[prefix + ".bias"] - t[prefix + ".running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def relu(x):
    return np.maximum(x, 0)


def resnet(x, t):
    x = relu(batch_norm(conv2d(x, t["conv1.weight"], 1, 1), t, "bn1"))
    blocks = sorted({(int(m.group(1)), int(m.group(2))) for m in (re.match(r"layer(\d+)\.(\d+)\.", k) for k in t) if m})
    for stage, block in blocks:
        p = f"layer{stage}.{block}."
        stride = 2 if stage > 1 and block == 0 else 1
        out = relu(batch_norm(conv2d(x, t[p + "conv1.weight"], stride, 1), t, p + "bn1"))
        out = batch_norm(conv2d(out, t[p + "conv2.weight"], 1, 1), t, p + "bn2")
        if p + "downsample.0.weight" in t:
            x = batch_norm(conv2d(x, t[p + "downsample.0.weight"], stride, 0), t, p + "downsample.1")
        x = relu(out + x)
    return x.mean(axis=(2, 3)) @ t["fc.weight"].T + t["fc.bias"]


def convnet(x, t):
    for i, stride in enumerate((1, 2, 2)):
        x = relu(batch_norm(conv2d(x, t[f"features.{i}.conv.weight"], stride, 1), t, f"features.{i}.bn"))
    return x.mean(axis=(2, 3)) @ t["classifier.weight"].T + t["classifier.bias"]


def arguments(doc):
    """The command line shared by the checkpoint checkers: CKPT X.npy LOGITS.npy [--tolerance T]."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("inputs")
    parser.add_argument("logits")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    return parser.parse_args()


def compare(tool, label, logits, logits_path, tolerance):
    """Prints how far syncbn's logits (from logits_path) are from `logits`, exits 1 beyond tolerance."""
    expected = np.load(logits_path).astype(np.float64)
    error = np.abs(logits - expected).max() / max(np.abs(logits).max(), 1e-30)
    agree = (logits.argmax(1) == expected.argmax(1)).mean()
    print(f"{tool}: {label}, {len(logits)} samples: max|syncbn - reference| / max|reference| = {error:.2e}, "
          f"same predicted class for {agree * 100:.2f}%")
    sys.exit(0 if error <= tolerance else 1)


def main():
    args = arguments(__doc__)
    t, metadata = load_safetensors(args.checkpoint)
    t = {k: v.astype(np.float64) for k, v in t.items() if not k.startswith(("optimizer.", "ema."))}
    model = json.loads(metadata.get("configuration") or metadata.get("architecture") or "{}").get("model", "")
    x = np.load(args.inputs).astype(np.float64)
    if model.startswith("resnet"):
        logits = resnet(x, t)
    elif model == "convnet":
        logits = convnet(x, t)
    else:
        sys.exit(f"reference_forward: model '{model}' is not covered")
    compare("reference_forward", model, logits, args.logits, args.tolerance)


if __name__ == "__main__":
    main()
