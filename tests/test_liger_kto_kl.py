"""LigerFusedLinearKTOLoss takes a `kl` of shape (1,) as Liger does (its own tests pass torch.randn(1)): the same
loss and gradients as the 0-dim KL; a per-example (B,) KL keeps a clear error."""
import pytest
import torch

from prefopt.integrations import liger


def _inputs(batch=4, length=5, hidden=6, vocab=17, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, hidden, dtype=torch.float64, generator=g)
    w = torch.randn(vocab, hidden, dtype=torch.float64, generator=g)
    target = torch.randint(0, vocab, (batch, length), generator=g)
    target[:, :2] = -100
    labels = torch.tensor([True, False, True, False])
    return x, w, target, labels


def _run(kl):
    x, w, target, labels = _inputs()
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    module = liger.LigerFusedLinearKTOLoss(beta=0.3, use_ref_model=True)
    loss, aux = module(x, w, target, None, labels, x.detach() * 0.9, w.detach(), None, kl)
    return (loss, *aux, *torch.autograd.grad(loss, [x, w]))


def test_kl_of_shape_one_is_the_batch_kl():
    want = _run(torch.tensor(0.25, dtype=torch.float64))
    got = _run(torch.tensor([0.25], dtype=torch.float64))
    assert got[0].dim() == 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = _run(torch.tensor([0.5], dtype=torch.float64))
    assert not torch.equal(other[0], got[0])  # the (1,) KL is used, not dropped


def test_per_example_kl_is_refused():
    with pytest.raises(ValueError, match=r"one KL for the batch .*shape \(4,\)"):
        _run(torch.zeros(4, dtype=torch.float64))
