#!/usr/bin/env python3
"""What cross-iteration BN costs in PyTorch: BN's step against CBN's on the same network, CPU and
threads, so that syncbn's CBN/BN ratio has a reference point.

CBN here follows the paper's method (Yao et al. 2021, "Cross-Iteration Batch Normalization") as
the reference implementation computes it: every training step takes the batch's per-channel mean
and mean of squares of the convolution's output y, their derivatives with respect to the
convolution's own weights, and averages them with the last k - 1 steps' values compensated by a
Taylor step, μ_τ + ∂μ_τ/∂W_τ·(W_t − W_τ) (and likewise for E[y²]); entries whose compensated
variance is negative are left out. The gradient flows through the current batch's statistics.

    --derivatives two-calls   both derivatives by autograd through the convolution, as the
                              reference code does: two backward-weights passes over the batch;
    --derivatives one-call    ∂E[y²]/∂W by autograd (one pass), ∂μ/∂W from the batch's summed
                              input (a pass at batch 1; the same values by linearity), as syncbn
                              computes them;
    --derivatives none        neither derivative and no past steps: the same Python layer as
                              plain BN, to tell its own overhead (unfused element-wise work
                              beside PyTorch's native BN) from the derivatives' cost.

BN and CBN alternate in one process, in blocks of steps, on random 1×28×28 images (ResNet-20)
or 3×32×32 (ResNet-18); prints one JSON line with each arm's median step and their ratio.

    python3 tools/torch_cbn.py --peers ../shared/peers [--model resnet20|resnet18] [--batch 32]
        [--threads 1] [--window 4] [--derivatives two-calls|one-call|none] [--blocks 3] [--steps 20]
    python3 tools/torch_cbn.py --peers ../shared/peers --check   # the layer against its definitions
"""
import argparse, json, os, statistics, sys, time


def fail(message):
    print(f"torch_cbn.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", required=True, help="folder holding resnet.py (CifarResNet, SmallImageResNet18)")
    p.add_argument("--model", choices=["resnet20", "resnet18"], default="resnet20")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--window", type=int, default=4, help="k: the current step and k - 1 past ones")
    p.add_argument("--derivatives", choices=["two-calls", "one-call", "none"], default="two-calls")
    p.add_argument("--blocks", type=int, default=3, help="alternations of the two arms")
    p.add_argument("--steps", type=int, default=20, help="timed steps per arm and block")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per arm and block")
    p.add_argument("--check", action="store_true",
                   help="check the layer in Double (one-call derivatives against autograd's, a window of "
                        "one against nn.BatchNorm2d, the compensation against its Taylor step) and exit")
    a = p.parse_args()
    if a.batch < 2 or a.threads < 1 or a.window < 1 or a.blocks < 1 or a.steps < 1 or a.warmup < 0:
        fail("--batch must be ≥ 2 and --threads, --window, --blocks, --steps ≥ 1 (--warmup ≥ 0)")
    if not os.path.isfile(os.path.join(a.peers, "resnet.py")):
        fail(f"no resnet.py in {a.peers}")
    sys.path.insert(0, a.peers)
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import resnet
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    class CrossIterationBN2d(nn.Module):
        """BN over the current step and the last window - 1 steps' compensated statistics."""

        def __init__(self, bn, conv, window, derivatives):
            super().__init__()
            self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps
            self.conv = [conv]  # a list, so that the convolution is not a submodule twice
            self.window, self.derivatives = window, derivatives
            self.past = []  # (μ, E[y²], ∂μ/∂W, ∂E[y²]/∂W, W), newest first

        def forward(self, y):
            conv = self.conv[0]
            w = conv.weight
            mean = y.mean(dim=(0, 2, 3))
            square = (y * y).mean(dim=(0, 2, 3))
            if self.derivatives == "none":
                return self.normalized(y, mean, square - mean * mean)
            ones = torch.ones_like(mean)
            if self.derivatives == "two-calls":
                d_mean = torch.autograd.grad(mean, w, ones, retain_graph=True)[0]
            else:
                x = self.input
                summed = x.detach().sum(dim=0, keepdim=True)
                out_grad = torch.full((1, 1) + tuple(y.shape[2:]), 1.0 / y[:, 0].numel(), dtype=y.dtype)
                per_channel = torch.nn.grad.conv2d_weight(summed, (1,) + tuple(w.shape[1:]), out_grad,
                                                          stride=conv.stride, padding=conv.padding)
                d_mean = per_channel.expand_as(w)
            d_square = torch.autograd.grad(square, w, ones, retain_graph=True)[0]
            means, squares = [mean], [square]
            with torch.no_grad():
                for m, s, dm, ds, w_past in self.past:
                    delta = w - w_past
                    means.append(m + (dm * delta).sum(dim=(1, 2, 3)))
                    squares.append(s + (ds * delta).sum(dim=(1, 2, 3)))
            means, squares = torch.stack(means), torch.stack(squares)
            valid = (squares - means * means >= 0).to(y.dtype)
            valid[0] = 1.0
            count = valid.sum(dim=0)
            mu = (means * valid).sum(dim=0) / count
            var = (squares * valid).sum(dim=0) / count - mu * mu
            entry = (mean.detach(), square.detach(), d_mean.detach().clone(), d_square.detach(), w.detach().clone())
            self.past = ([entry] + self.past)[: self.window - 1]
            return self.normalized(y, mu, var)

        def normalized(self, y, mean, var):
            scale = self.weight / torch.sqrt(var.clamp_min(0) + self.eps)
            return (y - mean[None, :, None, None]) * scale[None, :, None, None] + self.bias[None, :, None, None]

    def pairs(model):
        """(parent, name of the BN, its BN, the convolution that feeds it)."""
        found = []
        for module in model.modules():
            for conv_name, bn_name in (("conv1", "bn1"), ("conv2", "bn2")):
                if isinstance(getattr(module, bn_name, None), nn.BatchNorm2d):
                    found.append((module, bn_name, getattr(module, bn_name), getattr(module, conv_name)))
            down = getattr(module, "downsample", None)
            if isinstance(down, nn.Sequential):
                found.append((down, "1", down[1], down[0]))
        return found

    def build(cbn):
        if a.model == "resnet20":
            model, shape = resnet.CifarResNet(20, in_channels=1), (1, 28, 28)
        else:
            model, shape = resnet.SmallImageResNet18(in_channels=3), (3, 32, 32)
        if cbn:
            for parent, name, bn, conv in pairs(model):
                layer = CrossIterationBN2d(bn, conv, a.window, a.derivatives)
                if a.derivatives == "one-call":
                    conv.register_forward_pre_hook(lambda m, args, layer=layer: setattr(layer, "input", args[0]))
                setattr(parent, name, layer)
        return model, shape

    if a.check:
        check(torch, nn, CrossIterationBN2d)
        return

    arms = {}
    for name, cbn in (("bn", False), ("cbn", True)):
        torch.manual_seed(0)
        model, shape = build(cbn)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        data = torch.randn((a.batch,) + shape)
        labels = torch.randint(0, 10, (a.batch,))
        arms[name] = (model, optimizer, data, labels, [])

    def step(model, optimizer, data, labels):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(data), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(a.blocks):
        for name, (model, optimizer, data, labels, times) in arms.items():
            model.train()
            for _ in range(a.warmup):
                step(model, optimizer, data, labels)
            for _ in range(a.steps):
                start = time.perf_counter()
                loss = step(model, optimizer, data, labels)
                times.append(time.perf_counter() - start)
                if loss != loss:
                    fail(f"the {name} arm's loss became NaN")
    medians = {name: statistics.median(arm[4]) * 1000 for name, arm in arms.items()}
    print(json.dumps({"model": a.model, "batch": a.batch, "threads": a.threads, "window": a.window,
                      "derivatives": a.derivatives, "torch": torch.__version__,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "bn_step_ms": round(medians["bn"], 2), "cbn_step_ms": round(medians["cbn"], 2),
                      "cbn_over_bn": round(medians["cbn"] / medians["bn"], 3),
                      "timed_steps_per_arm": a.blocks * a.steps}))


def check(torch, nn, layer_type):
    """Fails unless the layer meets its definitions in Double; prints one line if it does."""
    torch.manual_seed(0)
    for stride, padding, k in ((1, 1, 3), (2, 1, 3), (2, 0, 1)):
        conv = nn.Conv2d(4, 6, k, stride, padding, bias=False).double()
        bn = nn.BatchNorm2d(6).double()
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        x = torch.randn(5, 4, 9, 9, dtype=torch.float64)
        results = {}
        for derivatives in ("two-calls", "one-call"):
            layer = layer_type(bn, conv, 3, derivatives)
            layer.input = x
            first = layer(conv(x))
            results[derivatives] = layer.past[0][2]
            if (first - bn.train()(conv(x))).abs().max().item() > 1e-12:
                fail(f"a window of one step differs from nn.BatchNorm2d ({derivatives}, stride {stride}, {k}×{k})")
            layer.input = x
            again = layer(conv(x))  # the same weights: the past step, compensated, is this one
            if (again - first).abs().max().item() > 1e-12:
                fail(f"an unchanged step does not reproduce itself through the window ({derivatives})")
            # New weights, the same input: the past step's μ, compensated, is exactly the new one (y is
            # linear in W); its E[y²] is the first-order step E[y_τ²] + 2·E[y_τ·(x ⋆ ΔW)].
            layer = layer_type(bn, conv, 2, derivatives)
            layer.input = x
            y_past = conv(x).detach()
            layer(conv(x))
            delta = torch.randn_like(conv.weight) * 0.05
            with torch.no_grad():
                conv.weight += delta
            y = conv(x).detach()
            layer.input = x
            out = layer(conv(x)).detach()
            shifted = torch.nn.functional.conv2d(x, delta, stride=stride, padding=padding)
            square_now, square_past = (y * y).mean(dim=(0, 2, 3)), (y_past * y_past).mean(dim=(0, 2, 3))
            square_compensated = square_past + (2 * y_past * shifted).mean(dim=(0, 2, 3))
            mu = y.mean(dim=(0, 2, 3))
            valid = (square_compensated - mu * mu >= 0).double()
            var = (square_now + valid * square_compensated) / (1 + valid) - mu * mu
            expected = ((y - mu[None, :, None, None]) / torch.sqrt(var + bn.eps)[None, :, None, None]
                        * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]).detach()
            if (out - expected).abs().max().item() > 1e-10:
                fail(f"the compensated statistics differ from their Taylor step ({derivatives}, stride {stride}, {k}×{k})")
            with torch.no_grad():
                conv.weight -= delta
        if (results["one-call"] - results["two-calls"]).abs().max().item() > 1e-12:
            fail(f"∂μ/∂W from the summed input differs from autograd's (stride {stride}, {k}×{k})")
    print("torch_cbn.py: check passed (Double: ∂μ/∂W both ways, window of one = BatchNorm2d, unchanged steps, the Taylor step)")


if __name__ == "__main__":
    main()
