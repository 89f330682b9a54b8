"""Settings of the test session, applied before JAX starts its backend (this file is read before any test module).

LLVM at -O0 for the code XLA:CPU generates. Most of the suite's time is XLA:CPU compiling many small programs, and most
of a compilation is LLVM optimising the generated machine code: ``tests/test_model.py`` ran in 164 s at -O0 against 249
s at the default, in one process on the 2-core machine (2026-11-27; BENCHMARKS.md, "Test suite": the whole suite 13 min
28 s against 16 min 12 s). XLA's own optimisation of the program (fusion, layout, algebraic rewrites) is unchanged; only
the machine code is less tuned, so values can differ in rounding, which the suite's float comparisons allow (it passes
either way), and the bit-for-bit checks compare two runs made under the same flags. Processes that tests start with an
environment of their own (train.py runs, forced device counts) compile at the default level.
``CELLSSL_TEST_XLA_OPT=default`` turns this off, e.g. to run the suite exactly as users' processes compile.
"""

import os

_O0 = "--xla_backend_optimization_level=0"

if os.environ.get("CELLSSL_TEST_XLA_OPT", "") != "default" and "xla_backend_optimization_level" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_O0}".strip()
