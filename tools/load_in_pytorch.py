#!/usr/bin/env python3
"""Loads a syncbn checkpoint (or an `export-torch` file) into torch.nn models with the same
parameter names, with load_state_dict(strict=True), and compares their logits with syncbn's:

    syncbn-train evaluate --resume CKPT --inputs x.npy --logits logits.npy
    python3 tools/load_in_pytorch.py CKPT x.npy logits.npy

x.npy holds inputs already standardized (as `evaluate --inputs` writes them). On raw images (IDX
files, plain or gzipped), with the stored standardization (x / 255 - input_mean) / input_std
applied here, it evaluates and prints the accuracy:

    python3 tools/load_in_pytorch.py CKPT --idx t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz

Needs torch, numpy and
safetensors (pip install torch numpy safetensors). Models: convnet, mlp, the CIFAR ResNets and
resnet18, with BN (or SyncBN) statistics.
"""
import json
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from reference_forward import arguments, report, standardized_images  # beside this file


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """The CIFAR ResNets (stages of 16/32/64) and resnet18 (64/128/256/512), 3x3 stem, no max-pool."""

    def __init__(self, stem, stages, in_channels, classes, width):
        super().__init__()
        scale = lambda c: max(1, round(c * width))
        channels = scale(stem)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        for s, (cout, blocks, stride) in enumerate(stages):
            cout = scale(cout)
            layers = []
            for b in range(blocks):
                layers.append(BasicBlock(channels, cout, stride if b == 0 else 1))
                channels = cout
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
        self.stage_count = len(stages)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for s in range(self.stage_count):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConvNet(nn.Module):
    def __init__(self, in_channels, classes, width):
        super().__init__()
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]
        blocks, cin = [], in_channels
        for i, cout in enumerate(widths):
            blocks.append(nn.Module())
            blocks[-1].conv = nn.Conv2d(cin, cout, 3, 1 if i == 0 else 2, 1, bias=False)
            blocks[-1].bn = nn.BatchNorm2d(cout)
            cin = cout
        self.features = nn.ModuleList(blocks)
        self.classifier = nn.Linear(cin, classes)

    def forward(self, x):
        for block in self.features:
            x = F.relu(block.bn(block.conv(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MLP(nn.Module):
    def __init__(self, inputs, classes, width):
        super().__init__()
        units = max(1, round(128 * width))
        blocks, cin = [], inputs
        for _ in range(2):
            blocks.append(nn.Module())
            blocks[-1].linear = nn.Linear(cin, units, bias=False)
            blocks[-1].bn = nn.BatchNorm1d(units)
            cin = units
        self.features = nn.ModuleList(blocks)
        self.classifier = nn.Linear(cin, classes)

    def forward(self, x):
        x = x.flatten(1)
        for block in self.features:
            x = F.relu(block.bn(block.linear(x)))
        return self.classifier(x)


def build(architecture):
    model, width = architecture["model"], architecture.get("width", 1.0)
    shape, classes = architecture["input_shape"], architecture["classes"]
    if model in ("resnet20", "resnet32", "resnet56", "resnet110"):
        n = (int(model[6:]) - 2) // 6
        return ResNet(16, [(16, n, 1), (32, n, 2), (64, n, 2)], shape[0], classes, width)
    if model == "resnet18":
        return ResNet(64, [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)], shape[0], classes, width)
    if model == "convnet":
        return ConvNet(shape[0], classes, width)
    if model == "mlp":
        return MLP(int(np.prod(shape)), classes, width)
    sys.exit(f"load_in_pytorch: model '{model}' is not covered")


def main():
    args = arguments(__doc__)
    with safe_open(args.checkpoint, "pt") as f:
        metadata = f.metadata()
    architecture = json.loads(metadata["architecture"])
    if architecture.get("norm") not in ("bn", "syncbn"):
        sys.exit(f"load_in_pytorch: --norm {architecture.get('norm')} has no torch.nn counterpart here (bn and syncbn only)")
    state = {k: v for k, v in load_file(args.checkpoint).items()
             if not k.startswith(("optimizer.", "ema.")) and "cbn_window" not in k}
    model = build(architecture)
    model.load_state_dict(state, strict=True)
    model = model.double().eval()
    raw = standardized_images(args.idx[0], metadata, args.limit) if args.idx else np.load(args.inputs)
    x = torch.from_numpy(raw.astype(np.float64))
    with torch.no_grad():
        logits = model(x).numpy()
    report("load_in_pytorch", architecture["model"] + " (strict load into torch.nn)", logits, args)


if __name__ == "__main__":
    main()
