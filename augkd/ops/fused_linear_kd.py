"""Fused linear KD loss: both language-model heads and the KD loss, chunk by chunk over the rows, so that the
N x V logits never exist at once (docs/ops-design.md, "Fused linear KD").

Per chunk of rows: logits = x @ W.T (+ b) for student and teacher (fp32 compute; fp64 for an fp64 student),
the per-row KD loss and its gradient w.r.t. the chunk's logits through the public `kd_loss` (so every backend
of that op serves here: the CPU C++ kernel on CPU tensors, Triton / CUDA C++ on GPU tensors), then the chain
rule through the matmuls into the gradients of the inputs, weights and biases. Peak extra memory is a few
chunk x V buffers plus the gradients themselves, independent of N. Where V is so large that even a minimal row
chunk's logits exceed the budget, each row chunk is swept over vocabulary blocks instead
(fused_linear_kd_vocab.py), so that the memory is a few chunk x block buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import _checks, backends
from . import fused_linear_kd_vocab as _vocab
from .kd_divergence import divergence_code
from .kd_loss import kd_loss

OP = "fused_linear_kd_loss"
REDUCTIONS = ("none", "sum", "mean", "token_mean", "batchmean")
DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")  # as kd_loss (docs/ops-design.md, section 6)

# The V-wide buffers of one row chunk (its logits and their gradients, compute dtype) take at most this many
# bytes together, unless that is fewer than MIN_CHUNK_ROWS rows. A chunk holds 3 such buffers at a time
# (student and teacher logits, the gradient of the student logits) where kd_loss_fwd / kd_loss_bwd compute its
# loss, and 2 where kd_loss_grad_ writes the gradients over the logits (the C++ CPU backend, divergence "kl"):
# those chunks are 3/2 as tall in the same memory. The call's peak extra memory is these buffers plus the
# gradients themselves (V x H for each weight). CPU: 120 MiB, i.e. 416-row chunks at V = 32000 with 2 buffers
# (296 with 3): fewer, taller matmul calls (each reads all of W) while the peak stays below a quarter of what
# torch.compile's unchunked loss holds at N = 2048; GPU: 384 MiB, fewer launches per call.
CHUNK_BUFFER_BYTES = {"cpu": 120 << 20, "cuda": 384 << 20}
CHUNK_BUFFERS = 3
# The budget of one chunk x V buffer for the choice between whole rows and vocabulary blocks (VOCAB_SPLIT):
# CPU 32 MiB, GPU 128 MiB.
CHUNK_LOGIT_BYTES = {"cpu": 32 << 20, "cuda": 128 << 20}
# Every chunk reads the whole weight for its logits and its input gradient, and reads and writes the weight
# gradient: per chunk of c rows that is ~3 x V x H floats against c x V for the logits. Below ~128 rows the
# weight traffic dominates and the matmuls turn memory-bound (measured on CPU at V = 128256, H = 256: 32 rows
# twice as slow as 64..256).
MIN_CHUNK_ROWS = 128


def auto_chunk_rows(rows: int, vocab: int, acc_dtype: torch.dtype, device: torch.device,
                    buffers: int = CHUNK_BUFFERS) -> int:
    """Rows per chunk: `buffers` chunk x vocab buffers (compute dtype) take at most CHUNK_BUFFER_BYTES for the
    device type, the chunks as even as that allows (the fewest chunks, their rows rounded up to a multiple of 8
    within the budget), at least MIN_CHUNK_ROWS, at most `rows` (and at least 1). Even chunks: a short last
    chunk would run the matmuls at a lower rate, and the buffers are sized by the tallest chunk anyway."""
    budget = CHUNK_BUFFER_BYTES.get(device.type, CHUNK_BUFFER_BYTES["cuda"]) // max(buffers, 1)
    fit = max(MIN_CHUNK_ROWS, budget // (max(vocab, 1) * torch.finfo(acc_dtype).bits // 8))
    if rows <= fit:
        return max(1, rows)
    even = -(-rows // -(-rows // fit))  # ceil(rows / number of chunks)
    return max(even, min(fit, -(-even // 8) * 8))


# Whole rows while a row chunk's logits take at most VOCAB_SPLIT budgets. Vocabulary blocks recompute the logit
# matmuls once (kl, reverse_kl) or twice (jsd, tvd) more: at 512 x 256 x 128256 (CPU, fwd+bwd) blocks of 32768
# took 1.35x (kl) and 2.5x (jsd) the time of whole 128-row chunks (62.6 MiB each), so
# whole rows stay up to twice the budget (V <= 131072 at 128 fp32 rows on CPU) and blocks take over beyond.
VOCAB_SPLIT = 2
# A vocabulary block's elementwise math holds about VOCAB_BLOCK_BUFFERS block-sized temporaries at a time (both
# heads' logits and probabilities, the soft gradients), against about 3 chunk-sized buffers in the row path; the
# block is sized so that the two paths hold about the same memory.
VOCAB_BLOCK_BUFFERS = 6


def auto_vocab_chunk(chunk_rows: int, vocab: int, acc_dtype: torch.dtype, device: torch.device) -> int:
    """Vocabulary entries per block: the whole vocabulary when chunk_rows x vocab logits (compute dtype) take at
    most VOCAB_SPLIT x CHUNK_LOGIT_BYTES; otherwise the most entries whose VOCAB_BLOCK_BUFFERS block buffers
    take no more than 3 budgets (a multiple of 128 entries, at least 128)."""
    budget = CHUNK_LOGIT_BYTES.get(device.type, CHUNK_LOGIT_BYTES["cuda"])
    item = torch.finfo(acc_dtype).bits // 8
    if max(chunk_rows, 1) * vocab * item <= VOCAB_SPLIT * budget:
        return max(vocab, 1)
    block = 3 * budget // (VOCAB_BLOCK_BUFFERS * max(chunk_rows, 1) * item)
    return max(128, block // 128 * 128)


@dataclass(frozen=True)
class _Config:
    temperature: float
    alpha: float
    ignore_index: int
    t2_scale: bool
    divergence: str
    beta: float
    reduction: str
    chunk: int
    vocab_chunk: int  # vocabulary entries per block; >= V: whole rows (the row path)
    acc: torch.dtype
    want: tuple  # needs-grad of (x_s, W_s, b_s, x_t, W_t, b_t)


# ---------------------------------------------------------------- validation

def _check_linear(role: str, x, weight, bias, lead=None):
    x = _checks.tensor(OP, f"{role}_input", x)
    weight = _checks.tensor(OP, f"{role}_weight", weight)
    if x.dim() < 2 or x.shape[-1] < 1:
        raise ValueError(f"{OP}: {role}_input must have shape (N, H) or (B, T, H) with H >= 1, got {tuple(x.shape)}")
    if lead is not None and x.shape[:-1] != lead:
        raise ValueError(f"{OP}: {role}_input must have the leading shape {tuple(lead)} of student_input "
                         f"(one teacher row per student row), got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{OP}: {role}_weight must have shape (V, {x.shape[-1]}) (nn.Linear layout: vocabulary "
                         f"x hidden size of {role}_input), got {tuple(weight.shape)}")
    _checks.same(OP, f"{role}_weight", weight, f"{role}_input", x, shape=False)
    if bias is not None:
        _checks.tensor(OP, f"{role}_bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{OP}: {role}_bias must have shape ({weight.shape[0]},) (one per vocabulary entry "
                             f"of {role}_weight), got {tuple(bias.shape)}")
        _checks.same(OP, f"{role}_bias", bias, f"{role}_weight", weight, shape=False)


def _validate(x_s, w_s, b_s, x_t, w_t, b_t, target, temperature, alpha, divergence, ignore_index, reduction,
              chunk_size, vocab_chunk_size):
    _check_linear("student", x_s, w_s, b_s)
    _check_linear("teacher", x_t, w_t, b_t, lead=x_s.shape[:-1])
    if x_t.device != x_s.device:
        raise ValueError(f"{OP}: teacher_input must be on the same device as student_input ({x_s.device}), "
                         f"got {x_t.device}")
    if w_t.shape[0] != w_s.shape[0]:
        raise ValueError(f"{OP}: teacher_weight has {w_t.shape[0]} vocabulary rows, student_weight {w_s.shape[0]}: "
                         "the two heads must share the vocabulary")
    temperature = _checks.positive_float(OP, "temperature", temperature)
    alpha = _checks.unit_float(OP, "alpha", alpha)
    _checks.choice(OP, "divergence", divergence, DIVERGENCES)
    _checks.choice(OP, "reduction", reduction, REDUCTIONS)
    kernel_ignore, _ = _checks.ignore_index(OP, ignore_index)
    for name, size in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"{OP}: {name} must be None (automatic) or an int >= 1, got {size!r}")
    _checks.hard_target(OP, target, alpha, x_s.shape[:-1], x_s.device, what="token ids",
                        hint=" (student_input without the hidden dimension; shift the labels before the call)")
    if target is not None:
        _checks.labels_in_range(OP, target, w_s.shape[0], kernel_ignore, ignore_index, "token id")
    return temperature, alpha, kernel_ignore


# ---------------------------------------------------------------- the chunked sweep

class _Head:
    """One linear head (x, W, b) in the compute dtype: logits of a block of rows x vocabulary entries, and the
    chain rule back through it into the gradient buffers."""

    def __init__(self, x, weight, bias, acc, want_x, want_w, want_b):
        self.x, self.acc = x, acc
        self.weight_dtype, self.bias_dtype = weight.dtype, None if bias is None else bias.dtype
        # fp32 logits from bf16/fp16 weights: on CUDA, mm with out_dtype reads the weight as it is; elsewhere
        # the weight is cast once per call (an O(V x H) copy, never an O(N x V) one).
        self.native = weight.dtype == acc or (weight.device.type == "cuda" and _cuda_out_dtype_mm())
        self.weight = weight if self.native else weight.to(acc)
        self.bias = None if bias is None else bias.to(acc)
        self.grad_x = torch.empty_like(x) if want_x else None
        # written by the first row chunk (mm into it), accumulated by the others (addmm_): no zero fill
        self.grad_w = torch.empty(weight.shape, dtype=acc, device=weight.device) if want_w else None
        self.grad_b = torch.empty(weight.shape[0], dtype=acc, device=weight.device) if want_b else None
        self._plain = self.weight.dtype == acc  # every matmul in the compute dtype, so out= buffers apply

    @property
    def wants_grad(self) -> bool:
        return self.grad_x is not None or self.grad_w is not None or self.grad_b is not None

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Input rows [lo, hi) as the logit matmul reads them."""
        x = self.x[lo:hi]
        return x if self.native else x.to(self.acc)

    @torch.no_grad()
    def logits(self, xr: torch.Tensor, v0: int, v1: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """xr @ W[v0:v1].T + b[v0:v1] in the compute dtype (into `out` when given and the dtypes allow)."""
        w = self.weight[v0:v1].t()
        if self._plain:
            if self.bias is None:
                return torch.mm(xr, w, out=out) if out is not None else torch.mm(xr, w)
            b = self.bias[v0:v1]
            return torch.addmm(b, xr, w, out=out) if out is not None else torch.addmm(b, xr, w)
        z = torch.mm(xr, w, out_dtype=self.acc)
        if self.bias is not None:
            z += self.bias[v0:v1]
        return z

    @torch.no_grad()
    def input_grad(self, g: torch.Tensor, v0: int, v1: int, out: Optional[torch.Tensor] = None,
                   accumulate: bool = False) -> torch.Tensor:
        """g @ W[v0:v1] (rows x H, compute dtype); into `out` (added to it with `accumulate`) when given."""
        w = self.weight[v0:v1]
        if not self._plain:
            gx = torch.mm(g.to(w.dtype), w, out_dtype=self.acc)
            if out is None:
                return gx
            return out.add_(gx) if accumulate else out.copy_(gx)
        if out is None:
            return torch.mm(g, w)
        return out.addmm_(g, w) if accumulate else torch.mm(g, w, out=out)

    @torch.no_grad()
    def weight_grad(self, g: torch.Tensor, xr: torch.Tensor, v0: int, v1: int, first: bool) -> None:
        """grad W[v0:v1] (+)= g^T xr and grad b[v0:v1] (+)= column sums of g; `first`: the block's first write."""
        if self.grad_w is not None:
            x = xr if xr.dtype == self.acc else xr.to(self.acc)
            gw = self.grad_w[v0:v1]
            if first:
                torch.mm(g.t(), x, out=gw)
            else:
                gw.addmm_(g.t(), x)
        if self.grad_b is not None:
            if first:
                torch.sum(g, 0, out=self.grad_b[v0:v1])
            else:
                self.grad_b[v0:v1] += g.sum(0)

    def backward(self, lo: int, hi: int, g: torch.Tensor, first: bool) -> None:
        """Accumulate the gradients of rows [lo, hi) given g = dL/dlogits over the whole vocabulary."""
        if self.grad_x is not None:
            gx = self.grad_x[lo:hi]
            if gx.dtype == self.acc:
                self.input_grad(g, 0, g.shape[1], out=gx)
            else:
                gx.copy_(self.input_grad(g, 0, g.shape[1]))
        self.weight_grad(g, self.x[lo:hi], 0, g.shape[1], first)

    def grads(self):
        w = self.grad_w
        return (self.grad_x, None if w is None else w.to(self.weight_dtype),
                None if self.grad_b is None else self.grad_b.to(self.bias_dtype))


_OUT_DTYPE_MM: Optional[bool] = None


def _cuda_out_dtype_mm() -> bool:
    """Whether torch.mm(a, b, out_dtype=float32) runs on CUDA bf16 tensors in this torch."""
    global _OUT_DTYPE_MM
    if _OUT_DTYPE_MM is None:
        try:
            a = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
            _OUT_DTYPE_MM = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except Exception:  # an older torch or an unsupported GPU: cast the weight instead
            _OUT_DTYPE_MM = False
    return _OUT_DTYPE_MM


def _sweep(cfg: _Config, x_s, w_s, b_s, x_t, w_t, b_t, target, row_grad):
    """Per-row losses (N,) and, when cfg.want asks, the gradients of the six tensors.

    row_grad: dL/dloss_i for every row, (N,) or a 0-d tensor (the same for every row); None: no gradients.
    """
    n, vocab = x_s.shape[0], w_s.shape[0]
    want = cfg.want if row_grad is not None else (False,) * 6
    student = _Head(x_s, w_s, b_s, cfg.acc, *want[:3])
    teacher = _Head(x_t, w_t, b_t, cfg.acc, *want[3:])
    rows = torch.empty(n, dtype=cfg.acc, device=x_s.device)
    if n == 0:
        for head in (student, teacher):
            for g in (head.grad_w, head.grad_b):
                if g is not None:
                    g.zero_()
    elif cfg.vocab_chunk < vocab:
        code, _ = divergence_code(OP, cfg.divergence, cfg.beta)
        for lo in range(0, n, cfg.chunk):
            hi = min(n, lo + cfg.chunk)
            g_rows = None if row_grad is None else (row_grad[lo:hi] if row_grad.dim() else row_grad)
            rows[lo:hi] = _vocab.sweep_row_chunk(cfg, code, student, teacher, lo, hi, vocab, cfg.vocab_chunk,
                                                 None if target is None else target[lo:hi], g_rows, lo == 0)
    else:
        _sweep_rows(cfg, student, teacher, target, row_grad, rows)
    return rows, student.grads() + teacher.grads()


def _grad_in_place_kernel(device: torch.device, divergence: str):
    """augkd::kd_loss_grad_ where it serves the row chunks on `device` (the C++ CPU backend, divergence "kl"),
    else None: the chunks then run kd_loss (kd_loss_fwd / kd_loss_bwd of the selected backend)."""
    if device.type != "cpu" or divergence != "kl" or backends.select(device) != "cpu":
        return None
    return getattr(torch.ops.augkd, "kd_loss_grad_", None)  # None: an extension built before the op


def row_chunk_buffers(device: torch.device, divergence: str) -> int:
    """How many chunk x V buffers a row chunk holds at a time (see CHUNK_LOGIT_BYTES)."""
    return CHUNK_BUFFERS if _grad_in_place_kernel(device, divergence) is None else CHUNK_BUFFERS - 1


def _sweep_rows(cfg: _Config, student: _Head, teacher: _Head, target, row_grad, rows) -> None:
    """Row chunks over the whole vocabulary: each chunk's loss and logit gradients from kd_loss_grad_ (the
    gradients over the logits) or from kd_loss (any backend)."""
    n, vocab = student.x.shape[0], student.weight.shape[0]
    chunk = min(cfg.chunk, n)
    # the chunk logits go into two buffers reused by every chunk (the last chunk takes a leading slice)
    buf_s = torch.empty(chunk, vocab, dtype=cfg.acc, device=student.x.device) if student._plain else None
    buf_t = torch.empty(chunk, vocab, dtype=cfg.acc, device=student.x.device) if teacher._plain else None
    kernel = _grad_in_place_kernel(student.x.device, cfg.divergence)
    if kernel is not None and buf_s is not None and buf_t is not None:
        _sweep_rows_in_place(kernel, cfg, student, teacher, target, row_grad, rows, buf_s, buf_t)
        return
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        y = None if target is None else target[lo:hi]
        with torch.enable_grad():
            zs = student.logits(student.rows(lo, hi), 0, vocab, None if buf_s is None else buf_s[:hi - lo])
            zt = teacher.logits(teacher.rows(lo, hi), 0, vocab, None if buf_t is None else buf_t[:hi - lo])
            zs = zs.detach().requires_grad_(student.wants_grad)  # leaves: the loss is differentiated w.r.t.
            zt = zt.detach().requires_grad_(teacher.wants_grad)  # them, the matmuls by hand
            loss = kd_loss(zs, zt, y, temperature=cfg.temperature, alpha=cfg.alpha, ignore_index=cfg.ignore_index,
                           reduction="none", t2_scale=cfg.t2_scale, divergence=cfg.divergence, beta=cfg.beta)
            leaves = [z for z in (zs, zt) if z.requires_grad]
            if leaves:
                g_rows = row_grad[lo:hi] if row_grad.dim() else row_grad.expand(hi - lo)
                grads = torch.autograd.grad(loss, leaves, g_rows.to(loss.dtype), allow_unused=True)
        rows[lo:hi] = loss.detach()
        shape = zs.shape
        del zs, zt, loss  # the logits are done with: only their gradients take part in the matmuls below
        if leaves:
            grads = list(grads)
            for head in (student, teacher):
                if head.wants_grad:
                    g = grads.pop(0)
                    g = torch.zeros(shape, dtype=cfg.acc, device=student.x.device) if g is None else g
                    head.backward(lo, hi, g, lo == 0)
            del grads, g


def _sweep_rows_in_place(kernel, cfg: _Config, student: _Head, teacher: _Head, target, row_grad, rows, buf_s,
                         buf_t) -> None:
    """The row chunks with kd_loss_grad_: per chunk the two logit buffers, each then holding its gradient."""
    n, vocab = student.x.shape[0], student.weight.shape[0]
    want_s = row_grad is not None and student.wants_grad
    want_t = row_grad is not None and teacher.wants_grad
    if row_grad is None:  # read only for the gradients
        g_all = torch.zeros(n, dtype=cfg.acc, device=student.x.device)
    else:
        g_all = (row_grad if row_grad.dim() else row_grad.expand(n)).to(cfg.acc).contiguous()
    for lo in range(0, n, buf_s.shape[0]):
        hi = min(n, lo + buf_s.shape[0])
        zs = student.logits(student.rows(lo, hi), 0, vocab, buf_s[:hi - lo])
        zt = teacher.logits(teacher.rows(lo, hi), 0, vocab, buf_t[:hi - lo])
        rows[lo:hi] = kernel(zs, zt, None if target is None else target[lo:hi], g_all[lo:hi], cfg.temperature,
                             cfg.alpha, cfg.ignore_index, cfg.t2_scale, want_s, want_t)
        if want_s:
            student.backward(lo, hi, zs, lo == 0)
        if want_t:
            teacher.backward(lo, hi, zt, lo == 0)


def _scale(cfg: _Config, rows: int, batch: int, target) -> torch.Tensor | float:
    """dL/dloss_i of the reduction, the same for every row."""
    if cfg.reduction == "sum":
        return 1.0
    if cfg.reduction == "batchmean":
        return 1.0 / max(batch, 1)
    if target is None:  # mean / token_mean: every row counts
        return 1.0 / max(rows, 1)
    count = (target != cfg.ignore_index).sum().clamp_min(1)  # on the device: no host sync
    return 1.0 / count.to(cfg.acc)


class _FusedLinearKD(torch.autograd.Function):
    """Scalar reductions: the gradients are computed in the forward (the loss is the last op) and the
    backward scales them by grad_output, once. reduction='none': the forward computes the rows only and
    the backward sweeps the chunks again with the per-row grad_output (one more pair of logit matmuls)."""

    @staticmethod
    def forward(ctx, x_s, w_s, b_s, x_t, w_t, b_t, target, cfg: _Config, batch: int):
        ctx.set_materialize_grads(False)
        ctx.cfg = cfg
        if cfg.reduction == "none":
            rows, _ = _sweep(cfg, x_s, w_s, b_s, x_t, w_t, b_t, target, None)
            ctx.save_for_backward(x_s, w_s, b_s, x_t, w_t, b_t, target)
            return rows
        scale = _scale(cfg, x_s.shape[0], batch, target)
        row_grad = scale if isinstance(scale, torch.Tensor) else torch.tensor(scale, dtype=cfg.acc,
                                                                                 device=x_s.device)
        rows, grads = _sweep(cfg, x_s, w_s, b_s, x_t, w_t, b_t, target, row_grad)
        ctx.grads = grads
        return rows.sum() * row_grad

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        cfg = ctx.cfg
        if grad_out is None:
            return (None,) * 9
        if cfg.reduction == "none":
            x_s, w_s, b_s, x_t, w_t, b_t, target = ctx.saved_tensors
            _, grads = _sweep(cfg, x_s, w_s, b_s, x_t, w_t, b_t, target, grad_out.reshape(-1))
            return (*grads, None, None, None)
        grads = getattr(ctx, "grads", None)
        if grads is None:
            raise RuntimeError(f"{OP}: backward ran twice through the same loss; its gradients are computed in "
                               "the forward and handed out (scaled in place) by the first backward. Compute the "
                               "loss again for another backward.")
        ctx.grads = None
        if grad_out.device.type == "cpu" and grad_out.numel() == 1 and float(grad_out) == 1.0:
            return (*grads, None, None, None)  # loss.backward(): nothing to scale (no host sync on a CPU tensor)
        return (*(None if g is None else g.mul_(grad_out) for g in grads), None, None, None)


def fused_linear_kd_loss(student_input: torch.Tensor, student_weight: torch.Tensor, teacher_input: torch.Tensor,
                         teacher_weight: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                         student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
                         temperature: float = 1.0, alpha: float = 1.0, divergence: str = "kl",
                         ignore_index: int = -100, reduction: str = "batchmean", t2_scale: bool = True,
                         chunk_size: Optional[int] = None, beta: float = 0.5,
                         vocab_chunk_size: Optional[int] = None) -> torch.Tensor:
    """KD loss of two linear heads (language-model heads) without holding their N x V logits.

    With s = student_input @ student_weight.T + student_bias and t = teacher_input @ teacher_weight.T +
    teacher_bias, row i gets exactly the loss of :func:`kd_loss` (reduction "none")::

        loss_i = alpha * T^2 * KL(softmax(t_i / T) || softmax(s_i / T)) + (1 - alpha) * CE(s_i, target_i)

    0 for rows whose target is ``ignore_index`` (both terms). Causal LMs: shift the labels (and the hidden
    states) yourself, as ``hidden[:, :-1]`` with ``labels[:, 1:]``; this function pairs row i with target i.

    Args:
        student_input: (N, H) or (B, T, H) hidden states; float16/bfloat16/float32/float64.
        student_weight: (V, H) as ``nn.Linear.weight`` (``lm_head.weight``), the dtype of student_input.
        teacher_input: (N, H_t) or (B, T, H_t), same leading shape; its own dtype (an fp32 teacher with a bf16
            student is fine: both heads' logits are computed in fp32).
        teacher_weight: (V, H_t), the dtype of teacher_input, the same V.
        target: (N,) or (B, T) token ids, or None (then alpha must be 1).
        student_bias, teacher_bias: optional (V,).
        temperature, alpha, t2_scale: as in :func:`kd_loss`.
        divergence, beta: the soft term, as in :func:`kd_loss`: ``"kl"`` (KL(teacher || student)),
            ``"reverse_kl"``, ``"jsd"`` (TRL's generalized JSD with the teacher weighted by beta) or ``"tvd"``.
        ignore_index: target value of rows to skip.
        reduction: ``"none"`` (per row, shape of the leading dims), ``"sum"``, ``"mean"`` / ``"token_mean"``
            (sum / number of rows not ignored; all rows without a target), ``"batchmean"`` (sum /
            ``student_input.shape[0]``, as torch's KLDivLoss: N for (N, H) input, B for (B, T, H) input).
        chunk_size: rows per chunk; None: as many rows as keep the chunk's V-wide fp32 buffers within 120 MiB
            (CPU) or 384 MiB (CUDA), evened out over the chunks, but at least 128 rows. A chunk holds 2 such
            buffers on CPU tensors with the C++ backend and divergence "kl" (its gradients are written over its
            logits), 3 elsewhere (CPU, N = 2048, V = 32000: 416 rows with 2 buffers, 296 with 3; 128 at
            V = 128256).
        vocab_chunk_size: vocabulary entries per block when a row chunk is swept over the vocabulary in blocks
            (docs/ops-design.md, "Vocabulary chunks"); None: whole rows while a chunk's logits take at most
            twice the budget above, else blocks sized from it (CPU, 128 rows at V = 262144: blocks of 32768).
            Peak extra memory is then O(rows x block), independent of N and V but for the gradients
            themselves. The blocks recompute the logits once or twice more: kl and reverse_kl take 2 sweeps
            over the vocabulary with gradients (1 without), jsd and tvd 3 (2); their elementwise work runs
            kd_divergence's C++ kernels under the cpu / cuda backends, torch formulas under torch / triton.

    Gradients flow into every tensor that requires grad, the teacher's too. For the scalar reductions they are
    computed during the forward and the backward only scales them, so a second backward through the same loss
    raises; for ``"none"`` the backward recomputes the chunks.

    Returns:
        fp32 loss (fp64 for an fp64 student): a scalar, or the leading shape for ``"none"``.
    """
    # an ignore_index outside int64 becomes a sentinel no label holds
    temperature, alpha, ignore_index = _validate(student_input, student_weight, student_bias, teacher_input,
                                                 teacher_weight, teacher_bias, target, temperature, alpha, divergence,
                                                 ignore_index, reduction, chunk_size, vocab_chunk_size)
    lead = student_input.shape[:-1]
    vocab = student_weight.shape[0]
    x_s = student_input.reshape(-1, student_input.shape[-1]).contiguous()
    x_t = teacher_input.reshape(-1, teacher_input.shape[-1]).contiguous()
    n = x_s.shape[0]
    flat_target = None if target is None else target.reshape(-1).to(torch.int64)
    acc = torch.float64 if student_input.dtype == torch.float64 else torch.float32
    chunk = chunk_size or auto_chunk_rows(n, vocab, acc, x_s.device, row_chunk_buffers(x_s.device, divergence))
    tensors = (student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias)
    grad_on = torch.is_grad_enabled()
    want = tuple(bool(grad_on and t is not None and t.requires_grad) for t in tensors)
    _, beta = divergence_code(OP, divergence, beta)
    chunk = int(min(chunk, max(n, 1)))
    vocab_chunk = vocab_chunk_size or auto_vocab_chunk(chunk, vocab, acc, x_s.device)
    cfg = _Config(temperature, alpha, int(ignore_index), bool(t2_scale), divergence, beta, reduction, chunk,
                  int(min(vocab_chunk, max(vocab, 1))), acc, want)
    if torch.compiler.is_compiling():  # the sweep as an opaque op: no graph break
        out = _compiled.call(x_s, student_weight, student_bias, x_t, teacher_weight, teacher_bias, flat_target, cfg,
                             student_input.shape[0] if student_input.dim() else 0)
        return out.reshape(lead) if reduction == "none" else out
    if not any(want):
        rows, _ = _sweep(cfg, x_s, student_weight, student_bias, x_t, teacher_weight, teacher_bias, flat_target,
                         None)
        if reduction == "none":
            return rows.reshape(lead)
        return rows.sum() * _scale(cfg, n, student_input.shape[0] if student_input.dim() else 0, flat_target)
    # the flattened inputs enter the Function, so its gradients have their (N, H) shape; reshape maps them back
    out = _FusedLinearKD.apply(x_s, student_weight, student_bias, x_t, teacher_weight, teacher_bias, flat_target,
                               cfg, student_input.shape[0])
    return out.reshape(lead) if reduction == "none" else out


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`fused_linear_kd_loss`; the hyper-parameters live on the module.

    >>> criterion = FusedLinearKDLoss(temperature=2.0, alpha=0.5, reduction="token_mean")
    >>> loss = criterion(student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels)
    """

    def __init__(self, *, temperature: float = 1.0, alpha: float = 1.0, divergence: str = "kl",
                 ignore_index: int = -100, reduction: str = "batchmean", t2_scale: bool = True,
                 chunk_size: Optional[int] = None, beta: float = 0.5, vocab_chunk_size: Optional[int] = None):
        super().__init__()
        name = "FusedLinearKDLoss"
        _checks.positive_float(name, "temperature", temperature)
        _checks.unit_float(name, "alpha", alpha)
        _checks.choice(name, "divergence", divergence, DIVERGENCES)
        _checks.choice(name, "reduction", reduction, REDUCTIONS)
        self.temperature, self.alpha, self.divergence = float(temperature), float(alpha), divergence
        self.ignore_index, self.reduction, self.t2_scale, self.chunk_size = ignore_index, reduction, t2_scale, chunk_size
        self.beta = divergence_code(name, divergence, beta)[1]
        self.vocab_chunk_size = vocab_chunk_size

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, target=None,
                student_bias=None, teacher_bias=None):
        return fused_linear_kd_loss(student_input, student_weight, teacher_input, teacher_weight, target,
                                    student_bias=student_bias, teacher_bias=teacher_bias,
                                    temperature=self.temperature, alpha=self.alpha, divergence=self.divergence,
                                    ignore_index=self.ignore_index, reduction=self.reduction,
                                    t2_scale=self.t2_scale, chunk_size=self.chunk_size, beta=self.beta,
                                    vocab_chunk_size=self.vocab_chunk_size)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, divergence={self.divergence!r}, beta={self.beta}, "
                f"reduction={self.reduction!r}, t2_scale={self.t2_scale}, chunk_size={self.chunk_size}, "
                f"vocab_chunk_size={self.vocab_chunk_size}")


from . import fused_linear_kd_compile as _compiled  # noqa: E402  (it builds on the definitions above)
