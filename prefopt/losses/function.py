"""torch.autograd.Function of the per-pair preference losses, with the backward taken from the table.

Inputs arrive validated by ``prefopt/losses/api.py``. The Function picks a backend with
``prefopt._backend.resolve(device)`` and calls its ``pair_forward`` (same signature everywhere):

    pair_forward(spec: PairSpec, x: dict[str, Tensor [P]], params: Tensor, need_grad: bool, compute_dtype)
        -> (loss [P], {"c": dL/dc, "r": dL/dr, "a": dL/dh_aot, "u": dL/dh_aot_unpaired} (None where unused))

* "torch":  ``torch_pair_forward`` below (evaluates the table with ``TorchOps``);
* "triton": ``kernels/preference_loss.py`` (``prefopt.kernels.preference_loss``; kernel generated from the table);
* "cpp":    ``prefopt.cpu.losses_cpp`` (each table entry's formula in C++, combined by ``pair_terms``).

The forward computes the per-pair derivatives in the same pass (they cost a few flops), maps them through the
batch-coupled pieces done in torch (the aot sorts) to per-input derivatives, and saves those; the backward is
``grad_out * saved``.
"""
from __future__ import annotations

import importlib

import torch

from prefopt._backend import resolve
from prefopt._options import PairLossParams
from prefopt.losses.table import PairSpec, TorchOps, pair_terms, params_view

_DIFF = ("pc", "pr", "rc", "rr")


def torch_pair_forward(spec: PairSpec, x: dict, params: torch.Tensor, need_grad: bool, compute_dtype):
    p = params_view(params.to(compute_dtype), len(spec.losses))
    loss, g = pair_terms(TorchOps, spec, x, p, need_grad)
    P = x["pc"].shape[0]
    loss = loss.expand(P)
    g = {k: (v.expand(P) if v is not None else None) for k, v in g.items()}
    return loss, g


class _TorchBackend:
    pair_forward = staticmethod(torch_pair_forward)

    @staticmethod
    def backward_scale(saved, grad_out, out_dtype):
        return (saved * grad_out.to(saved.dtype)).to(out_dtype)


def _import_kernels():
    return importlib.import_module("prefopt.kernels.preference_loss")


def loss_impl(device):
    """The backend implementation for tensors on `device`; an unavailable backend is an error, never a fallback."""
    backend = resolve(device)
    if backend == "triton":
        return _import_kernels()
    if backend == "cpp":
        return importlib.import_module("prefopt.cpu.losses_cpp")
    return _TorchBackend


def _scatter(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[index[k]] = src[k] (the derivative of a sort)."""
    return torch.zeros_like(src).index_copy_(0, index, src)


class PreferencePairFunction(torch.autograd.Function):
    """(pc, pr, rc, rr) [P] (pr/rc/rr may be None) -> (mean over pairs of the per-pair loss [scalar], per-pair loss [P])

    options: `PairLossParams` (prefopt/_options.py): the spec, the parameter vector, the non-differentiable per-pair
    tensors {"ilc", "ilr", "w", "s"} (already in the compute dtype) and the compute dtype, settled by
    prefopt/losses/api.py. The per-pair loss output is non-differentiable (metrics only).
    """

    @staticmethod
    def forward(ctx, pc, pr, rc, rr, options: PairLossParams):
        spec, params, extras, compute_dtype = options.spec, options.params, options.extras, options.compute_dtype
        inputs = {"pc": pc, "pr": pr, "rc": rc, "rr": rr}
        impl = loss_impl(pc.device)
        x = {k: v.to(compute_dtype) for k, v in inputs.items() if v is not None}
        x.update({k: v for k, v in extras.items() if v is not None})
        P = pc.shape[0]
        need_grad = any(ctx.needs_input_grad[:4])
        perm = {}
        if "aot" in spec.losses:
            s1, perm["a1"] = torch.sort(x["pc"] - x["pr"], dim=0)
            s2, perm["a2"] = torch.sort(x["rc"] - x["rr"], dim=0)
            x["ha"] = s1 - s2
        if "aot_unpaired" in spec.losses:
            s1, perm["u1"] = torch.sort(x["pc"] - x["rc"], dim=0)
            s2, perm["u2"] = torch.sort(x["pr"] - x["rr"], dim=0)
            x["hu"] = s1 - s2
        loss_pp, g = impl.pair_forward(spec, x, params, need_grad, compute_dtype)
        loss = loss_pp.sum() / P
        ctx.impl = impl
        ctx.dtypes = {k: (v.dtype if v is not None else None) for k, v in inputs.items()}
        ctx.set_materialize_grads(False)
        if need_grad:
            G = {k: torch.zeros(P, dtype=compute_dtype, device=pc.device) for k in _DIFF if inputs[k] is not None}
            if g["c"] is not None:
                G["pc"] += g["c"]
                if "rc" in G:
                    G["rc"] -= g["c"]
            if g["r"] is not None:
                G["pr"] += g["r"]
                if "rr" in G:
                    G["rr"] -= g["r"]
            if g["a"] is not None:   # h_aot = sort(pc - pr) - sort(rc - rr)
                t1, t2 = _scatter(g["a"], perm["a1"]), _scatter(g["a"], perm["a2"])
                G["pc"] += t1
                G["pr"] -= t1
                G["rc"] -= t2
                G["rr"] += t2
            if g["u"] is not None:   # h_aotu = sort(pc - rc) - sort(pr - rr)
                t1, t2 = _scatter(g["u"], perm["u1"]), _scatter(g["u"], perm["u2"])
                G["pc"] += t1
                G["rc"] -= t1
                G["pr"] -= t2
                G["rr"] += t2
            saved = [G.get(k, None) for k in _DIFF]
            saved = [(t / P) if t is not None else None for t in saved]
            ctx.save_for_backward(*saved)
        else:
            ctx.save_for_backward(None, None, None, None)
        ctx.mark_non_differentiable(loss_pp)
        return loss.to(compute_dtype), loss_pp

    @staticmethod
    def backward(ctx, grad_loss, grad_pp):
        if grad_loss is None:
            return None, None, None, None, None
        saved = ctx.saved_tensors
        out = []
        for k, s, need in zip(_DIFF, saved, ctx.needs_input_grad[:4]):
            out.append(ctx.impl.backward_scale(s, grad_loss, ctx.dtypes[k]) if (need and s is not None) else None)
        return (*out, None)
