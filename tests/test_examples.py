"""The plain PyTorch example trains: the DPO loss falls and the margin grows."""
import importlib.util
import pathlib

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "plain_pytorch_dpo.py"


def test_plain_pytorch_example_learns_the_preference():
    spec = importlib.util.spec_from_file_location("plain_pytorch_dpo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    history = module.main(["--steps", "30"])
    first, last = history[0], history[-1]
    assert abs(first["loss"] - 0.6931) < 1e-3          # policy == reference at step 1
    assert last["loss"] < 0.5 * first["loss"]
    assert last["rewards/margins"] > 0.5
