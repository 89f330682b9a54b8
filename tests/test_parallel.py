"""cellssl_jax.parallel: global batches split over the devices, replicated state read back locally, start-up helpers.

The multi-device checks run in a subprocess with 4 forced CPU devices (the flag must be set before JAX starts); the
training-level equivalences (8 devices vs 1, two jax.distributed processes vs one) live in test_training.py.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax

from cellssl_jax import parallel

REPO = Path(__file__).resolve().parents[1]


def test_global_batch_shards_rows_over_4_devices_and_replicas_read_back_locally():
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from cellssl_jax import parallel
        mesh = parallel.make_data_mesh()
        assert mesh.size == 4 and mesh.axis_names == ("data",)
        local = {"crops": (np.arange(8 * 3, dtype=np.float32).reshape(8, 3), np.ones((8, 2, 2, 1), np.float32))}
        batch = parallel.global_batch(local, mesh)
        first = batch["crops"][0]
        assert first.shape == (8, 3) and len(first.sharding.device_set) == 4
        rows = sorted((s.index[0].start, s.data.shape[0]) for s in first.addressable_shards)
        assert rows == [(0, 2), (2, 2), (4, 2), (6, 2)], rows  # each device holds its own quarter of the rows
        np.testing.assert_array_equal(np.asarray(first), local["crops"][0])

        total = jax.jit(lambda x: x.sum(), out_shardings=parallel.replicated_sharding(mesh))(first)
        state = parallel.replicate({"w": np.full(3, 2.0, np.float32)}, mesh)
        assert state["w"].sharding.is_fully_replicated
        mine = parallel.local_replica(state)
        assert len(mine["w"].sharding.device_set) == 1  # one local copy, usable by a locally jitted function
        host = parallel.fetch_replicated({"total": total})
        assert isinstance(host["total"], np.ndarray) and float(host["total"]) == float(local["crops"][0].sum())

        try:
            parallel.global_batch({"x": np.zeros((6, 2), np.float32)}, mesh)
        except ValueError as err:
            assert "does not split over 4 local devices" in str(err), err
        else:
            raise AssertionError("a batch of 6 on 4 devices must be refused")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "CELLSSL_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_initialize_distributed_does_nothing_without_a_coordinator(monkeypatch):
    for name in ("CELLSSL_COORDINATOR", "CELLSSL_NUM_PROCESSES", "CELLSSL_PROCESS_ID", "CELLSSL_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: called.append(kw))
    parallel.initialize_distributed()
    assert called == []
    monkeypatch.setenv("CELLSSL_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.setenv("CELLSSL_NUM_PROCESSES", "2")
    monkeypatch.setenv("CELLSSL_PROCESS_ID", "1")
    monkeypatch.setattr(jax.config, "update", lambda *a: called.append(a))  # leave this process's CPU config alone
    parallel.initialize_distributed()
    assert {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1} in called
    assert ("jax_cpu_collectives_implementation", "gloo") in called


def test_compilation_cache_prefers_the_environment_and_can_be_off(monkeypatch, tmp_path):
    updates = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.__setitem__(name, value))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    parallel.enable_compilation_cache("")
    assert updates == {}
    parallel.enable_compilation_cache(tmp_path / "flag")
    assert updates["jax_compilation_cache_dir"] == str(tmp_path / "flag") and (tmp_path / "flag").is_dir()
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    parallel.enable_compilation_cache(tmp_path / "flag")
    assert updates["jax_compilation_cache_dir"] == str(tmp_path / "env")
