import os

# PREFOPT_TEST_DEVICE=cuda runs the kernel tests on CUDA tensors with compiled Triton kernels (scripts/gpu_check.sh);
# the default, cpu, runs the Triton kernels on CPU tensors through the interpreter, which must be on before triton is
# imported.
TEST_DEVICE = os.environ.get("PREFOPT_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"PREFOPT_TEST_DEVICE must be cpu or cuda, got {TEST_DEVICE!r}")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
else:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("PREFOPT_TEST_DEVICE=cuda runs the compiled kernels: unset TRITON_INTERPRET")
    # cuBLAS is deterministic under torch.use_deterministic_algorithms only with a fixed workspace (set before the
    # first CUDA call)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

if TEST_DEVICE == "cuda":
    from tests._backends import cuda_tensor_mode
    cuda_tensor_mode().__enter__()  # for the whole session: every test builds its inputs on the GPU


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tests of what prefopt integrates with (transformers and its attention / mask interfaces, the TRL drop-in, PEFT
# adapters, Liger's forms, FSDP through accelerate, the dependency checks): `.ci/run` runs them a second time
# against the newest releases (`-m integration`).
INTEGRATION_FILES = {"test_integrations_transformers.py", "test_integrations_trl.py", "test_liger_forms.py",
                     "test_fsdp.py", "test_ecosystem.py", "test_lora_head.py", "test_moe_vlm.py",
                     "test_linear_attention.py", "test_context_parallel.py", "test_long_context.py",
                     "test_trainer_vlm.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in INTEGRATION_FILES:
            item.add_marker(pytest.mark.integration)
