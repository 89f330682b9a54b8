"""Train a model from a config; rerunning the same command resumes from the workdir's latest checkpoint.

    python train.py --config configs/demo.py --workdir runs/demo/train [--config.key=value ...]
    python train.py --config configs/ablation.py:noaug_one --workdir runs/ablation/noaug_one --config.dataset_dir=D

Multi-host: on TPU pods and SLURM/GPU clusters start one process per host with ``CELLSSL_DISTRIBUTED=1`` (JAX reads
the rest from the environment); for a manual launch set ``CELLSSL_COORDINATOR=host:port``, ``CELLSSL_NUM_PROCESSES``
and ``CELLSSL_PROCESS_ID`` in each process (cellssl_jax.parallel.initialize_distributed).
"""

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file, e.g. configs/demo.py or configs/ablation.py:aug_one", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "folder for checkpoints, metrics.jsonl, TensorBoard events and images")
_XLA_CACHE = flags.DEFINE_string("xla_cache", "~/.cache/cellssl-jax/xla",
                                 "persistent compilation cache ('' disables; JAX_COMPILATION_CACHE_DIR overrides)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # Orbax (through absl's logger) and JAX log every file and compilation at INFO: keep those off the console,
        # not the run's own INFO lines (the plan, which formulation 'auto' became, resumes).
        logging.set_verbosity(logging.INFO)
        for noisy in ("absl", "jax", "orbax"):
            std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
    import cellssl_jax.platform  # noqa: F401  XLA flags measured for this project; must precede the JAX backend
    from cellssl_jax.parallel import enable_compilation_cache, initialize_distributed

    initialize_distributed()  # before anything touches a device
    enable_compilation_cache(_XLA_CACHE.value)
    from cellssl_jax.training.loop import NonFiniteError, train_and_evaluate

    try:
        summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except NonFiniteError as err:
        logging.error("training stopped: %s", err)
        sys.exit(3)
    logging.info("done: %s", {k: v for k, v in summary.items() if k != "plan"})
    # images/s is measured after the first step of a run (which compiles): absent for a one-step run or resume
    speed = f"{summary['images_per_s']:.1f} images/s" if "images_per_s" in summary else "images/s not measured"
    loss = f"final loss {summary['final_loss']:.5f}" if "final_loss" in summary else "no step trained"
    print(f"trained steps {summary['start_step']}→{summary['end_step']} in {summary['wall_s']:.1f} s; {loss}; "
          f"{speed}; checkpoint step {summary['last_checkpoint']}")


if __name__ == "__main__":
    app.run(main)
