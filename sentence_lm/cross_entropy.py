"""Cross-entropy over the vocabulary straight from decoder states: the output layer and the
loss in one autograd step, so that a training step holds one vocabulary-wide tensor instead of
the logits, their log-softmax and the gradients of both."""

from __future__ import annotations

import torch

ROWS_PER_PASS = 32
"""Rows of the ``(rows, vocab)`` logits normalised at a time (a block that stays in cache)."""

_workspaces: dict[tuple, torch.Tensor] = {}
"""Per (device, dtype), the ``(rows, vocab)`` buffer the last backward pass gave back, for the next
forward pass on the CPU: a fresh tensor of hundreds of MB costs the kernel's zeroing of every
page each step (about 0.3 s for SmolLM2's 2k x 49k logits here), which the CUDA caching
allocator already avoids on a GPU."""


def _workspace(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``(rows, cols)`` tensor to write into, reusing the buffer given back on the CPU."""
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    buffer = _workspaces.pop((device, dtype), None)
    if buffer is None or buffer.numel() < rows * cols:
        buffer = torch.empty(rows * cols * 5 // 4, dtype=dtype, device=device)  # room for larger batches
    return buffer[: rows * cols].view(rows, cols)


def _give_back(tensor: torch.Tensor) -> None:
    if tensor.device.type == "cpu":
        base = tensor._base if tensor._base is not None else tensor
        _workspaces[(tensor.device, tensor.dtype)] = base


def output_layer_nll(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Per-row negative log-likelihood ``-log softmax(hidden @ weight.T)[targets]``, ``(n,)`` in
    float32, as ``F.cross_entropy(F.linear(hidden, weight), targets, reduction="none")``.

    With gradients, the forward pass turns the logits into their gradient
    (``softmax - one_hot``) in place and the backward pass scales it by the incoming gradient:
    one ``(n, vocab)`` tensor lives between the two passes, and no matmul is repeated. With
    ``chunk_size``, no vocabulary-wide tensor outlives a chunk of ``chunk_size`` rows: the
    backward pass recomputes each chunk's logits (one more ``n x hidden x vocab`` matmul, for
    ``n * vocab`` less memory: the switch for large batches on a GPU). Under autocast the
    matmuls run in the autocast dtype and the normalisation in float32. A weight that does not
    require gradients (a frozen output layer) gets none, and its gradient matmul is skipped.

    The graph can be differentiated once (the saved gradient is scaled in place).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"output_layer_nll takes hidden (n, h), weight (vocab, h) and targets (n,); got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)} and {tuple(targets.shape)}."
        )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size!r}.")
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        with torch.autocast(device_type, enabled=False):
            return _nll_only(hidden.to(dtype), weight.to(dtype), targets, chunk_size or hidden.shape[0] or 1)
    return _OutputLayerNLL.apply(hidden, weight, targets, dtype, chunk_size)


def _normalise_(logits: torch.Tensor, targets: torch.Tensor, into_gradient: bool) -> torch.Tensor:
    """NLL ``(rows,)`` (float32) of ``logits`` ``(rows, vocab)``; with ``into_gradient`` the
    logits become ``softmax - one_hot(targets)`` in place (in their dtype)."""
    nll = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], ROWS_PER_PASS):
        block = logits[start : start + ROWS_PER_PASS]
        rows = targets[start : start + ROWS_PER_PASS, None]
        x = block.float()
        x = x - x.amax(dim=1, keepdim=True)
        target_logit = x.gather(1, rows).squeeze(1)
        x.exp_()
        total = x.sum(dim=1, keepdim=True)
        nll[start : start + ROWS_PER_PASS] = total.squeeze(1).log() - target_logit
        if into_gradient:
            x.div_(total)
            x.scatter_add_(1, rows, torch.full_like(target_logit[:, None], -1.0))
            block.copy_(x)
    return nll


def _nll_only(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    pieces = [
        _normalise_(hidden[start : start + chunk_size] @ weight.t(), targets[start : start + chunk_size], False)
        for start in range(0, hidden.shape[0], chunk_size)
    ]
    return torch.cat(pieces) if pieces else hidden.new_empty(0, dtype=torch.float32)


class _OutputLayerNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, chunk_size):
        ctx.dtype, ctx.chunk_size, ctx.used = dtype, chunk_size, False
        ctx.input_dtypes = hidden.dtype, weight.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            if chunk_size is None:
                gradient = torch.mm(h, w.t(), out=_workspace(h.shape[0], w.shape[0], dtype, h.device))
                nll = _normalise_(gradient, targets, into_gradient=True)
                ctx.save_for_backward(h, w, targets, gradient)
            else:
                nll = _nll_only(h, w, targets, chunk_size)
                ctx.save_for_backward(h, w, targets)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        if ctx.used:
            raise RuntimeError(
                "output_layer_nll's graph was differentiated a second time; it can be differentiated once "
                "(compute the loss again to differentiate it again)."
            )
        ctx.used = True
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        h, w, targets, *saved = ctx.saved_tensors
        scale = grad_nll.to(ctx.dtype)[:, None]
        grad_h = torch.empty_like(h) if need_hidden else None
        grad_w = None
        chunk = h.shape[0] if ctx.chunk_size is None else ctx.chunk_size
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            if saved:
                gradient = saved[0][rows]
            else:
                gradient = h[rows] @ w.t()
                _normalise_(gradient, targets[rows], into_gradient=True)
            gradient.mul_(scale[rows])
            if need_hidden:
                grad_h[rows] = gradient @ w
            if need_weight:
                grad_w = gradient.t() @ h[rows] if grad_w is None else grad_w.addmm_(gradient.t(), h[rows])
        if need_weight and grad_w is None:  # no rows
            grad_w = torch.zeros_like(w)
        if saved:
            _give_back(saved[0])
        hidden_dtype, weight_dtype = ctx.input_dtypes
        return (
            grad_h.to(hidden_dtype) if need_hidden else None,
            grad_w.to(weight_dtype) if need_weight else None,
            None,
            None,
            None,
        )
