"""The full-softmax cross-entropy over the item table, with a backward that works in place.

`cross_entropy(h, table, targets)` is `F.cross_entropy(h @ table.T, targets)` (the mean over
positions), as L_sr (Eq. 4) and the rounding term of L_d (Eq. 13) use it.  PyTorch's backward
allocates two more positions × items matrices (the one-hot gradient of the loss, then the
log-softmax gradient) and reads the saved one again; here the saved log-probabilities become
the gradient, softmax − one-hot, in place.  Those passes are most of an epoch's time on the
CPU (BENCHMARKS.md, training speed); the result is the same up to float rounding (tested).
"""

from __future__ import annotations

import torch


class _ItemCrossEntropy(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = (h @ table.T).float().log_softmax(1)
        ctx.save_for_backward(h, table, targets, log_p)
        return -log_p.gather(1, targets[:, None]).mean()

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        h, table, targets, log_p = ctx.saved_tensors
        g = log_p.exp_()  # softmax, in place (a second backward through it raises: the saved tensor changed)
        g[torch.arange(len(targets), device=g.device), targets] -= 1
        g.mul_(grad / len(targets))
        return g @ table.to(g.dtype), g.T @ h.to(g.dtype), None  # autograd casts each to its input's dtype


def cross_entropy(h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of -log softmax(h · tableᵀ)[target]; h (n, d), table (items, d), targets (n,) in 0..items-1."""
    return _ItemCrossEntropy.apply(h, table, targets)
