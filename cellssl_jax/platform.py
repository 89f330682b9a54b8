"""Process-wide platform settings for the CLIs and benchmarks: XLA flags set before the JAX backend starts.

Importing this module applies ``configure()`` (``cellssl_jax.demo`` and the benchmarks import it before anything
touches a device). What it sets, and why (figures in BENCHMARKS.md):

- ``--xla_cpu_experimental_ynn_fusion_type=`` (empty): YNNPACK off. This jaxlib hands large convolutions and dots to
  YNNPACK by default; YNNPACK computes a weight gradient at ~45 GFLOP/s, 4× slower than XLA's Eigen path, and the
  ConvAE train step ran 1.5–1.7× slower with it (platform notes). With the hand-written backward passes of
  ``ConvAE(formulation="subpixel_vjp")`` YNNPACK still lost (0.62× of the step with it off, same process).

A flag already present in ``XLA_FLAGS`` is left as the user set it (e.g. ``--xla_cpu_experimental_ynn_fusion_type=
LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`` to measure YNNPACK). An unknown flag in ``XLA_FLAGS`` aborts the process at backend
start, so a flag is only added when this jaxlib is known to accept it: the versions in ``VERIFIED_JAXLIB`` (checked by
``tests/test_platform.py`` against the installed jaxlib), or, for any other version, after a child process started the
CPU backend with it (once per process, ~2 s). ``CELLSSL_XLA_DEFAULTS=0`` turns all of this off.

GPU: no flag is set (none has been measured on a GPU here).

``compiler_options()`` gives the same settings as per-compilation options for ``jax.jit(..., compiler_options=...)``,
for code that runs after the backend started (a notebook); an unknown option there raises a Python error instead of
aborting.

``hugepage_malloc_env()``: glibc's ``malloc`` with transparent huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``)
removed ~200 k page faults per training step (XLA writes each step's large temporaries into fresh memory). It must be
in the environment when the process starts; ``reexec_with(env)`` restarts the current command with it.
"""

from __future__ import annotations

import functools
import logging
import os
import platform as _stdlib_platform
import subprocess
import sys

log = logging.getLogger(__name__)

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
CPU_XLA_FLAGS: tuple[str, ...] = (YNN_OFF,)
# jaxlib versions on which every flag of CPU_XLA_FLAGS was seen accepted (a child process started the backend with it).
VERIFIED_JAXLIB: frozenset[str] = frozenset({"0.10.2"})
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0].strip()


def _jaxlib_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("jaxlib")
    except Exception:  # noqa: BLE001 - not installed / odd packaging: treat as unverified
        return None


def backend_started() -> bool:
    """True once JAX has created a backend: XLA_FLAGS set after that are ignored."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # noqa: BLE001 - private API moved: assume the worst
        return True


def xla_flags_accepted(flags: tuple[str, ...], *, timeout_s: float = 120.0) -> bool:
    """Whether a fresh process with ``flags`` in XLA_FLAGS starts the CPU backend (an unknown flag aborts it)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", CELLSSL_XLA_DEFAULTS="0")
    try:
        done = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, timeout=timeout_s,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not check XLA flags %s: %s", flags, err)
        return False
    if done.returncode != 0:
        log.warning("this jaxlib rejects XLA flags %s: %s", flags, done.stderr.strip()[-300:])
    return done.returncode == 0


@functools.lru_cache(maxsize=None)
def _cpu_flags_usable() -> bool:
    if _jaxlib_version() in VERIFIED_JAXLIB:
        return True
    return xla_flags_accepted(CPU_XLA_FLAGS)


def configure(*, environ: dict | None = None) -> list[str]:
    """Add this project's XLA flags to ``XLA_FLAGS`` (those the user has not set). Returns the flags added.

    Does nothing (with a warning) once the backend has started, and nothing when ``CELLSSL_XLA_DEFAULTS=0``.
    """
    env = os.environ if environ is None else environ
    if env.get("CELLSSL_XLA_DEFAULTS", "1") == "0":
        return []
    current = env.get("XLA_FLAGS", "")
    present = {_flag_name(f) for f in current.split()}
    missing = [f for f in CPU_XLA_FLAGS if _flag_name(f) not in present]
    if not missing:
        return []
    if environ is None and backend_started():
        log.warning("JAX backend already started: XLA flags %s not applied (import cellssl_jax.platform first)",
                    missing)
        return []
    if not _cpu_flags_usable():
        return []
    env["XLA_FLAGS"] = " ".join([current, *missing]).strip()
    return missing


def compiler_options(backend: str | None = None) -> dict[str, str]:
    """Per-compilation equivalent of ``configure()`` for ``jax.jit(..., compiler_options=...)`` (CPU only)."""
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend != "cpu":
        return {}
    return {_flag_name(f).lstrip("-"): f.split("=", 1)[1] for f in CPU_XLA_FLAGS}


def hugepage_malloc_env(environ: dict | None = None) -> dict[str, str] | None:
    """The environment that turns on glibc's transparent-huge-page malloc, or None when already on / not glibc Linux."""
    env = os.environ if environ is None else environ
    if sys.platform != "linux" or _stdlib_platform.libc_ver()[0] != "glibc":
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    return {"GLIBC_TUNABLES": ":".join(t for t in (tunables, HUGEPAGE_TUNABLE) if t)}


def reexec_with(extra_env: dict[str, str]) -> None:
    """Replace this process by the same command with ``extra_env`` added (glibc reads its tunables only at start)."""
    os.environ.update(extra_env)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def machine_description() -> dict[str, object]:
    """CPU model, cores, memory and library versions, for benchmark headers."""
    cpu = _stdlib_platform.processor() or _stdlib_platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    memory_gb = None
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {"cpu": cpu, "cores": cores, "memory_gb": memory_gb, "python": _stdlib_platform.python_version(),
            "jaxlib": _jaxlib_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


APPLIED_XLA_FLAGS = configure()
