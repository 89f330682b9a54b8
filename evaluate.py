"""Analyses and weight interop on checkpoints and feature files. Thin CLI: parse, call one library function.

  python evaluate.py features     --checkpoint runs/demo/train --data runs/demo/dataset --out runs/demo/features.parquet
  python evaluate.py temporal     --features runs/demo/features.parquet --out runs/demo/temporal \
                                  [--ground-truth runs/demo/plate/ground_truth.csv]
  python evaluate.py temporal     --distances distances.csv --out DIR
  python evaluate.py import-torch --weights ../shared/reference/convae_pheno_ml.torch --workdir runs/authors
  python evaluate.py export       --checkpoint runs/demo/train --out runs/demo/export/convae.pt   (or .safetensors)
  python evaluate.py lens         --lens runs/demo/lens --data runs/demo/dataset --out runs/demo/lens_eval \
                                  [--paper-protocol]
  python evaluate.py compare      --encoder ours=runs/demo/train --encoder authors=runs/demo/authors \
                                  --encoder init=random --data runs/demo/dataset --out runs/demo/compare
  python evaluate.py compare      --features ours=runs/demo/features_pooled.parquet --out DIR
  python evaluate.py report       --run runs/demo
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _features(a):
    from cellssl_jax.features import extract_from_checkpoint

    extract_from_checkpoint(a.checkpoint, a.data, a.out, mode=a.mode, batch_size=a.batch_size)


def _temporal(a):
    from cellssl_jax.temporal.pipeline import run_temporal

    summary = run_temporal(features=a.features, distances=a.distances, out_dir=a.out, metric=a.metric,
                           feature_scale=a.feature_scale, control_concentration_uM=a.control_concentration,
                           scale=a.scale,
                           method=a.method, k=a.k, window=a.window, paper_faithful=a.paper_faithful,
                           ground_truth=a.ground_truth, mapping=a.mapping, seed=a.seed)
    print(json.dumps(summary, indent=2, default=str))


def _import_torch(a):
    from cellssl_jax.interop import import_torch_checkpoint

    print(import_torch_checkpoint(a.weights, a.workdir))


def _export(a):
    from cellssl_jax.interop import check_export_parity, export_checkpoint

    for path in export_checkpoint(a.checkpoint, a.out):
        print(path)
        if a.check:
            print(json.dumps(check_export_parity(a.checkpoint, path), indent=2))


def _lens(a):
    from cellssl_jax.lens import evaluate_lens

    summary = evaluate_lens(a.lens, a.data, a.out, probe_epochs=a.probe_epochs, seeds=tuple(range(a.probe_seeds)),
                            paper_protocol=a.paper_protocol, paper_faithful=True if a.paper_faithful else None)
    keys = ("images", "joint_classifier", "best_probe", "comparison_test", "comparison_paper_protocol")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2, default=str))
    print(f"tables, figures and summary.json in {a.out}")


def _named(items: list[str], flag: str) -> dict[str, str]:
    named = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{flag} {item!r}: expected NAME=VALUE")
        if name in named:
            raise SystemExit(f"{flag}: the name {name!r} is given twice")
        named[name] = value
    return named


def _compare(a):
    from cellssl_jax.compare import compare_encoders, compare_feature_files, feature_file_mode

    if a.encoder:
        if not a.data:
            raise SystemExit("--encoder needs --data (the built dataset to extract features from)")
        summary = compare_encoders(_named(a.encoder, "--encoder"), a.data, a.out, modes=a.modes, seed=a.seed,
                                   paper_faithful=a.paper_faithful)
    else:
        files = {name: {feature_file_mode(path): path} for name, path in _named(a.features, "--features").items()}
        summary = compare_feature_files(files, a.out, seed=a.seed, paper_faithful=a.paper_faithful)
    print(_as_text(summary["table"]))
    print(f"tables, figures and summary.json in {a.out}")


def _as_text(rows: list[dict]) -> str:
    import pandas as pd

    return pd.DataFrame(rows).set_index(["encoder", "mode"]).T.to_string(float_format=lambda v: f"{v:.3f}")


def _report(a):
    from cellssl_jax.report import write_report

    print(write_report(a.run))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("features", help="encoder features of every image → Parquet")
    p.add_argument("--checkpoint", required=True, help="a training workdir, a checkpoint step dir, or an imported one")
    p.add_argument("--data", required=True, help="a built dataset dir (data_pipelines.build) or a manifest CSV/Parquet")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="latent", choices=["latent", "pooled"],
                   help="latent: flattened 4×32×32 (paper); pooled: per-channel mean/std of the encoder stages, "
                        "translation-invariant, the better input to `temporal` on the synthetic plate (README)")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(fn=_features)

    p = sub.add_parser("temporal", help="distance-to-control curves, DTW clustering, effect classes")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features")
    src.add_argument("--distances", help="CSV with cell_line, drug, concentration_uM, time_h, distance (+ plate)")
    p.add_argument("--out", required=True)
    p.add_argument("--metric", default="euclidean", choices=["euclidean", "cosine", "correlation", "braycurtis"])
    p.add_argument("--feature-scale", default="dmso", choices=["dmso", "none"],
                   help="dmso (default): each feature in units of its DMSO replicate spread on the plate, near-constant "
                        "features dropped (measured best on the synthetic plate with pooled features); none: raw "
                        "features, as the paper")
    p.add_argument("--control-concentration", type=float, default=None, metavar="UM",
                   help="the DMSO concentration (µM) of the control wells (the original's: 367); default: each "
                        "plate's most common, other DMSO wells left out with a warning")
    p.add_argument("--scale", default=None, choices=["noise", "plate", "cell_drug", "none"],
                   help="curve scaling (default: noise, units of the plate's DMSO-vs-DMSO noise); 'cell_drug' is the "
                        "paper's (cellssl_jax.temporal.distances.scale_series)")
    p.add_argument("--method", default="kmeans", choices=["kmeans", "kmedoids", "average_linkage"])
    p.add_argument("--k", type=int, default=None, help="number of clusters (default: chosen by DTW silhouette)")
    p.add_argument("--window", type=int, default=None, help="Sakoe–Chiba radius (default: unconstrained, as the paper)")
    p.add_argument("--paper-faithful", action="store_true", help="floor control-time matching, as the original")
    p.add_argument("--ground-truth", help="ground_truth.csv of a synthetic plate, to score the recovered effects")
    p.add_argument("--mapping", help="JSON/CSV cluster → effect overrides")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_temporal)

    p = sub.add_parser("import-torch", help="the authors' PyTorch ConvAE weights → an Orbax checkpoint")
    p.add_argument("--weights", required=True)
    p.add_argument("--workdir", required=True)
    p.set_defaults(fn=_import_torch)

    p = sub.add_parser("export", help="a checkpoint → PyTorch .pt state_dict and/or .safetensors (+ JSON config)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="FILE.pt, FILE.safetensors, or a stem for both")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the PyTorch parity check")
    p.set_defaults(fn=_export)

    p = sub.add_parser("lens", help="held-out top-1/top-3 with and without a trained lens; importance maps")
    p.add_argument("--lens", required=True, help="a lens training workdir (train.py --config configs/lens.py)")
    p.add_argument("--data", required=True, help="the built dataset the lens was trained on")
    p.add_argument("--out", required=True)
    p.add_argument("--probe-epochs", type=int, default=30, help="epochs of each fresh linear probe (authors: 30)")
    p.add_argument("--probe-seeds", type=int, default=1, help="seeds per grid point (more: a tighter comparison)")
    p.add_argument("--paper-protocol", action="store_true",
                   help="also the authors' figure: their probes (softmax twice, raw codes, batch-averaged metrics) and "
                        "training-split top-3 at the best training F1 (§6.4), reported beside the held-out numbers")
    p.add_argument("--paper-faithful", action="store_true",
                   help="run every probe the authors' way (default: as the lens was trained)")
    p.set_defaults(fn=_lens)

    p = sub.add_parser("compare", help="encoders × the authors' tasks: replicate similarity, drugs vs controls, "
                                       "clustering (the yardstick for ablations)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--encoder", action="append", metavar="NAME=CHECKPOINT",
                     help="a checkpoint folder (trained, imported or a lens run) or random[:SEED]; repeat per encoder")
    src.add_argument("--features", action="append", metavar="NAME=PARQUET",
                     help="a features file written by `evaluate.py features`; repeat per encoder")
    p.add_argument("--data", help="the built dataset (with --encoder)")
    p.add_argument("--out", required=True)
    p.add_argument("--modes", nargs="+", default=["pooled", "latent"], choices=["pooled", "latent"],
                   help="feature modes to extract and compare (with --encoder)")
    p.add_argument("--seed", type=int, default=0, help="well split, probe init and shuffles, embeddings")
    p.add_argument("--paper-faithful", action="store_true",
                   help="the authors' probe: softmax twice, raw features (their numbers are reported either way)")
    p.set_defaults(fn=_compare)

    p = sub.add_parser("report", help="one HTML report from a run folder")
    p.add_argument("--run", required=True)
    p.set_defaults(fn=_report)

    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from cellssl_jax import platform  # noqa: F401  (XLA flags before the backend starts)

    a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
