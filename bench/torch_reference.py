"""The authors' CIFAR-10 ResNets in PyTorch, for side-by-side speed runs.

Run by ``bench/train_throughput.py --torch-python PATH`` with a Python that
has torch (torch is never a dependency of sb_keras). Written from the method
spec (Kang & Kim, arXiv 2006.05066, and the authors' code as described in
method.md §1.1-1.4 and §2), not copied: a CIFAR ResNet-6n+2 with option-A
shortcuts; in the shared variants every non-first block's 3x3 conv is
``cat(unique(x), shared(x)) -> BN -> 1x1 -> BN`` with one shared basis per
stage (single) or two (double, conv1s and conv2s), and the orthogonality
penalty (lambda 10, pooled mean over the shared rows and each layer's unique
diagonal block) is added to the loss every step.

It is a worker: it reads JSON lines from stdin (``{"model": name,
"steps": k}``) and answers each with the ``k`` step times in seconds, so
the caller can interleave it with the Keras models (A B A B).
"""

import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

# name: (depth, shared rank s, unique rank u, bases per stage or 0 = plain)
MODELS = {
    "resnet56": (56, 0, 0, 0),
    "resnet56_s16u1": (56, 16, 1, 1),
    "resnet56_s16u1_double": (56, 16, 1, 2),
}


class Decomposed(nn.Module):
    """One decomposed 3x3 conv: [unique, shared] basis -> BN -> 1x1 -> BN."""

    def __init__(self, channels, unique, shared):
        super().__init__()
        self.unique = nn.Conv2d(channels, unique, 3, 1, 1, bias=False)
        self.shared = shared  # an nn.Conv2d owned by the stage
        rank = unique + shared.out_channels
        self.basis_bn = nn.BatchNorm2d(rank)
        self.coefficients = nn.Conv2d(rank, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        z = torch.cat((self.unique(x), self.shared(x)), dim=1)
        return self.bn(self.coefficients(self.basis_bn(z)))


class Block(nn.Module):
    def __init__(self, cin, cout, stride, shared=None, unique=0):
        super().__init__()
        if shared is None:
            self.conv1 = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            )
            self.conv2 = nn.Sequential(
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.conv1 = Decomposed(cout, unique, shared[0])
            self.conv2 = Decomposed(cout, unique, shared[-1])
        self.pad = cout - cin
        self.stride = stride

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        shortcut = x
        if self.stride != 1 or self.pad:  # option A: subsample, zero-pad
            shortcut = x[:, :, :: self.stride, :: self.stride]
            p = self.pad // 2
            shortcut = F.pad(shortcut, (0, 0, 0, 0, p, self.pad - p))
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    def __init__(self, depth, s, u, bases, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        blocks, self.bases, self.uniques = [], [], []
        cin = 16
        for g, cout in enumerate((16, 32, 64)):
            shared = None
            if bases:
                rank = s * 2**g
                shared = [
                    nn.Conv2d(cout, rank, 3, 1, 1, bias=False) for _ in range(bases)
                ]
                self.bases.append(shared)
            stage_uniques = []
            for i in range(n):
                if i == 0 or not bases:
                    blocks.append(Block(cin, cout, 2 if (g and i == 0) else 1))
                else:
                    block = Block(cout, cout, 1, shared, u * 2**g)
                    stage_uniques += [block.conv1.unique, block.conv2.unique]
                    blocks.append(block)
                cin = cout
            self.uniques.append(stage_uniques)
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for shared in self.bases:
            w = torch.empty(
                sum(b.out_channels for b in shared), shared[0].weight[0].numel()
            )
            nn.init.orthogonal_(w)
            for b, rows in zip(shared, w.split([b.out_channels for b in shared])):
                b.weight.data.copy_(rows.view_as(b.weight))

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def orthogonality(self):
        """Pooled mean of (M M^T - I)^2 over the penalized entries (method §2)."""
        total, count = 0.0, 0
        for shared, uniques in zip(self.bases, self.uniques):
            rows = [b.weight.flatten(1) for b in shared]
            n_shared = sum(r.shape[0] for r in rows)
            m = torch.cat(rows + [c.weight.flatten(1) for c in uniques])
            d = (m[:n_shared] @ m.t() - torch.eye(n_shared, m.shape[0])) ** 2
            total = total + d.sum()  # every entry in the shared rows
            count += d.numel()
            for c in uniques:
                w = c.weight.flatten(1)
                e = (w @ w.t() - torch.eye(w.shape[0])) ** 2
                total, count = total + e.sum(), count + e.numel()
        return total / max(count, 1)


def main():
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    torch.manual_seed(0)
    x = torch.rand(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    built = {}
    for line in sys.stdin:
        request = json.loads(line)
        name = request["model"]
        if name not in built:
            model = ResNet(*MODELS[name]).train()
            opt = torch.optim.SGD(
                model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4
            )
            built[name] = (model, opt)
        model, opt = built[name]
        times = []
        for _ in range(request["steps"]):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if model.bases:
                loss = loss + 10.0 * model.orthogonality()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        print(
            json.dumps({"model": name, "times": times, "torch": torch.__version__}),
            flush=True,
        )


if __name__ == "__main__":
    main()
