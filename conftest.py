"""Settings of the test session, applied before JAX starts its backend (this file is read before any test module).

LLVM at -O0 for the code XLA:CPU generates. Most of the suite's time is XLA:CPU compiling many small programs, and most
of a compilation is LLVM optimising the generated machine code: ``tests/test_model.py`` ran in 164 s at -O0 against 249
s at the default, in one process on the 2-core machine (2026-11-27; BENCHMARKS.md, "Test suite": the whole suite 13 min
28 s against 16 min 12 s). XLA's own optimisation of the program (fusion, layout, algebraic rewrites) is unchanged; only
the machine code is less tuned, so values can differ in rounding, which the suite's float comparisons allow (it passes
either way), and the bit-for-bit checks compare two runs made under the same flags. Processes that tests start with an
environment of their own (train.py runs, forced device counts) compile at the default level.
``CELLSSL_TEST_XLA_OPT=default`` turns this off, e.g. to run the suite exactly as users' processes compile; where a jax
GPU plugin is installed it stays off.

One persistent compilation cache for the session, in a temporary folder removed at its end: the two pytest-xdist workers
compile many of the same programs (both build ConvAEs, training steps and feature extractors of the same shapes), and so
do the processes tests start that keep this environment. Every compilation is cached (no minimum time or size), so a
program either process compiled is loaded, not compiled again. In the working tree the suite took 9 min 49 s with it
(user 17.6 min) against 13 min 28 s without (user 24.4 min), one run each on 2026-11-27 (BENCHMARKS.md, "Test suite").
The cache key holds the XLA flags, the jaxlib version and the devices, so only identical compilations are shared. A
``JAX_COMPILATION_CACHE_DIR`` already set is used as it is and left in place.
"""

import os
import shutil
import tempfile

_O0 = "--xla_backend_optimization_level=0"


def _gpu_plugin_installed() -> bool:
    """A jax CUDA/ROCm plugin is installed: the flag also reaches XLA's GPU code generation, measured nowhere, so a
    GPU machine (benchmarks/gpu_session.sh runs the kernel tests there) compiles as users' processes do."""
    from importlib.metadata import distributions

    return any((d.metadata["Name"] or "").lower().replace("_", "-").startswith(("jax-cuda", "jax-rocm"))
               for d in distributions())


if os.environ.get("CELLSSL_TEST_XLA_OPT", "") != "default" and "xla_backend_optimization_level" not in os.environ.get(
        "XLA_FLAGS", "") and not _gpu_plugin_installed():
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_O0}".strip()

_SESSION_CACHE = None
# Set in the controller before xdist starts its workers, which inherit the environment (workers skip this).
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="cellssl_jax_test_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None and "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
