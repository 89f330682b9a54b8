"""The two ways this package compiles with Numba, in one place.

- `kernel`: a compiled function called from Python. Cached on disk (the first run compiles for ~20 s of CPU, later
  runs load in well under a second). error_model='numpy' drops the per-division zero checks (a division by zero
  gives inf/nan instead of raising), which the inner loops can afford. No fastmath: results are bit-reproducible.
- `helper`: called only from other compiled functions, so it needs no Python wrapper (less to compile).
"""

import numba

kernel = numba.njit(cache=True, error_model="numpy")
helper = numba.njit(cache=True, error_model="numpy", no_cpython_wrapper=True)
