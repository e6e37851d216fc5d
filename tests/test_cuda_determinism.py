"""The deterministic backward on a GPU, bit for bit: under torch.use_deterministic_algorithms(True) the triton backend
runs the tiled head (cuBLAS GEMMs with a fixed workspace, the Triton row ops, no atomics; docs/design.md "Backend
choice"), so two backwards of the same call give the same bits, with gradient filtering and vocabulary sorting too,
in fp32 and bf16; the fused head (fp32 atomics) refuses. Runs on CUDA tensors only (PREFOPT_TEST_DEVICE=cuda, as
scripts/gpu_check.sh runs it; tests/conftest.py sets CUBLAS_WORKSPACE_CONFIG); on CPU the interpreter adds in a fixed
order anyway, and tests/test_tiled_head.py checks what the deterministic mode selects."""
import pytest
import torch

import prefopt
from tests._backends import ON_CUDA, available

pytestmark = pytest.mark.skipif(not (ON_CUDA and available("triton")),
                                reason="a GPU check: PREFOPT_TEST_DEVICE=cuda with the triton backend")

N, H, V = 300, 256, 5000  # ragged against every tile; several vocabulary blocks of the tiled head below


@pytest.fixture
def deterministic():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H ** 0.5
    weight[:, 0] = -2 * torch.log1p(torch.arange(V, dtype=torch.float32))  # a frequency tail: filtering skips blocks
    hidden[:, 0] = 1
    labels = torch.randint(0, 64, (N,), generator=gen)
    upstream = torch.randn(2, N, generator=gen)
    return hidden.to(dtype).cuda(), weight.to(dtype).cuda(), labels.cuda(), upstream.cuda()


def _grads(hidden, weight, labels, upstream, **options):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp, entropy = prefopt.linear_logprobs(h, w, labels, return_entropy=True, **options)
    loss = (logp.float() * upstream[0]).sum() + (entropy.float() * upstream[1]).sum()
    return torch.autograd.grad(loss, (h, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [{}, {"filter_eps": 2.0 ** -12}, {"filter_eps": 2.0 ** -12, "vocab_sort": True}],
                         ids=["exact", "filtered", "filtered-sorted"])
def test_two_backwards_are_bitwise_equal(deterministic, monkeypatch, dtype, options):
    import prefopt.cpu.chunked as chunked
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 128 * 1024)  # 128 rows x 1024 columns: 3 x 5 tiles
    monkeypatch.setattr(chunked, "TARGET_ROWS", 128)
    hidden, weight, labels, upstream = _inputs(dtype)
    with prefopt.use_backend("triton"):
        assert prefopt.head_choice(N, H, V, dtype) == "tiles"
        first = _grads(hidden, weight, labels, upstream, **options)
        second = _grads(hidden, weight, labels, upstream, **options)
    for a, b in zip(first, second):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


def test_the_fused_head_refuses(deterministic):
    hidden, weight, labels, _ = _inputs(torch.float32)
    with prefopt.use_backend("triton"), prefopt.use_head("fused"), pytest.raises(RuntimeError,
                                                                                 match="no deterministic backward"):
        prefopt.linear_logprobs(hidden.requires_grad_(), weight, labels)
