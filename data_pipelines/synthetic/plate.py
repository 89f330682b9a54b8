"""From design to files: render wells (in memory or as a stream), write PNGs, manifest, ground truth and plate.json.

Output layout (a contract other modules code against):
    out_dir/images/{plate}/{well}/{plate}_{well}_s{site}_t{time_h:+06.1f}h.png   256×256 'L' PNG
    out_dir/masks/...same relative name...                                       0/255 'L' PNG
    out_dir/manifest.csv       one row per image, MANIFEST_COLUMNS
    out_dir/ground_truth.csv   one row per (cell_line, drug, concentration_uM), GROUND_TRUTH_COLUMNS
    out_dir/plate.json         preset, seed, every parameter, effect threshold, frame interval

Every well × site draws from its own generator keyed by (seed, plate, well, site), and every frame's camera noise
from a hash of that well's key and the frame's time, so wells can be rendered in any order or process, at any
cadence, with byte-identical frames.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .appearance import SIGNATURE_VISIBLE, drawing_rows, dust_rows
from .catalogue import CELL_LINES, DRUGS
from .design import IMAGE_SIZE, SIM_STEP_H, PlateConfig, WellSpec, ground_truth, make_config, plate_layout, rng_for
from .png import encode_gray_png
from .population import DEBRIS, DYING, MECHANISM_KINETICS, MITOTIC, ONSET_RAMP_H, STATE, Population
from .render import FrameRenderer

MANIFEST_COLUMNS = (
    "path",
    "mask_path",
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Site",
    "Metadata_CellLine",
    "Metadata_Drug",
    "Metadata_Concentration_uM",
    "Metadata_Time_h",
    "Metadata_Frame",
    "Metadata_Replicate",
    "Metadata_Effect",
)
GROUND_TRUTH_COLUMNS = (
    "cell_line",
    "drug",
    "concentration_uM",
    "effect",
    "mechanism",
    "signature",
    "ec50_uM",
    "hill",
    "onset_h",
    "response",
)


@dataclass
class WellFrames:
    """A rendered field of view over time, with the simulation's own counts for checks."""

    spec: WellSpec
    site: int
    times_h: np.ndarray  # (T,) float
    images: np.ndarray  # (T, 256, 256) uint8
    masks: np.ndarray  # (T, 256, 256) uint8, 255 where a cell carries the drug's signature
    n_live: np.ndarray  # (T,) attached (live or mitotic) cells
    n_dead: np.ndarray  # (T,) dead cells still in one piece
    n_debris: np.ndarray  # (T,) debris specks
    confluence: np.ndarray  # (T,) fraction of pixels under a live cell body


@dataclass
class Frame:
    index: int
    time_h: float
    image: np.ndarray
    mask: np.ndarray
    n_live: int
    n_dead: int
    n_debris: int
    confluence: float


def iter_well_frames(spec: WellSpec, config: PlateConfig, seed: int, site: int = 1) -> Iterator[Frame]:
    """Simulate one field of view and yield its frames in time order (one frame in memory at a time)."""
    rng = rng_for(seed, "well", spec.plate, spec.well, site)
    line = CELL_LINES[spec.condition.cell_line]
    renderer = FrameRenderer(rng, line.texture_sigma_px, dust_rows(rng))
    population = Population(line, spec.condition, rng, config.t_start_h)
    for index, t in enumerate(config.frame_times()):
        population.advance_to(float(t))
        rows = drawing_rows(population, spec.condition.signature)
        image, mask, confluence = renderer.render(rows, float(t))
        state = population.cells[:, STATE]
        yield Frame(
            index,
            float(t),
            image,
            mask,
            int((state <= MITOTIC).sum()),
            int((state == DYING).sum()),
            int((state == DEBRIS).sum()),
            confluence,
        )


def render_well(spec: WellSpec, config: PlateConfig, seed: int = 0, site: int = 1) -> WellFrames:
    """All frames of one well in memory (tests, notebooks)."""
    frames = list(iter_well_frames(spec, config, seed, site))
    return WellFrames(
        spec=spec,
        site=site,
        times_h=np.array([f.time_h for f in frames]),
        images=np.stack([f.image for f in frames]),
        masks=np.stack([f.mask for f in frames]),
        n_live=np.array([f.n_live for f in frames]),
        n_dead=np.array([f.n_dead for f in frames]),
        n_debris=np.array([f.n_debris for f in frames]),
        confluence=np.array([f.confluence for f in frames]),
    )


def image_relpath(spec: WellSpec, site: int, time_h: float, kind: str = "images") -> str:
    return f"{kind}/{spec.plate}/{spec.well}/{spec.plate}_{spec.well}_s{site}_t{time_h:+06.1f}h.png"


def manifest_row(spec: WellSpec, site: int, frame: Frame) -> dict[str, Any]:
    cond = spec.condition
    return {
        "path": image_relpath(spec, site, frame.time_h),
        "mask_path": image_relpath(spec, site, frame.time_h, "masks"),
        "Metadata_Plate": spec.plate,
        "Metadata_Well": spec.well,
        "Metadata_Site": site,
        "Metadata_CellLine": cond.cell_line,
        "Metadata_Drug": cond.drug,
        "Metadata_Concentration_uM": cond.concentration_uM,
        "Metadata_Time_h": frame.time_h,
        "Metadata_Frame": frame.index,
        "Metadata_Replicate": spec.replicate,
        "Metadata_Effect": cond.effect,
    }


def iter_well_rows(spec: WellSpec, config: PlateConfig, seed: int, site: int = 1):
    for frame in iter_well_frames(spec, config, seed, site):
        yield manifest_row(spec, site, frame), frame.image, frame.mask


def iter_plate(
    config: PlateConfig | str = "demo", seed: int = 0, **overrides: Any
) -> Iterator[tuple[dict[str, Any], np.ndarray, np.ndarray]]:
    """The whole experiment as a stream of (manifest row, image, mask), in manifest order, holding one frame at a
    time: the way to render the `paper` preset (~1M images) without keeping a plate in memory."""
    if isinstance(config, str):
        config = make_config(config, **overrides)
    elif overrides:
        raise ValueError("overrides apply to a preset name, not to a PlateConfig")
    for spec in plate_layout(config, seed):
        for site in range(1, config.sites + 1):
            yield from iter_well_rows(spec, config, seed, site)


def write_stream(
    stream: Iterable[tuple[dict[str, Any], np.ndarray, np.ndarray]], out_dir: Path
) -> Iterator[dict[str, Any]]:
    """Write each (row, image, mask) as PNGs under out_dir and pass the row on (for the manifest)."""
    out_dir = Path(out_dir)
    made: set[Path] = set()
    for row, image, mask in stream:
        for rel, pixels in ((row["path"], image), (row["mask_path"], mask)):
            path = out_dir / rel
            if path.parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            path.write_bytes(encode_gray_png(pixels, sparse=pixels is mask))
        yield row


def _format(value: Any) -> Any:
    return repr(value) if isinstance(value, float) else value


def _write_csv(path: Path, columns: tuple[str, ...], rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_format(row[c]) for c in columns])
            n += 1
    return n


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # 'inf' / 'nan': JSON has no such numbers
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def plate_description(config: PlateConfig, seed: int, n_images: int, n_wells: int) -> dict[str, Any]:
    return _json_safe(
        {
            "generator": "data_pipelines.synthetic_plate",
            "preset": config.preset,
            "seed": seed,
            "config": config.to_dict(),
            "effect_threshold": config.effect_threshold,
            "frame_interval_h": config.frame_interval_h,
            "frame_times_h": config.frame_times().tolist(),
            "simulation_step_h": SIM_STEP_H,
            "image_size": IMAGE_SIZE,
            "n_wells": n_wells,
            "n_images": n_images,
            "plates": sorted({p for line in config.cell_lines for p in config.plate_ids(line)}),
            "signature_visible_threshold": SIGNATURE_VISIBLE,
            "onset_ramp_h": ONSET_RAMP_H,
            "mechanism_kinetics": {k: asdict(v) for k, v in MECHANISM_KINETICS.items()},
            "cell_lines": {name: asdict(CELL_LINES[name]) for name in config.cell_lines},
            "drugs": {
                name: {**asdict(DRUGS[name]), "mechanism": DRUGS[name].mechanism} for name in config.drugs
            },
        }
    )


def _render_and_write_well(job: tuple[WellSpec, int], config: PlateConfig, seed: int, out_dir: Path) -> list[dict]:
    spec, site = job
    return list(write_stream(iter_well_rows(spec, config, seed, site), out_dir))


def render_plate(
    out_dir: str | os.PathLike,
    preset: str = "demo",
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Render an experiment to out_dir (layout in the module docstring) and return the manifest's path.

    workers > 1 renders wells in that many spawned processes; the files are byte-identical to workers=1.
    The manifest is written last-complete: rows go to manifest.csv.partial, renamed when every image exists; a
    manifest.csv already in out_dir is removed first, so an interrupted render leaves none.
    """
    config = make_config(preset, **overrides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = plate_layout(config, seed)
    jobs = [(spec, site) for spec in layout for site in range(1, config.sites + 1)]
    n_images = len(jobs) * len(config.frame_times())

    # A manifest of an earlier render goes first: until this one completes, the folder's ground truth, plate.json
    # and images are this render's, and an old manifest.csv beside them would describe another plate.
    (out_dir / "manifest.csv").unlink(missing_ok=True)
    _write_csv(out_dir / "ground_truth.csv", GROUND_TRUTH_COLUMNS, (c.as_row() for c in ground_truth(config, seed)))
    description = plate_description(config, seed, n_images, len(layout))
    (out_dir / "plate.json").write_text(json.dumps(description, indent=2, allow_nan=False) + "\n")

    work = partial(_render_and_write_well, config=config, seed=seed, out_dir=out_dir)
    partial_path = out_dir / "manifest.csv.partial"
    with open(partial_path, "w", newline="") as fh, tqdm(
        total=n_images, unit="img", desc=f"synthetic plate ({config.preset})", disable=not progress
    ) as bar:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)

        def consume(results: Iterable[list[dict]]) -> None:
            for rows in results:
                writer.writerows([[_format(r[c]) for c in MANIFEST_COLUMNS] for r in rows])
                bar.update(len(rows))

        if workers <= 1:
            consume(map(work, jobs))
        else:
            # spawn: safe even when the caller holds threads (JAX, tqdm monitors); children import the module anew.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                consume(pool.imap(work, jobs, chunksize=max(1, min(8, len(jobs) // (8 * workers)))))
    manifest = out_dir / "manifest.csv"
    partial_path.replace(manifest)
    return manifest
