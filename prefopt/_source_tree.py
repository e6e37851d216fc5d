"""Make `prefopt.kernels` importable from a source checkout that was not pip-installed.

An install maps the top-level `kernels/` folder to `prefopt.kernels` (pyproject package-dir). Running from
the repository (PYTHONPATH=.) has no such mapping, so register the folder as that subpackage by hand.
"""
import importlib.util
import os
import sys


def register_kernels_package() -> None:
    if "prefopt.kernels" in sys.modules or importlib.util.find_spec("prefopt.kernels") is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location("prefopt.kernels", init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["prefopt.kernels"] = module
    spec.loader.exec_module(module)
