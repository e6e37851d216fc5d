"""The dependency versions prefopt is tested with, declared once, and the checks that read them.

`TESTED` is the range of each dependency that the test suite has passed against: its lower end is the lowest
version a run tested (pyproject.toml's lower bound says the same; tests/test_versions.py checks the two agree
and that constraints.txt, the pins of the README test command, lies inside). The upper end is the newest
minor version tested: `.ci/run`'s "newest releases" leg tests whatever the registry serves, and
scripts/refresh_pins.sh moves the pins and these ranges together (README, "Development").

Where prefopt reaches into another library's internals (the TRL drop-in overrides private `DPOTrainer` methods)
`check_tested` is called once before training starts: outside the tested range it says so in one line naming
the range, and if the methods the drop-in overrides are gone it raises before TRL runs a step.
"""
from __future__ import annotations

import importlib.metadata
import warnings

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# distribution name -> the versions tested (see the module docstring before editing)
TESTED = {
    "torch": ">=2.13,<2.14",
    "triton": ">=3.9,<3.10",
    "transformers": ">=5.25,<5.26",
    "trl": ">=1.16,<1.17",
    "peft": ">=0.21,<0.22",
    "accelerate": ">=1.16,<1.17",
    "liger-kernel": ">=0.8.5,<0.9",
}

# what each is used for, in `prefopt info`
ROLES = {
    "torch": "required", "triton": "required on Linux (GPU kernels; the interpreter on CPU)",
    "transformers": "required (trainer, HF integration)", "trl": "optional (TRL drop-in)",
    "peft": "optional (adapters)", "accelerate": "optional (TRL, FSDP through accelerate)",
    "liger-kernel": "optional (bench peer, Liger forms compared in tests)",
}

_WARNED: set = set()


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def in_tested_range(dist: str, version: str | None = None) -> bool | None:
    """True / False for an installed `dist` inside / outside `TESTED`; None when it is not installed."""
    version = installed_version(dist) if version is None else version
    if version is None:
        return None
    try:
        release = Version(Version(version).base_version)  # 2.13.0+cpu, 5.26.0.dev0 -> their release
    except InvalidVersion:
        return False
    return SpecifierSet(TESTED[dist]).contains(release, prereleases=True)


def version_report() -> list[tuple[str, str | None, bool | None]]:
    """(distribution, installed version or None, inside the tested range) for every entry of `TESTED`."""
    return [(dist, installed_version(dist), in_tested_range(dist)) for dist in TESTED]


def check_tested(dist: str, what: str) -> bool:
    """Warn once (one line) if the installed `dist` is outside the tested range; True when inside."""
    inside = in_tested_range(dist)
    if inside is False and dist not in _WARNED:
        _WARNED.add(dist)
        warnings.warn(f"prefopt: {what} is tested with {dist} {TESTED[dist]}; {dist} "
                      f"{installed_version(dist)} is installed: results are not checked against it",
                      UserWarning, stacklevel=3)
    return bool(inside)
