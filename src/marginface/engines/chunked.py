"""The chunked engine: streams the classes in blocks, so no [B, C] matrix and no normalised copy of W ever exists.

Memory: W's gradient [C, D] (which any engine writes) plus a few [B, chunk_size] blocks; optionally one kept
[B, C] tensor (``keep_mb``) that saves the backward its recomputing GEMM.
"""

from __future__ import annotations

import torch
from torch import Tensor

from marginface.engines.base import (
    ClassPass,
    Engine,
    block_target_index,
    check_int_option,
    check_number_option,
    class_block,
    count_hard,
    inverse_norms,
    rows_of,
    subcentre_rows,
    target_cosines,
)
from marginface.engines.sampling import GradientBuffer
from marginface.margins.base import PAIRWISE_REDUCERS, BlockScratch, Margin, RowContext

# chunk_size=None picks BLOCK_ELEMENTS / B classes (a power of two, at least MIN_CHUNK): measured on 2 CPU
# threads at B = 128 and 512 (docs/benchmarks.md), a [B, chunk] block of about 2^19 fp32 values (2 MiB) keeps
# each block's GEMM at full speed and the per-block overhead small while its elementwise passes stay near cache
# (2^18 was best before the block passes stopped allocating; 2^20 favours ArcFace and slows the mining heads).
BLOCK_ELEMENTS = 2**19
MIN_CHUNK = 256
# Keeping exp(z − m_b)·dN/dc for the backward saves one GEMM in four; up to this size it is worth the memory.
DEFAULT_KEEP_MB = 256.0


class ChunkedEngine(Engine):
    """Streams ``chunk_size`` classes at a time through one autograd Function (``ChunkedClassPass``).

    ``chunk_size``: classes per block (None: about 2^19 / B, measured). ``keep_mb``: when the batch's [B, C]
    block products fit in this many MiB they are kept from the forward (3 GEMMs in all); otherwise the backward
    recomputes them (4 GEMMs). 0 always recomputes.
    """

    name = "chunked"

    def __init__(self, chunk_size: int | None = None, keep_mb: float = DEFAULT_KEEP_MB) -> None:
        super().__init__()
        self.chunk_size = None if chunk_size is None else check_int_option(self.name, "chunk_size", chunk_size, 1)
        self.keep_mb = check_number_option(self.name, "keep_mb", keep_mb, minimum=0.0)

    def class_pass(
        self,
        margin: Margin,
        x_hat: Tensor,
        weight: Tensor,
        labels: Tensor,
        ctx: RowContext,
        scale: float | Tensor,
        count_hard_negatives: bool,
        subcenters: int = 1,
    ) -> ClassPass:
        keys = tuple(margin.row_reductions)
        scale_tensor = scale if isinstance(scale, Tensor) else None
        scale_value = None if isinstance(scale, Tensor) else float(scale)
        inputs = (x_hat, weight) if scale_tensor is None else (x_hat, weight, scale_tensor)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        rows, gradient = self.pass_rows()
        classes = weight.shape[0] // subcenters if rows is None else rows.shape[0]
        keep = needs_grad and x_hat.shape[0] * classes * x_hat.element_size() <= self.keep_mb * 2**20
        count_hard_negatives = count_hard_negatives and "threshold" in ctx  # margins without one have no count
        target_cos, negatives_lse, hard, *stats = ChunkedClassPass.apply(
            x_hat, weight, scale_tensor, labels, margin, ctx, scale_value,
            self.block_classes(x_hat.shape[0]), keep, needs_grad, count_hard_negatives, rows, gradient, subcenters,
        )  # fmt: skip
        hard_count = hard if count_hard_negatives else None
        return ClassPass(target_cos, negatives_lse, dict(zip(keys, stats, strict=True)), hard_count)


    def block_classes(self, batch: int) -> int:
        """The classes per block for a batch of ``batch`` rows."""
        if self.chunk_size is not None:
            return self.chunk_size
        return max(MIN_CHUNK, 1 << max(0, (BLOCK_ELEMENTS // max(1, batch)).bit_length() - 1))


def nearest_subcentre(cos: Tensor, subcenters: int) -> tuple[Tensor, Tensor]:
    """cos θ_j = max_k cos θ_{j,k} of a [B, n·K] block -> ([B, n], the chosen k as uint8 [B, n])."""
    values, choice = cos.view(cos.shape[0], -1, subcenters).max(dim=2)
    return values, choice.to(torch.uint8)


def spread_to_subcentres(grad: Tensor, choice: Tensor, subcenters: int) -> Tensor:
    """The [B, n] gradient of the class cosines onto the chosen sub-centres' columns of [B, n·K] (0 elsewhere)."""
    full = grad.new_zeros(grad.shape[0], grad.shape[1], subcenters)
    return full.scatter_(2, choice.long()[..., None], grad[..., None]).view(grad.shape[0], -1)


def mask_targets(z: Tensor, target_index: Tensor, value: float | Tensor) -> None:
    """z[i, target_index[i]] = value (or value[i]) for the rows whose target lies in this block, in place.

    Rows whose target lies elsewhere rewrite their column 0 with its own value: B-sized work and no
    data-dependent shapes, so CUDA never waits for the host.
    """
    inside = target_index >= 0
    index = torch.where(inside, target_index, 0)[:, None]
    current = z.gather(1, index)[:, 0]
    new = value if isinstance(value, Tensor) else torch.full_like(current, value)
    z.scatter_(1, index, torch.where(inside, new.to(z.dtype), current)[:, None])


class ChunkedClassPass(torch.autograd.Function):
    r"""The class pass in blocks W_b of ``chunk_size`` centres; its outputs are those of ``engines.base.ClassPass``.

    Forward, per block b with inv_b = 1/‖w_c‖ (a per-column scale, W is never normalised):

        c = (x̂ W_bᵀ)·inv_b,   z = s_i·N(c)  (target column −inf),   m_b = max_j z,   e = exp(z − m_b)
        L ← logaddexp(L, m_b + log Σ_j e)          (online log-sum-exp: L = log Σ_{j≠y} e^{s·N(c_j)})

    plus the margin's row statistics (combined with their declared reductions) and the hard-negative count.
    cos θ_y is an indexed dot product (B·D). With q = exp(z − L) = e·exp(m_b − L) (the softmax over the
    negatives) and upstream gradients g_L (of L) and g_y (of cos θ_y), the gradient of the block's cosines is

        G = g_L·s·q·N'(c)  and  G[i, y_i] = g_y,i      (q is 0 at the target; N' is the margin's slope)

    and since c_ij = x̂_i·w_j·inv_j, with Gs = G·inv_b and U = Gsᵀ x̂:

        dx̂ += Gs W_b,    dW_b = U − ((U ⊙ W_b)·1)·inv_b² ⊙ W_b,    ds_i = Σ_j q_ij N_ij

    so the target's gradient rides on the same two GEMMs and dW is written once, block by block. The backward
    recomputes e from the saved m_b and L (4 GEMMs in all) unless the forward kept e·N' within the byte budget
    (3 GEMMs). NaN and ±inf propagate into L (the trainer's guard sees a non-finite loss).

    With ``rows`` (Partial FC's kept classes, sorted) the pass runs over W[rows] only, gathering each block as it
    goes; the labels are positions in ``rows`` and dW lands in the rows ``rows`` of a reused buffer
    (``GradientBuffer``), zero elsewhere.

    With K ``subcenters`` a class is K rows of W and c_ij = max_k c_ijk (Sub-center ArcFace): the block's
    [B, n·K] cosines are reduced to [B, n] with the chosen k kept (uint8), and the backward puts G_ij on the
    chosen sub-centre's column only, so the same two GEMMs run on the [n·K, D] block.
    """

    @staticmethod
    def forward(
        ctx,
        x_hat: Tensor,
        weight: Tensor,
        scale_tensor: Tensor | None,
        labels: Tensor,
        margin: Margin,
        row_ctx: RowContext,
        scale_value: float | None,
        chunk_size: int,
        keep: bool,
        needs_grad: bool,
        count_hard_negatives: bool,
        rows: Tensor | None = None,
        gradient: GradientBuffer | None = None,
        subcenters: int = 1,
    ):
        batch = x_hat.shape[0]
        classes = weight.shape[0] // subcenters if rows is None else rows.shape[0]
        row_scale = scale_tensor[:, None] if scale_tensor is not None else scale_value
        # the plain path (ArcFace, CosFace, ...) scales the product once in place and does nothing else per block
        plain = margin.identity_negatives and not margin.row_reductions and scale_tensor is None
        plain = plain and not count_hard_negatives
        target_cos = target_cosines(x_hat, weight, labels if rows is None else rows_of(rows, labels), subcenters)
        lse = x_hat.new_full((batch,), float("-inf"))
        stats: dict[str, Tensor] = {}
        hard = x_hat.new_zeros(batch, dtype=torch.long)
        block_max, block_dot, kept, choices, inverses = [], [], [], [], []
        scratch = BlockScratch(lent=True)  # the margin's temporaries, reused from block to block
        for start in range(0, classes, chunk_size):
            stop = min(start + chunk_size, classes)
            block = class_block(weight, rows, start, stop, subcenters)
            inv = inverse_norms(block)
            inverses.append(inv)
            target_index = block_target_index(labels, start, stop)
            # a kept block is its own memory; otherwise the product reuses one buffer
            product = x_hat @ block.t() if keep else block_product(x_hat, block, scratch)
            if subcenters > 1:  # the class cosines, normalised before the max over sub-centres
                product, choice = nearest_subcentre(product.mul_(inv), subcenters)
                inv = None
                if keep:
                    choices.append(choice)
            if plain:
                z, values, slope = product.mul_(scale_value if inv is None else inv * scale_value), None, 1.0
            else:
                cos = product if inv is None else product.mul_(inv)
                for key, part in margin.row_statistics(cos, target_index, row_ctx, scratch).items():
                    combine = PAIRWISE_REDUCERS[margin.row_reductions[key]]
                    stats[key] = part if key not in stats else combine(stats[key], part)
                if count_hard_negatives:
                    hard += count_hard(cos, row_ctx, target_index, scratch)
                values, slope = margin.negatives_with_slope(cos, row_ctx, scratch)
                # N is written over the block (scratch.output), and scaled in place unless ds needs it after exp
                z = values * row_scale if scale_tensor is not None and needs_grad else values.mul_(row_scale)
            mask_targets(z, target_index, float("-inf"))
            shift = finite_shift(z.amax(dim=1))
            e = z.sub_(shift[:, None]).exp_()
            lse = torch.logaddexp(lse, shift + e.sum(1).log())
            block_max.append(shift)
            if scale_tensor is not None and needs_grad:
                block_dot.append((e * values).sum(1))
            if keep:
                kept.append(e.mul_(slope) if isinstance(slope, Tensor) else e)
        outputs = [target_cos, lse, hard, *(stats[key] for key in margin.row_reductions)]
        ctx.mark_non_differentiable(*outputs[2:])
        if needs_grad:
            block_max = torch.stack(block_max, 1)
            # ds_i = Σ_j q_ij N_ij, from each block's Σ_j e_ij N_ij and its shift once L is final
            scale_dot = (torch.stack(block_dot, 1) * torch.exp(block_max - lse[:, None])).sum(1) if block_dot else None
            # 1/‖w‖ is kept ([C] values): recomputing it is a second read of all of W, ~1.5 % of a step
            inverses = torch.cat(inverses)
            ctx.save_for_backward(x_hat, weight, labels, lse, block_max, scale_tensor, scale_dot, rows, inverses)
            ctx.kept, ctx.margin, ctx.row_ctx, ctx.gradient = kept, margin, row_ctx, gradient
            ctx.scale_value, ctx.chunk_size, ctx.plain = scale_value, chunk_size, plain
            ctx.subcenters, ctx.choices = subcenters, choices
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_target: Tensor | None, grad_lse: Tensor | None, *unused):
        x_hat, weight, labels, lse, block_max, scale_tensor, scale_dot, rows, inverses = ctx.saved_tensors
        margin, row_ctx, kept = ctx.margin, ctx.row_ctx, ctx.kept
        row_scale = scale_tensor[:, None] if scale_tensor is not None else ctx.scale_value
        subcenters = ctx.subcenters
        classes = weight.shape[0] // subcenters if rows is None else rows.shape[0]
        weight_rows = None if rows is None else subcentre_rows(rows, subcenters)
        grad_x = torch.zeros_like(x_hat)
        grad_w = None
        if ctx.needs_input_grad[1]:
            # every block writes its rows, so no fill (a [C, D] fill costs as much as a GEMM here)
            grad_w = torch.empty_like(weight) if rows is None else ctx.gradient.begin(weight, weight_rows)
        if grad_lse is None:
            grad_lse = torch.zeros_like(lse)
        # g_L·s·exp(m_b − L) per block turns e into the gradient; m_b <= L, so it never overflows
        coefficients = (grad_lse * (scale_tensor if scale_tensor is not None else ctx.scale_value))[:, None]
        coefficients = coefficients * torch.exp(block_max - lse[:, None])
        scratch = BlockScratch(lent=True)
        for b, start in enumerate(range(0, classes, ctx.chunk_size)):
            stop = min(start + ctx.chunk_size, classes)
            block = class_block(weight, rows, start, stop, subcenters)
            first, last = start * subcenters, stop * subcenters
            inv = inverses[first:last]
            target_index = block_target_index(labels, start, stop)
            if kept:
                # in place, and each kept block is let go once used (the [B, C] of them drain as dW fills); a
                # second backward (retain_graph) finds ctx.kept empty and recomputes
                grad_cos, kept[b] = kept[b].mul_(coefficients[:, b : b + 1]), None
                choice = ctx.choices[b] if subcenters > 1 else None
            else:
                product = block_product(x_hat, block, scratch)
                block_inv: Tensor | None = inv
                if subcenters > 1:
                    product, choice = nearest_subcentre(product.mul_(inv), subcenters)
                    block_inv = None
                if ctx.plain:
                    z, slope = product.mul_(ctx.scale_value if block_inv is None else block_inv * ctx.scale_value), 1.0
                else:
                    cos = product if block_inv is None else product.mul_(block_inv)
                    values, slope = margin.negatives_with_slope(cos, row_ctx, scratch)
                    z = values.mul_(row_scale)
                mask_targets(z, target_index, float("-inf"))
                grad_cos = z.sub_(block_max[:, b : b + 1]).exp_().mul_(coefficients[:, b : b + 1])
                if isinstance(slope, Tensor):
                    grad_cos.mul_(slope)
            if grad_target is not None:
                mask_targets(grad_cos, target_index, grad_target)
            if subcenters > 1:
                grad_cos = spread_to_subcentres(grad_cos, choice, subcenters)
            grad_cos.mul_(inv)
            grad_x.addmm_(grad_cos, block)
            if grad_w is not None:
                # written in place: [chunk, D] temporaries would each be fresh pages to fault in
                u = torch.mm(grad_cos.t(), x_hat, out=grad_w[first:last] if rows is None else None)
                # (U ⊙ W_b)·1 as a multiply into a reused buffer and a row sum: a batched dot product (bmm) runs
                # as a matrix-vector product per row and cost ~15x as much on CPU (docs/benchmarks.md)
                along = torch.mul(u, block, out=scratch.buffer(u, "along")).sum(1)
                u.addcmul_((along * inv * inv)[:, None], block, value=-1.0)
                if rows is not None:
                    grad_w.index_copy_(0, weight_rows[first:last], u)
        ctx.kept = []
        grad_scale = grad_lse * scale_dot if scale_dot is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_scale, *(None,) * 11


def block_product(x_hat: Tensor, block: Tensor, scratch: BlockScratch) -> Tensor:
    """x̂ W_bᵀ into the pass's reused product buffer (a fresh [B, n] per block would fault its pages in anew)."""
    out = scratch.buffer(x_hat, "product", (x_hat.shape[0], block.shape[0]))
    return torch.mm(x_hat, block.t(), out=out)


def finite_shift(top: Tensor) -> Tensor:
    """A block's max logit, 0 where it is −inf (a block holding only the target): exp(−inf − 0) = 0, not NaN."""
    return torch.where(top == float("-inf"), torch.zeros_like(top), top)
