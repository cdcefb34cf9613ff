"""The second layout of issue 10, measured: batch rows in blocks, the gradient computed inside the forward.

Each row block of ``row_block`` samples sees all C classes at once, so its softmax is exact in one pass and only
three GEMMs run per block (logits, dX, dW accumulated), at the price of reading W (and writing dW) once per row
block. The prototype here is ArcFace only and lives in benchmarks/, beside the chunked engine it is timed
against (class blocks, 3 GEMMs with ``keep_mb`` or 4 when the backward recomputes):

    python benchmarks/row_layout.py                     # B = 512, C = 93,431 and 360,232, D = 512, 2 threads
    python benchmarks/row_layout.py --classes 20000 --rounds 3 --row-blocks 64 128 512

Math of one row block r (x̂ normalised rows, inv_c = 1/‖w_c‖, T the ArcFace target of c_y, s the scale):
    c = (x̂_r Wᵀ)·inv,  z = s·c with z_y = s·T(c_y),  p = softmax(z),  loss_r = Σ_i (logsumexp z_i − z_iy)
    G = s·p (and G_iy = s·(p_iy − 1)·T'(c_iy)),  Gs = G·inv / B
    dx̂_r = Gs W,  U += Gsᵀ x̂_r;   finally dW = U − ((U ⊙ W)·1)·inv² ⊙ W   (the same closing step as chunked)
The variants alternate round by round in one process; the ratio per round is taken to the chunked engine's
default (keep when B·C fits 256 MiB), and loss and both gradients are checked equal to it first.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

import marginface as mf


class RowBlockArcFace(torch.autograd.Function):
    """Loss (mean over the batch) of ArcFace from (x̂, W); the gradients are computed in the forward."""

    @staticmethod
    def forward(ctx, x_hat, weight, labels, s: float, m: float, row_block: int):
        batch = x_hat.shape[0]
        inv = weight.norm(dim=1).clamp_min(1e-12).reciprocal()
        cos_m, sin_m = math.cos(m), math.sin(m)
        grad_x = torch.empty_like(x_hat)
        u = torch.zeros_like(weight)
        total = x_hat.new_zeros(())
        for start in range(0, batch, row_block):
            rows = slice(start, min(start + row_block, batch))
            xr, yr = x_hat[rows], labels[rows]
            arange = torch.arange(xr.shape[0])
            z = (xr @ weight.t()).mul_(inv)  # cosines, then logits in place
            c_y = z[arange, yr].clamp(-1.0, 1.0)
            sin_y = (1.0 - c_y * c_y).clamp_min(0.0).sqrt()
            target = c_y * cos_m - sin_y * sin_m  # cos(θ + m), the fallback left out as in the simplest reference
            slope = cos_m + c_y * sin_m / sin_y.clamp_min(1e-12)  # dT/dc
            z.mul_(s)
            z[arange, yr] = s * target
            lse = torch.logsumexp(z, dim=1)
            total = total + (lse - s * target).sum()
            p = z.sub_(lse[:, None]).exp_()  # softmax in place
            p[arange, yr] = (p[arange, yr] - 1.0) * slope
            grad = p.mul_(inv * (s / batch))
            grad_x[rows] = grad @ weight
            u.addmm_(grad.t(), xr)
        along = (u * weight).sum(1)
        grad_w = u.addcmul_((along * inv * inv)[:, None], weight, value=-1.0)
        ctx.save_for_backward(grad_x, grad_w)
        return total / batch

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None, None


def step(kind: str, x, weight, labels, head=None, row_block: int = 0):
    x.grad = None
    weight.grad = None
    if kind == "row":
        loss = RowBlockArcFace.apply(F.normalize(x, dim=1), weight, labels, 64.0, 0.5, row_block)
    else:
        loss = head(x, labels)
    loss.backward()
    return loss.detach(), x.grad, weight.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[93_431, 360_232])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--row-blocks", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B = {args.batch}, D = {args.dim}, "
          f"ArcFace s = 64, m = 0.5, fp32; median of {args.rounds} interleaved rounds")
    print("| C | variant | s/step (median) | best | / chunked default |")
    print("|---:|---|---:|---:|---:|")
    for classes in args.classes:
        torch.manual_seed(0)
        x = torch.randn(args.batch, args.dim, requires_grad=True)
        labels = torch.randint(classes, (args.batch,))
        heads = {}
        for name, options in (("chunked (default keep)", {}), ("chunked keep_mb=0 (4 GEMMs)", {"keep_mb": 0})):
            head = mf.heads.create("arcface", num_classes=classes, embedding_size=args.dim, engine="chunked",
                                   engine_params=options, s=64.0, m=0.5)
            heads[name] = head
        weight = next(iter(heads.values())).weight
        for head in heads.values():
            head.weight = weight  # one W for every variant
        variants = {name: partial(step, "chunked", x, weight, labels, head=head) for name, head in heads.items()}
        for block in args.row_blocks:
            variants[f"row blocks of {block}"] = partial(step, "row", x, weight, labels, row_block=block)
        reference = [t.clone() for t in variants["chunked (default keep)"]()]
        for name, run in variants.items():
            got = run()
            errors = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, reference, strict=True)]
            if max(errors) > 1e-4:
                raise SystemExit(f"{name} differs from the chunked engine (relative {max(errors):.1e})")
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        base = times["chunked (default keep)"]
        for name, values in times.items():
            ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
            print(f"| {classes:,} | {name} | {statistics.median(values):.3f} | {min(values):.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
