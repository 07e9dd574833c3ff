"""Compiled CPU kernels, built once on the machine that runs them, with a torch fallback.

``dictionary()`` returns the extension built from ``dictionary.cpp`` (DictionaryLinear's code product),
``quant.cpp`` (the product with int8 weights, ``int8_rows``) and ``solver.cpp`` (CoSpaDi's Batch-OMP and
K-SVD sweep; see each file's header for the algorithm) or None when it cannot be built or loaded: no C++
compiler, no ninja, a failed compile, or ``FACTORKIT_KERNELS=0`` in the environment. The first failure
logs one sentence; callers then use their pure-torch kernels, which give the same results more slowly.
The build is torch's JIT extension build (``torch.utils.cpp_extension.load``) with ``-O3 -march=native``
(and OpenMP on Linux), cached under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) in
a folder named after this machine's instruction set, so a home directory shared by different CPUs never
loads a binary built for another. ``make install`` builds it (``python -m factorkit.kernels``), so the
first model load does not pay the minute the compile takes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger("factorkit")

SOURCES = [Path(__file__).with_name(name) for name in ("dictionary.cpp", "quant.cpp", "solver.cpp")]
DISABLE_ENV = "FACTORKIT_KERNELS"


def _cpu_tag() -> str:
    """A short hash of the CPU's instruction-set flags (x86: /proc/cpuinfo's flags line)."""
    flags = platform.machine()
    with contextlib.suppress(OSError):  # no /proc/cpuinfo (macOS): the machine name alone
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def dictionary() -> ModuleType | None:
    """The compiled DictionaryLinear kernel, or None: when ``FACTORKIT_KERNELS=0`` (read at every call, so a
    benchmark can time both paths in one process) or (after one logged sentence) when it cannot be built."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    return _build()


@functools.cache  # asked on every forward: the answer never changes for one extension
def usable(ext: ModuleType | None) -> tuple[str, ...]:
    """The compiled kernels worth running: both with AVX-512 or AVX2, none without a vector path (the scalar
    build is slower than torch's CSR product) or without the extension."""
    isa = "none" if ext is None else ext.isa()
    return ("mask", "lanes") if isa in ("avx512", "avx2") else ()


# at::parallel_for spreads a kernel over torch's intra-op threads only when the extension is compiled with OpenMP:
# without it the pragma inside is ignored and every kernel runs on one thread. On Linux the torch wheel has
# loaded its libgomp.so.1 already, so the extension shares that runtime (one thread pool, torch.set_num_threads).
OPENMP = ("-fopenmp",) if sys.platform.startswith("linux") else ()


def build(extra_cflags: tuple[str, ...] = (), suffix: str = "") -> ModuleType:
    """Compile (or load the cached build of) the kernels for this machine; raises when it cannot.
    ``extra_cflags`` and a name ``suffix`` build variants, e.g. ("-mno-avx512f",) for the AVX2 path.
    A compiler without OpenMP gets a build without it (one logged sentence): one thread, still compiled."""
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed")

    def compile_with(openmp: tuple[str, ...], tag: str) -> ModuleType:
        return cpp_extension.load(name=f"factorkit_dictionary_{_cpu_tag()}{suffix}{tag}",
                                  sources=[str(p) for p in SOURCES],
                                  extra_cflags=["-O3", "-march=native", *openmp, *extra_cflags],
                                  extra_ldflags=list(openmp), verbose=False)

    if not OPENMP:
        return compile_with((), "")
    try:
        return compile_with(OPENMP, "")
    except Exception as exc:  # a compiler (or runtime) without OpenMP: keep the kernels, on one thread
        try:
            ext = compile_with((), "_serial")
        except Exception:
            raise exc from None  # not OpenMP's doing: the first failure says what is wrong
        log.warning("factorkit's compiled CPU kernels do not build with OpenMP here (%s); built without it, they "
                    "run on one thread whatever torch.set_num_threads says.", _first_line(exc))
        return ext


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@functools.cache
def _build() -> ModuleType | None:
    try:
        return build()
    except Exception as exc:  # any build or load failure means: use the torch kernels
        log.warning("factorkit's compiled CPU kernels are unavailable (%s); falling back to torch's "
                    "slower kernels: install a C++ compiler (g++ or clang++) and ninja (a factorkit dependency) to enable "
                    "it.", _first_line(exc))
        return None


def main() -> None:
    """Build (or find) the kernels and say which path they take; exit status 0 either way."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    ext = dictionary()
    if ext is None:
        print("factorkit kernels: not built; DictionaryLinear uses torch's kernels")
    else:
        print(f"factorkit kernels: built ({ext.isa()} path)")

