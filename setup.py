"""Build of prefopt's optional compiled extensions (metadata lives in pyproject.toml).

* ``prefopt._C``       C++ CPU kernels (csrc/cpu/*.cpp), OpenMP, built whenever torch + a C++ compiler exist.
* ``prefopt._C_cuda``  CUDA kernels (csrc/cuda/*.cu + csrc/cuda/bindings.cpp), built only with a CUDA torch
                       and a CUDA toolkit (CUDA_HOME). Force on/off with PREFOPT_BUILD_CUDA=1/0.

Both are optional: if a build fails (no compiler, ...) the install still succeeds, prints one line why,
and prefopt falls back to the torch / triton backends.

Install (the build must see the same torch as the runtime, hence no build isolation):
    pip install torch ninja setuptools wheel
    pip install --no-build-isolation -e .        # or: python setup.py build_ext --inplace
Set PREFOPT_NO_EXT=1 to skip the compiled extensions entirely; MAX_JOBS limits ninja's parallelism.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _packages():
    pkgs = find_packages(include=["prefopt", "prefopt.*"])
    for sub in ("kernels", "bench"):  # top-level folders installed as prefopt.<sub> (pyproject package-dir)
        if os.path.isdir(os.path.join(ROOT, sub)):
            pkgs.append(f"prefopt.{sub}")
    return sorted(set(pkgs))


def _extensions():
    if os.environ.get("PREFOPT_NO_EXT", "0") not in ("", "0"):
        print("prefopt: PREFOPT_NO_EXT set, not building the C++/CUDA extensions")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch missing from the build env (build isolation without torch, ...)
        print(f"prefopt: torch not importable at build time ({exc.__class__.__name__}); "
              "C++ extension not built (use pip install --no-build-isolation)")
        return [], {}

    csrc = os.path.join(ROOT, "csrc")
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math"]
    if sys.platform == "darwin":  # Apple clang: OpenMP via libomp, if present
        cxx_flags = ["-O3", "-Xpreprocessor", "-fopenmp", "-ffp-contract=fast"]
    link_flags = ["-fopenmp"] if sys.platform != "darwin" else ["-lomp"]
    exts = [
        CppExtension(
            "prefopt._C",
            sources=_rel(glob.glob(os.path.join(csrc, "cpu", "*.cpp"))),
            include_dirs=[csrc],
            depends=_rel(glob.glob(os.path.join(csrc, "*.h")) + glob.glob(os.path.join(csrc, "cpu", "*.h"))),
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]

    want_cuda = os.environ.get("PREFOPT_BUILD_CUDA")
    cuda_ok = torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda == "1" or (want_cuda is None and cuda_ok):
        if not cuda_ok:
            print("prefopt: PREFOPT_BUILD_CUDA=1 but torch has no CUDA or CUDA_HOME is unset; trying anyway")
        exts.append(
            CUDAExtension(
                "prefopt._C_cuda",
                sources=_rel(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
                + _rel(glob.glob(os.path.join(csrc, "cuda", "*.cpp"))),
                include_dirs=[csrc],
                depends=_rel(glob.glob(os.path.join(csrc, "*.h")) + glob.glob(os.path.join(csrc, "cuda", "*.h"))),
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
            )
        )
    else:
        print("prefopt: no CUDA torch / CUDA_HOME: building the CPU extension prefopt._C only")

    class OptionalBuildExt(BuildExtension):
        """BuildExtension (ninja) whose failures skip the extension instead of failing the install."""

        failed = ()

        def build_extensions(self):
            try:  # torch checks the compiler (ABI, version) here, before any extension is built
                super().build_extensions()
            except Exception as exc:
                msg = str(exc).strip().splitlines()
                why = msg[-1] if msg else exc.__class__.__name__
                print(f"prefopt: C++/CUDA extensions not built ({why}); installing without them")
                self.failed = tuple(e.name for e in self.extensions)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except BaseException as exc:  # CompileError, RuntimeError from ninja, SystemExit, ...
                if isinstance(exc, KeyboardInterrupt):
                    raise
                msg = str(exc).strip().splitlines()
                why = msg[-1] if msg else exc.__class__.__name__
                print(f"prefopt: building {ext.name} failed ({why}); installing without it")
                self.failed = tuple(self.failed) + (ext.name,)

        def _ok_extensions(self):
            return [e for e in self.extensions if e.name not in self.failed]

        def copy_extensions_to_source(self):
            keep = self.extensions
            self.extensions = self._ok_extensions()
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = keep

        def get_outputs(self):
            keep = self.extensions
            self.extensions = self._ok_extensions()
            try:
                return super().get_outputs()
            finally:
                self.extensions = keep

        def get_output_mapping(self):
            keep = self.extensions
            self.extensions = self._ok_extensions()
            try:
                return super().get_output_mapping()
            finally:
                self.extensions = keep

    return exts, {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=_packages(),
    package_dir={"prefopt": "prefopt", "prefopt.kernels": "kernels"},
    package_data={"prefopt": ["data/*.jsonl", "data/*.json", "py.typed"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
