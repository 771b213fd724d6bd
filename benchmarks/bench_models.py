"""Recording the models researchers train: overhead (with ÷ without the Recorder, the same run,
alternated rep by rep) and bytes on disk per training token / image, for a small Hugging Face
GPT-2 (built from a config, no download) and a ResNet-style CNN with BatchNorm.

    python benchmarks/bench_models.py [--reps 3] [--json benchmarks/out/models.json]

Bytes grow with what a layer sees per example: a convolution keeps one pattern per output
position, so an image costs (output positions × (patch + channels)) per conv layer; a language
model one pattern per token per layer. Both are measured from the written bundle.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from dualtui.bundle import Bundle
from dualtui.record import Recorder


def gpt2(vocab: int = 256, width: int = 64, layers: int = 2, context: int = 64) -> nn.Module:
    import transformers

    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=context, n_embd=width, n_layer=layers, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = transformers.GPT2LMHeadModel(cfg)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=ids).logits

    return LM()


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class ResNet(nn.Module):
    """stem conv + BN, two residual blocks (16 channels), a second stage at stride 2 (32), head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.block1 = Block(16)
        self.down, self.bn2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32)
        self.block2 = Block(32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block1(F.relu(self.bn(self.stem(x))))
        h = self.block2(F.relu(self.bn2(self.down(h))))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def one_run(make, data, steps: int, batch: int, record: bool, path: Path, check: bool = True) -> float:
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    X, Y = data
    g = torch.Generator().manual_seed(0)
    order = [torch.randperm(len(X), generator=g)[:batch] for _ in range(steps)]
    rec = None
    if record:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec = Recorder(model, opt, path, check_attribution=check)
    t0 = time.perf_counter()
    def step(ids: torch.Tensor) -> None:
        out = model(X[ids])
        F.cross_entropy(out.reshape(-1, out.shape[-1]), Y[ids].reshape(-1)).backward()

    for ids in order:
        opt.zero_grad()
        if rec is not None:
            with rec.batch(example=ids):
                step(ids)
        else:
            step(ids)
        opt.step()
    t = time.perf_counter() - t0
    if rec is not None:
        rec.close()
    return t


def measure(name: str, make, data, steps: int, batch: int, reps: int, tmp: Path, per_example: int) -> dict:
    base, rec, nocheck = [], [], []
    one_run(make, data, 2, batch, True, tmp / "warm.safetensors")
    for r in range(reps):
        base.append(one_run(make, data, steps, batch, False, tmp / "x.safetensors"))
        rec.append(one_run(make, data, steps, batch, True, tmp / f"{name}.safetensors"))
        nocheck.append(one_run(make, data, steps, batch, True, tmp / "nocheck.safetensors", check=False))
    b = Bundle.open(tmp / f"{name}.safetensors")
    size = b.size_bytes
    units = steps * batch * per_example
    return {"model": name, "steps": steps, "batch": batch, "layers": len(b.manifest.layers),
            "not_covered": b.manifest.extra.get("not_covered"), "seconds_without": statistics.median(base),
            "seconds_with": statistics.median(rec), "ratio": statistics.median(rec) / statistics.median(base),
            "seconds_with_check_off": statistics.median(nocheck),
            "ratio_check_off": statistics.median(nocheck) / statistics.median(base),
            "checked_steps": len(b.manifest.attribution.get("steps", [])),
            "bundle_bytes": size, "bytes_per_unit": size / units, "unit": "token" if per_example > 1 else "image",
            "patterns": {s.name: s.patterns for s in b.manifest.layers}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    print(f"# load average {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}")
    results = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        g = torch.Generator().manual_seed(1)
        L = 64
        text = (torch.randint(0, 256, (256, L), generator=g), torch.randint(0, 256, (256, L), generator=g))
        results.append(measure("gpt2 (width 64, 2 blocks, context 64, vocab 256)", gpt2, text, 100, 8, args.reps, tmp, L))
        imgs = (torch.randn(256, 1, 16, 16, generator=g), torch.randint(0, 10, (256,), generator=g))
        results.append(measure("resnet-style CNN with BatchNorm (16x16 images)", ResNet, imgs, 40, 16, args.reps, tmp, 1))
    for r in results:
        print(f"## {r['model']}: {r['layers']} recorded layers, not covered: {r['not_covered'] or 'nothing'}")
        print(f"train {r['steps']} steps of {r['batch']}: without {r['seconds_without']:.3f} s | with {r['seconds_with']:.3f} s "
              f"| ratio {r['ratio']:.2f}x ({r['checked_steps']} steps checked; attribution check off: {r['ratio_check_off']:.2f}x)")
        print(f"bundle {r['bundle_bytes'] / 2**20:.1f} MiB = {r['bytes_per_unit']:,.0f} B per training {r['unit']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
