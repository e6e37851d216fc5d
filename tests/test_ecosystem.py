"""prefopt next to what users already have installed: names, tested versions, and the TRL drop-in's guard.

* The Triton kernels are `prefopt.kernels` only. Hugging Face's `kernels` package (a transformers 5.25
  dependency, imported by TRL's DPOTrainer) must win `import kernels` from the checkout root, which
  `python -m pytest` / `python -m bench` put first on sys.path.
* The tested versions live in prefopt/versions.py; pyproject.toml's lower bounds and constraints.txt (the pins of
  README's test command) agree with them.
* Outside the tested TRL range the drop-in says so in one warning; without the TRL internals it overrides it
  raises before TRL runs.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import prefopt.versions as versions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKOUT_KERNELS = os.path.join(ROOT, "kernels")


def _run_from_root(code):
    """`python -c code` from the checkout root: like `python -m ...`, the root is first on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_kernels_from_the_checkout_root_is_not_ours():
    """Fails while kernels/ is a regular package: then `import kernels` (here, in transformers and in TRL)
    resolves to the checkout's folder and TRL's DPOTrainer import dies on a missing name."""
    proc = _run_from_root(
        "import importlib.util, json\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "origin = None if spec is None else (spec.origin or list(spec.submodule_search_locations))\n"
        "import prefopt.kernels.linear_logprobs as head\n"
        "trl_ok = importlib.util.find_spec('trl') is not None\n"
        "if trl_ok:\n"
        "    from trl import DPOTrainer\n"
        "print(json.dumps(dict(origin=origin, head=head.__file__, trl=trl_ok)))\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["head"] == os.path.join(CHECKOUT_KERNELS, "linear_logprobs.py")
    origin = out["origin"]
    if versions.installed_version("kernels") is not None:
        # Hugging Face's package is installed: it is what the name means, from the checkout root too
        assert isinstance(origin, str) and not origin.startswith(CHECKOUT_KERNELS + os.sep), origin
    else:  # not installed: at most a namespace portion of the folder (none of its modules loads, below)
        assert origin is None or isinstance(origin, list), origin


@pytest.mark.parametrize("name", sorted(f[:-3] for f in os.listdir(CHECKOUT_KERNELS) if f.endswith(".py")))
def test_kernel_modules_refuse_the_top_level_name(name):
    """Loaded as kernels.<name> (what a namespace package of the folder would give where Hugging Face's package
    is absent), every module fails: the leaves on their own guard, the others on a sibling's."""
    spec = importlib.util.spec_from_file_location(f"kernels.{name}", os.path.join(CHECKOUT_KERNELS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    with open(spec.origin) as f:
        relative = re.search(r"^from \.", f.read(), re.M) is not None
    with pytest.raises(ImportError, match=None if relative else "importable only as prefopt.kernels"):
        spec.loader.exec_module(module)


def test_kernels_folder_is_not_a_regular_package():
    assert not [f for f in os.listdir(CHECKOUT_KERNELS) if f.startswith("__init__.")]


def test_no_project_module_imports_a_top_level_kernels():
    pattern = re.compile(r"^\s*(from|import)\s+kernels\b", re.M)
    offenders = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build", "dist", "__pycache__")]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    if pattern.search(f.read()):
                        offenders.append(os.path.relpath(path, ROOT))
    assert not offenders


# ------------------------------------------------------------------------------------------------ versions

def _pyproject_requirements():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    return reqs


def _constraints():
    pins = {}
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, version = line.split("==")
                pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _lowest(specifier_set):
    lows = [Version(s.version) for s in specifier_set if s.operator == ">="]
    assert len(lows) == 1, specifier_set
    return lows[0]


def test_pyproject_lower_bounds_are_the_lowest_tested_versions():
    declared = {dist: _lowest(spec) for dist, spec in
                ((d, SpecifierSet(s)) for d, s in versions.TESTED.items())}
    seen = set()
    for req in _pyproject_requirements():
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in declared:
            seen.add(name)
            assert _lowest(req.specifier) == declared[name], (req, versions.TESTED[name])
    assert seen == set(declared)


def test_constraints_pin_every_tested_dependency_inside_its_range():
    pins = _constraints()
    for dist in versions.TESTED:
        assert dist in pins, f"constraints.txt does not pin {dist}"
        assert versions.in_tested_range(dist, pins[dist]), (dist, pins[dist], versions.TESTED[dist])


def test_readme_test_command_installs_the_pins():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv && ")]
    assert len(commands) == 2, commands  # the main job and the tests
    assert all("-c constraints.txt" in c for c in commands), commands


def test_in_tested_range_reads_releases():
    assert versions.in_tested_range("torch", "2.13.0+cpu")
    assert versions.in_tested_range("torch", "2.13.1")
    assert not versions.in_tested_range("torch", "2.12.1")
    assert not versions.in_tested_range("torch", "2.14.0")
    assert versions.in_tested_range("trl", None) in (True, False, None)
    assert versions.in_tested_range("liger-kernel", "0.8.5") and not versions.in_tested_range("liger-kernel", "0.8.4")


# ---------------------------------------------------------------------------------------- the TRL drop-in

from prefopt.integrations import trl as trl_integration  # noqa: E402  (trl is a test dependency: no skip)


def test_trl_outside_the_tested_range_warns_once_in_one_line(monkeypatch):
    monkeypatch.setattr(versions, "_WARNED", set())
    monkeypatch.setitem(versions.TESTED, "trl", ">=99.0,<99.1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trl_integration.check_trl_internals()
        trl_integration.check_trl_internals()
    mine = [w for w in caught if "prefopt" in str(w.message)]
    assert len(mine) == 1
    text = str(mine[0].message)
    assert "\n" not in text and ">=99.0,<99.1" in text and versions.installed_version("trl") in text


def test_trl_inside_the_tested_range_is_silent(monkeypatch):
    monkeypatch.setattr(versions, "_WARNED", set())
    monkeypatch.setitem(versions.TESTED, "trl", f">={versions.installed_version('trl')}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trl_integration.check_trl_internals()
    assert not [w for w in caught if "prefopt" in str(w.message)]


def test_trl_without_the_overridden_method_fails_before_training(monkeypatch):
    """A TRL whose `_compute_loss` takes other parameters: the drop-in refuses at construction, before TRL's own
    constructor runs (no model is even needed), instead of failing deep inside a step or computing another loss."""
    from trl import DPOTrainer

    def _compute_loss(self, model, batch):  # a different private API
        raise AssertionError("never called")

    monkeypatch.setattr(DPOTrainer, "_compute_loss", _compute_loss)
    with pytest.raises(trl_integration.TRLVersionError, match=r"_compute_loss\(model, inputs, return_outputs\)"):
        trl_integration.PrefoptDPOTrainer(model=None)


def test_trl_without_a_helper_fails_before_training(monkeypatch):
    import trl.models.utils
    monkeypatch.delattr(trl.models.utils, "disable_gradient_checkpointing")
    with pytest.raises(trl_integration.TRLVersionError, match="disable_gradient_checkpointing"):
        trl_integration.check_trl_internals()


def test_prefopt_info_lists_the_dependencies():
    import contextlib
    import io

    from prefopt.cli import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["info"]) == 0
    text = buf.getvalue()
    for dist in versions.TESTED:
        line = next((l for l in text.splitlines() if l.strip().startswith(dist + " ")), None)
        assert line is not None, text
        inside = versions.in_tested_range(dist)
        assert ("not installed" if inside is None else "tested" if inside else "OUTSIDE") in line
