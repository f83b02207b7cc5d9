"""The in-place full-softmax cross-entropy against PyTorch's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simdiffrec.item_softmax import cross_entropy


def _both(h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor):
    """(loss, grad of h, grad of table) of ours and of F.cross_entropy, from the same leaves."""
    out = []
    for loss_of in (lambda h, t: cross_entropy(h, t, targets), lambda h, t: F.cross_entropy(h @ t.T, targets)):
        h_, t_ = h.clone().requires_grad_(), table.clone().requires_grad_()
        loss = loss_of(h_, t_)
        (3.0 * loss).backward()  # an upstream gradient other than 1
        out.append((loss.detach(), h_.grad, t_.grad))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_the_loss_and_its_gradients_are_pytorchs(seed):
    torch.manual_seed(seed)
    h, table = torch.randn(300, 16), torch.randn(500, 16) * 0.5
    targets = torch.cat([torch.tensor([7, 7, 499, 0]), torch.randint(0, 500, (296,))])  # repeats, both ends
    ours, theirs = _both(h, table, targets)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_it_learns_the_targets_through_a_slice_of_an_embedding():
    """As the model calls it: the table is weight[1:] of an embedding that also holds padding."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(51, 8, padding_idx=0)
    h = torch.randn(64, 8, requires_grad=True)
    targets = torch.randint(0, 50, (64,))
    optimizer = torch.optim.Adam([h, *emb.parameters()], lr=0.05)
    first = None
    for _ in range(100):
        loss = cross_entropy(h, emb.weight[1:], targets)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 4
    assert emb.weight.grad[0].abs().sum() == 0  # padding's row gets nothing


def test_a_second_backward_through_it_is_refused():
    h, table = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    loss = cross_entropy(h, table, torch.tensor([0, 1, 2, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
