"""cellssl_jax.platform: which XLA flags it adds, that this jaxlib accepts them, and the malloc environment."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from cellssl_jax import platform

REPO = Path(__file__).resolve().parents[1]


def test_configure_adds_the_cpu_flags_only_where_the_user_has_not_set_them():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert platform.configure(environ=env) == list(platform.CPU_XLA_FLAGS)
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", *platform.CPU_XLA_FLAGS]
    assert platform.configure(environ=env) == []  # idempotent

    users_choice = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    assert platform.configure(environ=dict(users_choice)) == []

    off = {"CELLSSL_XLA_DEFAULTS": "0"}
    assert platform.configure(environ=off) == [] and "XLA_FLAGS" not in off


def _child(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CELLSSL_XLA_DEFAULTS")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_importing_before_the_backend_starts_applies_the_flags_and_after_it_warns():
    out = _child("import cellssl_jax.platform, os, jax; jax.devices(); print('FLAGS', os.environ['XLA_FLAGS'])")
    assert f"FLAGS {' '.join(platform.CPU_XLA_FLAGS)}" in out
    late = _child("import jax; jax.devices(); import logging; logging.basicConfig(); "
                  "import cellssl_jax.platform as p, os; print('APPLIED', p.APPLIED_XLA_FLAGS, 'XLA_FLAGS' in os.environ)")
    assert "APPLIED [] False" in late and "backend already started" in late


def test_this_jaxlib_accepts_the_flags_and_the_probe_detects_a_rejected_one():
    """An unknown XLA flag aborts the process; the child-process probe must tell the two apart."""
    assert platform.xla_flags_accepted(platform.CPU_XLA_FLAGS)
    assert not platform.xla_flags_accepted(("--xla_cellssl_no_such_flag=1",))


def test_compiler_options_compile_on_cpu_and_are_empty_elsewhere():
    options = platform.compiler_options("cpu")
    assert options == {"xla_cpu_experimental_ynn_fusion_type": ""}
    f = jax.jit(lambda a: a @ a, compiler_options=options)
    assert float(f(jnp.ones((4, 4)))[0, 0]) == 4.0
    assert platform.compiler_options("gpu") == {}


@pytest.mark.skipif(platform.hugepage_malloc_env({}) is None, reason="not glibc Linux")
def test_hugepage_malloc_env_keeps_other_tunables_and_is_none_when_set():
    assert platform.hugepage_malloc_env({}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert platform.hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1:glibc.malloc.hugetlb=1"}
    assert platform.hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is None


def test_machine_description_names_cpu_and_cores():
    d = platform.machine_description()
    assert d["cores"] >= 1 and d["cpu"] and d["jaxlib"] == jax.lib.__version__
