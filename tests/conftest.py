import os

# The Triton kernels run on CPU tensors through the interpreter; it must be on before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tests of what prefopt integrates with (transformers, the TRL drop-in, Liger's forms, FSDP through accelerate,
# the dependency checks): `.ci/run` runs them a second time against the newest releases (`-m integration`).
INTEGRATION_FILES = {"test_integrations_transformers.py", "test_integrations_trl.py", "test_liger_forms.py",
                     "test_fsdp.py", "test_ecosystem.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in INTEGRATION_FILES:
            item.add_marker(pytest.mark.integration)
