"""Training-step benchmark: marginface's step beside a reference loop written the way arcface_torch does it.

Both sides train the same backbone (same weights, same batches) with an ArcFace-type head; the reference
normalises the class centres every step, runs arccos/cos over the whole logit matrix under no_grad (the
straight-through margin), computes the softmax by max-subtract-exp-sum-divide and takes the log of the target
probability, then steps SGD on every parameter with weight decay. marginface's side is the real
`marginface.train.trainer.optimizer_step` (with its non-finite guard and gradient-norm pass) on a
`TrainingModule` with a CurricularFace head. Steps are interleaved round-robin in one process; reported:
images/s of each and the median per-round ratio.

    python benchmarks/train.py                               # small_cnn 56x56 and mobilefacenet 112x112
    python benchmarks/train.py --models small_cnn --classes 400 --batch 128 --rounds 10
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import marginface as mf
from marginface.train.config import OptimizerConfig
from marginface.train.distributed import World
from marginface.train.optim import build_optimizer
from marginface.train.trainer import TrainingModule, optimizer_step

SETTINGS = {"small_cnn": {"input": 56, "embedding": 128}, "mobilefacenet": {"input": 112, "embedding": 512}}


class ReferenceArcFaceHead(nn.Module):
    """A single-rank head computed the way arcface_torch's PartialFC_V2 + CombinedMarginLoss + DistCrossEntropy do."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.normal(0, 0.01, (num_classes, embedding_size)))
        self.s, self.m = s, m

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = F.linear(F.normalize(embeddings), F.normalize(self.weight)).clamp(-1, 1)
        index = torch.arange(len(labels))
        target = logits[index, labels].view(-1, 1)
        with torch.no_grad():  # the margin on the angle, in place, gradient passed straight through
            target.arccos_()
            logits.arccos_()
            logits[index, labels] = (target + self.m).view(-1)
            logits.cos_()
        logits = logits * self.s
        maximum = logits.max(dim=1, keepdim=True).values.detach()
        exp = (logits - maximum).exp()
        probability = exp / exp.sum(dim=1, keepdim=True)
        return -probability[index, labels].clamp_min(1e-30).log().mean()


def reference_step(backbone, head, optimizer, images, labels) -> float:
    loss = head(backbone(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def run(model_name: str, classes: int, batch: int, rounds: int, steps_per_round: int) -> dict[str, float]:
    setting = SETTINGS[model_name]
    torch.manual_seed(0)
    kwargs = {"input_size": setting["input"]} if model_name == "small_cnn" else {}
    backbone_ours = mf.models.create(model_name, embedding_size=setting["embedding"], **kwargs)
    backbone_reference = mf.models.create(model_name, embedding_size=setting["embedding"], **kwargs)
    backbone_reference.load_state_dict(backbone_ours.state_dict())
    head = mf.heads.create("curricularface", num_classes=classes, embedding_size=setting["embedding"], s=30.0, m=0.3)
    ours = TrainingModule(backbone_ours, head).train()
    reference_head = ReferenceArcFaceHead(classes, setting["embedding"], s=30.0, m=0.3)
    backbone_reference.train()
    optimizer_ours = build_optimizer([ours], OptimizerConfig(lr=0.01))
    optimizer_reference = torch.optim.SGD(
        list(backbone_reference.parameters()) + list(reference_head.parameters()), lr=0.01, momentum=0.9,
        weight_decay=5e-4,
    )
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    world = World()
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(batch, 3, setting["input"], setting["input"], generator=generator),
         torch.randint(0, classes, (batch,), generator=generator))
        for _ in range(steps_per_round)
    ]

    def ours_round() -> None:
        for images, labels in batches:
            optimizer_step(ours, ours, optimizer_ours, scaler, [(images, labels)], world)

    def reference_round() -> None:
        for images, labels in batches:
            reference_step(backbone_reference, reference_head, optimizer_reference, images, labels)

    ours_round()  # warm-up
    reference_round()
    ours_times, reference_times = [], []
    for index in range(rounds):
        order = [(ours_round, ours_times), (reference_round, reference_times)]
        for function, times in order if index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
    images_per_round = batch * steps_per_round
    return {
        "ours_images_per_second": images_per_round / statistics.median(ours_times),
        "reference_images_per_second": images_per_round / statistics.median(reference_times),
        "speedup": statistics.median(r / o for o, r in zip(ours_times, reference_times, strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--classes", type=int, default=400, help="400: the synthetic demo's identities")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-round", type=int, default=4)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.classes} classes, fp32 CPU, median of {args.rounds} interleaved rounds")
    print("| backbone | marginface (img/s) | arcface_torch-style loop (img/s) | speed-up |")
    print("|---|---:|---:|---:|")
    for name in args.models:
        result = run(name, args.classes, args.batch, args.rounds, args.steps_per_round)
        assert math.isfinite(result["speedup"])
        print(f"| {name} ({SETTINGS[name]['input']}x{SETTINGS[name]['input']}) | "
              f"{result['ours_images_per_second']:.0f} | {result['reference_images_per_second']:.0f} | "
              f"{result['speedup']:.2f} |")


if __name__ == "__main__":
    main()
