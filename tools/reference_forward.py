#!/usr/bin/env python3
"""Independent float64 forward pass of a syncbn checkpoint, written with NumPy alone from
PyTorch's definitions (Conv2d cross-correlation with zero padding, BatchNorm2d in eval mode,
ReLU, adaptive average pooling to 1x1, Linear y = x W^T + b), reading the checkpoint's tensors by
their torchvision names. It checks that a checkpoint means what a torch.nn model with those
names would compute:

    syncbn-train evaluate --resume CKPT --inputs x.npy --logits logits.npy
    python3 tools/reference_forward.py CKPT x.npy logits.npy

prints the largest difference relative to the largest logit and exits 1 above --tolerance. Or, on
raw images as they come (IDX files, plain or gzipped, pixels 0-255), with the checkpoint's stored
input standardization (x/255 - input_mean) / input_std applied here:

    python3 tools/reference_forward.py CKPT --idx t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz

prints the accuracy. CKPT may also be the output of `syncbn-train export-torch` (the model state
alone). Models: the CIFAR ResNets, resnet18 and the convnet, with BN (or SyncBN) statistics or
weight normalization (--norm wn, wn-meanonly), and IBN-Net's IBN-a blocks (--norm ibn).
"""
import argparse
import gzip
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


def weight_normalized(t):
    """Replaces PyTorch weight_norm's NAME.weight_g / NAME.weight_v by NAME.weight = g·v/‖v‖ (per
    output channel)."""
    t = dict(t)
    for key in [k for k in t if k.endswith(".weight_v")]:
        prefix = key[: -len("_v")]
        v, g = t.pop(key), t.pop(prefix + "_g")
        norms = np.sqrt((v.reshape(len(v), -1) ** 2).sum(axis=1))
        t[prefix] = v * (g.reshape(-1) / norms).reshape((-1,) + (1,) * (v.ndim - 1))
    return t


def batch_norm(x, t, prefix, eps=1e-5):
    if prefix + ".running_var" not in t:
        # Weight normalization's companions: mean-only BN (x - running_mean + bias) or a bias.
        mean = t.get(prefix + ".running_mean", np.zeros_like(t[prefix + ".bias"]))
        return x + (t[prefix + ".bias"] - mean)[None, :, None, None]
    scale = t[prefix + ".weight"] / np.sqrt(t[prefix + ".running_var"].astype(np.float64) + eps)
    shift = t[prefix + ".bias"] - t[prefix + ".running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def instance_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(axis=(2, 3), keepdims=True)
    var = x.var(axis=(2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight[None, :, None, None] + bias[None, :, None, None]


def norm(x, t, prefix):
    """BN (or a weight-norm companion), or IBN-Net's IBN: InstanceNorm on the first channels, BN on the rest."""
    if prefix + ".IN.weight" in t:
        half = len(t[prefix + ".IN.weight"])
        return np.concatenate([instance_norm(x[:, :half], t[prefix + ".IN.weight"], t[prefix + ".IN.bias"]),
                               batch_norm(x[:, half:], t, prefix + ".BN")], axis=1)
    return batch_norm(x, t, prefix)


def relu(x):
    return np.maximum(x, 0)


def resnet(x, t):
    x = relu(batch_norm(conv2d(x, t["conv1.weight"], 1, 1), t, "bn1"))
    blocks = sorted({(int(m.group(1)), int(m.group(2))) for m in (re.match(r"layer(\d+)\.(\d+)\.", k) for k in t) if m})
    for stage, block in blocks:
        p = f"layer{stage}.{block}."
        stride = 2 if stage > 1 and block == 0 else 1
        out = relu(norm(conv2d(x, t[p + "conv1.weight"], stride, 1), t, p + "bn1"))
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
    """The command line shared by the checkpoint checkers:
    CKPT X.npy LOGITS.npy [--tolerance T]  or  CKPT --idx IMAGES LABELS [--limit N]."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("inputs", nargs="?", help="standardized inputs (.npy, as evaluate --inputs writes them)")
    parser.add_argument("logits", nargs="?", help="syncbn's logits for them (.npy)")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--idx", nargs=2, metavar=("IMAGES", "LABELS"), help="raw IDX images and labels to evaluate")
    parser.add_argument("--limit", type=int, default=None, help="with --idx: the first N images only")
    args = parser.parse_args()
    if (args.idx is None) == (args.inputs is None or args.logits is None):
        parser.error("give INPUTS LOGITS, or --idx IMAGES LABELS")
    return args


def read_idx(path):
    """An IDX file (MNIST's format), plain or gzipped, as a NumPy array of its unsigned bytes."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        sys.exit(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * data[3], data[4:4 + 4 * data[3]])
    return np.frombuffer(data[4 + 4 * data[3]:], dtype=np.uint8, count=int(np.prod(dims))).reshape(dims)


def standardized_images(path, metadata, limit=None):
    """Raw IDX images (N×H×W or N×C×H×W) as the network sees them: (x / 255 - input_mean) / input_std
    per channel, with the checkpoint's stored standardization."""
    x = read_idx(path)[:limit].astype(np.float64) / 255
    if x.ndim == 3:
        x = x[:, None]
    if "input_mean" not in metadata or "input_std" not in metadata:
        sys.exit("the checkpoint stores no input standardization (input_mean, input_std)")
    mean = np.array(json.loads(metadata["input_mean"]), dtype=np.float64)
    std = np.array(json.loads(metadata["input_std"]), dtype=np.float64)
    return (x - mean[None, :, None, None]) / std[None, :, None, None]


def report(tool, label, logits, args):
    """The checkers' verdict: accuracy on --idx images, or the logits compared with syncbn's."""
    if args.idx:
        report_accuracy(tool, label, logits, args.idx[1], args.limit)
    else:
        compare(tool, label, logits, args.logits, args.tolerance)


def report_accuracy(tool, label, logits, labels_path, limit=None):
    labels = read_idx(labels_path)[:limit].astype(np.int64)
    if len(labels) != len(logits):
        sys.exit(f"{tool}: {len(logits)} images but {len(labels)} labels")
    accuracy = (logits.argmax(1) == labels).mean()
    print(f"{tool}: {label}, {len(labels)} raw images standardized with the stored input_mean/input_std: accuracy {accuracy * 100:.2f}%")


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
    t = weight_normalized({k: v.astype(np.float64) for k, v in t.items() if not k.startswith(("optimizer.", "ema."))})
    model = json.loads(metadata.get("configuration") or metadata.get("architecture") or "{}").get("model", "")
    if args.idx:
        x = standardized_images(args.idx[0], metadata, args.limit)
    else:
        x = np.load(args.inputs).astype(np.float64)
    if model.startswith("resnet"):
        logits = resnet(x, t)
    elif model == "convnet":
        logits = convnet(x, t)
    else:
        sys.exit(f"reference_forward: model '{model}' is not covered")
    report("reference_forward", model, logits, args)


if __name__ == "__main__":
    main()
