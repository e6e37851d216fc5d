"""`prefopt.kernels`: the top-level `kernels/` folder, under prefopt's name only.

The folder has no `__init__.py` on purpose. Hugging Face owns the top-level name `kernels` on PyPI, and
transformers (5.25+) and TRL import it; `python -m ...` run from the checkout root puts the root first on
`sys.path`, where a regular package `kernels/` would shadow Hugging Face's. Without an `__init__.py` the folder
can only ever be a namespace portion there, which a regular package further down `sys.path` always wins over.

A wheel copies the folder to `site-packages/prefopt/kernels/`, where it is found as a namespace subpackage of
prefopt. An editable install (pyproject package-dir) or a checkout on PYTHONPATH has no finder that maps a
folder without `__init__.py` to `prefopt.kernels`, so it is registered here by hand. Each kernel module calls
`require_prefopt_name(__name__)`, so the folder's modules also refuse to load as `kernels.*` where Hugging
Face's package is absent.
"""
import importlib.machinery
import importlib.util
import os
import sys

PACKAGE = "prefopt.kernels"


def kernels_folder() -> str:
    """Where prefopt.kernels' files live: inside the installed package (wheel), else beside it (checkout)."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    inside = os.path.join(package_dir, "kernels")
    return inside if os.path.isdir(inside) else os.path.join(os.path.dirname(package_dir), "kernels")


def register_kernels_package() -> None:
    if PACKAGE in sys.modules or importlib.util.find_spec(PACKAGE) is not None:
        return
    folder = kernels_folder()
    if not os.path.isdir(folder):
        return
    spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [folder]
    module = importlib.util.module_from_spec(spec)
    module.__doc__ = "prefopt's Triton kernels (the checkout's kernels/ folder)."
    sys.modules[PACKAGE] = module
    setattr(sys.modules["prefopt"], "kernels", module)


def require_prefopt_name(module_name: str) -> None:
    """Raise unless a kernel module is being imported as prefopt.kernels.<name> (see the module docstring)."""
    if not module_name.startswith(PACKAGE + "."):
        raise ImportError(f"{module_name!r}: prefopt's Triton kernels are importable only as "
                          f"{PACKAGE}.<module>; the top-level name 'kernels' belongs to Hugging Face's package")
