"""The `cpp` backend of the per-pair losses: each table entry's formula and derivative run in C++
(csrc/pair_loss_math.h, a mirror of prefopt/losses/table.py checked against it in tests/test_cpp_kernels.py);
the f-divergence scores, loss weights and WPO weights are combined by the table's own `pair_terms`."""
from __future__ import annotations

from prefopt.cpu.extension import extension_for
from prefopt.losses.table import INDEX, TorchOps, pair_terms, params_view


def pair_forward(spec, x, params, need_grad, compute_dtype):
    params = params.to(compute_dtype).contiguous()
    view = params_view(params, len(spec.losses))
    ext = extension_for(params)

    def entry_forward(entry, a, b=None):
        return ext.pair_loss_forward(INDEX[entry.name], a.contiguous(), None if b is None else b.contiguous(), params)

    def entry_grad(entry, i, a, b=None):
        grads = ext.pair_loss_backward(INDEX[entry.name], a.contiguous(), None if b is None else b.contiguous(),
                                      params, None)
        return grads[i]

    loss, grads = pair_terms(TorchOps, spec, x, view, need_grad, entry_forward, entry_grad)
    n_pairs = x["pc"].shape[0]
    return loss.expand(n_pairs), {k: (None if v is None else v.expand(n_pairs)) for k, v in grads.items()}


def backward_scale(saved, grad_out, out_dtype):
    """d loss / d input = saved per-pair derivative x the incoming scalar gradient ([P]-sized, elementwise)."""
    return (saved * grad_out.to(saved.dtype)).to(out_dtype)
