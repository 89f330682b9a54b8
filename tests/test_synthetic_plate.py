"""The synthetic plate: design, planted truth, files, determinism, and the biology seen in the pixels."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.ndimage import uniform_filter

from data_pipelines.synthetic_plate import (
    CONTROLS,
    DRUGS,
    GROUND_TRUTH_COLUMNS,
    MANIFEST_COLUMNS,
    SIGNATURES,
    ground_truth,
    iter_plate,
    make_config,
    plate_layout,
    render_plate,
    render_well,
)
from data_pipelines.synthetic.png import encode_gray_png

# A plate small enough for a test: one line, one drug per active class plus a no-effect drug, 6 frames.
TINY = dict(
    cell_lines=["HT29"],
    drugs=["Cladribine", "Everolimus", "Metformin"],
    replicates=1,
    n_dmso=2,
    n_pbs=1,
    frame_interval_h=20.0,
)


def _well(layout, drug):
    """The first well of a drug at its top concentration."""
    wells = [s for s in layout if s.condition.drug == drug]
    conc = max(s.condition.concentration_uM for s in wells)
    return next(s for s in wells if s.condition.concentration_uM == conc)


def _digest(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def tiny_plate(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    render_plate(out, "demo", seed=0, progress=False, **TINY)
    return out


# -- design ----------------------------------------------------------------------------------------------------


def test_demo_preset_has_two_drugs_per_class_with_distinct_signatures_and_fits_its_budget():
    config = make_config("demo")
    mechanisms = [DRUGS[d].mechanism for d in config.drugs]
    for mech in ("cytotoxic", "cytostatic", "mixed", "no_effect"):
        assert mechanisms.count(mech) == 2, mech
        if mech != "no_effect":
            signatures = {DRUGS[d].signature for d in config.drugs if DRUGS[d].mechanism == mech}
            assert len(signatures) == 2 and signatures <= set(SIGNATURES)
    assert {DRUGS[d].signature for d in config.drugs} - {"none"} == set(SIGNATURES)
    layout = plate_layout(config, 0)
    n_images = len(layout) * len(config.frame_times()) * config.sites
    assert len(layout) == 2 * (8 * 5 * 4 + 6 + 2)
    assert 8_000 <= n_images <= 10_000
    assert config.frame_times()[0] < 0 and config.frame_times()[-1] == 96.0


def test_paper_preset_splits_31_drugs_over_two_full_384_well_plates_per_line():
    config = make_config("paper")
    assert len(config.cell_lines) == 21 and len(config.drugs) == 31 and config.frame_interval_h == 2.0
    layout = plate_layout(config, 0)
    by_plate: dict[str, list] = {}
    for spec in layout:
        by_plate.setdefault(spec.plate, []).append(spec)
    assert len(by_plate) == 42
    for plate, wells in by_plate.items():
        names = [s.well for s in wells]
        assert len(names) == len(set(names)) <= 384, plate
        assert all(re.fullmatch(r"[A-P](0[1-9]|1[0-9]|2[0-4])", w) for w in names)
        drugs = {s.condition.drug for s in wells}
        assert set(CONTROLS) <= drugs, plate
    for line in config.cell_lines:
        p1 = {s.condition.drug for s in by_plate[f"{line}_P1"]} - set(CONTROLS)
        p2 = {s.condition.drug for s in by_plate[f"{line}_P2"]} - set(CONTROLS)
        assert not p1 & p2 and len(p1 | p2) == 31
    n_images = len(layout) * len(config.frame_times())
    assert 0.9e6 < n_images < 1.1e6  # the paper's "~1M images"
    # ... which is why it comes as a stream: the first frames arrive without rendering the plate.
    (row, image, mask), _ = itertools.islice(iter_plate("paper", seed=0), 2)
    assert row["Metadata_Plate"] == "ACHN_P1" and row["Metadata_Time_h"] == -24.0 and row["Metadata_Frame"] == 0
    assert image.shape == mask.shape == (256, 256) and image.dtype == mask.dtype == np.uint8


def test_planted_effect_is_the_mechanism_exactly_where_the_hill_response_clears_the_threshold():
    for preset in ("demo", "paper"):
        config = make_config(preset)
        rows = ground_truth(config, seed=3)
        for row in rows:
            if row.drug in CONTROLS:
                assert row.effect == row.mechanism == "control" and row.concentration_uM == 0.0
                continue
            expected = row.mechanism if row.response >= config.effect_threshold else "no_effect"
            assert row.effect == expected, row
            if math.isfinite(row.ec50_uM):
                hill = row.concentration_uM**row.hill / (row.concentration_uM**row.hill + row.ec50_uM**row.hill)
                assert row.response == pytest.approx(hill)
            # EC50s sit between grid points, so no condition is close to the threshold.
            assert not 0.31 < row.response < 0.69, row
        per_drug: dict[tuple[str, str], list] = {}
        for row in rows:
            per_drug.setdefault((row.cell_line, row.drug), []).append(row)
        for (line, drug), conds in per_drug.items():
            if drug in CONTROLS:
                continue
            conds.sort(key=lambda r: r.concentration_uM)
            ratios = np.diff(np.log10([r.concentration_uM for r in conds]))
            assert len(conds) == 5 and np.allclose(ratios, 1.0, atol=1e-4)
            assert conds[-1].effect == DRUGS[drug].mechanism  # the class at the top concentration
            assert all(a.response <= b.response for a, b in zip(conds, conds[1:]))
            if preset == "paper":  # the count of active concentrations follows the figure, ±1 for the line
                n_active = sum(r.effect != "no_effect" for r in conds)
                assert abs(n_active - DRUGS[drug].n_active) <= 1, (line, drug)


def test_bad_overrides_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="unknown override"):
        make_config("demo", frames=3)
    with pytest.raises(ValueError, match="unknown drug"):
        make_config("demo", drugs=["Aspirin"])
    with pytest.raises(ValueError, match="frame_interval_h"):
        make_config("demo", frame_interval_h=1.5)
    with pytest.raises(ValueError, match="preset"):
        make_config("huge")


# -- files -----------------------------------------------------------------------------------------------------


def test_manifest_ground_truth_and_plate_json_are_consistent(tiny_plate: Path):
    manifest = pd.read_csv(tiny_plate / "manifest.csv")
    truth = pd.read_csv(tiny_plate / "ground_truth.csv")
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert tuple(truth.columns) == GROUND_TRUTH_COLUMNS
    config = make_config("demo", **TINY)
    n_wells = 3 * 5 + 2 + 1
    assert len(manifest) == n_wells * len(config.frame_times())
    assert not truth.duplicated(["cell_line", "drug", "concentration_uM"]).any()
    merged = manifest.merge(
        truth,
        left_on=["Metadata_CellLine", "Metadata_Drug", "Metadata_Concentration_uM"],
        right_on=["cell_line", "drug", "concentration_uM"],
        how="left",
        validate="many_to_one",
    )
    assert merged["effect"].notna().all()
    assert (merged["effect"] == merged["Metadata_Effect"]).all()
    assert set(manifest["Metadata_Effect"]) <= {"cytotoxic", "cytostatic", "mixed", "no_effect", "control"}
    assert set(manifest["Metadata_Time_h"]) == set(config.frame_times())
    for _, row in manifest.iterrows():
        name = f"{row.Metadata_Plate}_{row.Metadata_Well}_s{row.Metadata_Site}_t{row.Metadata_Time_h:+06.1f}h.png"
        assert row.path == f"images/{row.Metadata_Plate}/{row.Metadata_Well}/{name}"
        assert row.mask_path == f"masks/{row.Metadata_Plate}/{row.Metadata_Well}/{name}"
        assert row.Metadata_Frame == list(config.frame_times()).index(row.Metadata_Time_h)
    frames = manifest.groupby(["Metadata_Plate", "Metadata_Well"])["Metadata_Frame"].apply(list)
    assert all(f == list(range(len(config.frame_times()))) for f in frames)  # time order within each well
    replicates = manifest.groupby(["Metadata_Drug", "Metadata_Concentration_uM"])["Metadata_Replicate"].max()
    assert replicates["DMSO", 0.0] == 2 and replicates["PBS", 0.0] == 1
    for rel in manifest["path"].iloc[::7].tolist() + manifest["mask_path"].iloc[::7].tolist():
        with Image.open(tiny_plate / rel) as img:
            assert img.mode == "L" and img.size == (256, 256)
            if rel.startswith("masks/"):
                assert set(np.unique(np.asarray(img))) <= {0, 255}
    description = json.loads((tiny_plate / "plate.json").read_text())
    assert description["preset"] == "demo" and description["seed"] == 0
    assert description["effect_threshold"] == 0.5 and description["frame_interval_h"] == 20.0
    assert description["n_images"] == len(manifest)
    assert not (tiny_plate / "manifest.csv.partial").exists()


def test_same_seed_same_bytes_and_another_seed_other_images(tiny_plate: Path, tmp_path: Path):
    again = render_plate(tmp_path / "again", "demo", seed=0, progress=False, **TINY).parent
    assert _digest(again) == _digest(tiny_plate)
    config = make_config("demo", **TINY)
    for spec in plate_layout(config, 0)[:3]:
        first, other = render_well(spec, config, seed=0), render_well(spec, config, seed=1)
        assert all(not np.array_equal(a, b) for a, b in zip(first.images, other.images))


def test_an_interrupted_render_into_an_old_plate_folder_leaves_no_manifest_of_the_old_plate(tmp_path, monkeypatch):
    """Rendering seed 1 over a seed-0 folder and stopping half-way used to leave the seed-0 manifest.csv beside the
    seed-1 ground_truth.csv and plate.json (rows whose Metadata_Effect the ground truth contradicts)."""
    import data_pipelines.synthetic.plate as plate_module

    out = tmp_path / "plate"
    render_plate(out, "demo", seed=0, progress=False, **TINY)
    real, calls = plate_module._render_and_write_well, []

    def interrupted(job, **kwargs):
        calls.append(job)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return real(job, **kwargs)

    monkeypatch.setattr(plate_module, "_render_and_write_well", interrupted)
    with pytest.raises(KeyboardInterrupt):
        render_plate(out, "demo", seed=1, progress=False, **TINY)
    assert json.loads((out / "plate.json").read_text())["seed"] == 1
    assert not (out / "manifest.csv").exists()


def test_stream_yields_what_the_writer_wrote(tiny_plate: Path):
    stream = iter_plate("demo", seed=0, **TINY)
    for _ in range(8):
        row, image, mask = next(stream)
        assert np.array_equal(np.asarray(Image.open(tiny_plate / row["path"])), image)
        assert np.array_equal(np.asarray(Image.open(tiny_plate / row["mask_path"])), mask)
    with open(tiny_plate / "manifest.csv") as fh:
        first = next(csv.DictReader(fh))
    row, _, _ = next(iter_plate("demo", seed=0, **TINY))
    assert first["path"] == row["path"] and float(first["Metadata_Time_h"]) == row["Metadata_Time_h"]


def test_png_encoder_round_trips_through_pil():
    rng = np.random.default_rng(0)
    noisy, empty = rng.integers(0, 256, (37, 53), dtype=np.uint8), np.zeros((64, 64), np.uint8)
    for pixels, sparse in ((noisy, False), (empty, True)):
        pixels[5:9, 7:30] = 255
        decoded = Image.open(io.BytesIO(encode_gray_png(pixels, sparse)))
        assert decoded.mode == "L" and np.array_equal(np.asarray(decoded), pixels)
    with pytest.raises(ValueError):
        encode_gray_png(np.zeros((4, 4, 3), np.uint8))


@pytest.mark.slow
def test_parallel_workers_write_the_same_bytes(tiny_plate: Path, tmp_path: Path):
    parallel = render_plate(tmp_path / "par", "demo", seed=0, workers=2, progress=False, **TINY).parent
    assert _digest(parallel) == _digest(tiny_plate)


# -- render kernels against their plain formulation --------------------------------------------------------------


def _reference_paint(params, texture, vacuoles, size=256):
    """The painting model written plainly (pure Python, per pixel of a bounding square, cos/sin basis recomputed
    per cell): what render._paint_cells must reproduce bit for bit, whatever its runs, passes and precomputations."""
    n_angles = 64
    accum = np.zeros((size, size), np.float32)
    mask = np.zeros((size, size), np.uint8)
    cover = np.zeros((size, size), np.uint8)
    tile = texture.shape[0]
    p = params.astype(np.float64)  # float32 values, computed in float64 as the kernel does ...
    f32 = np.float32  # ... except products of two float32 values, which Numba keeps in float32
    for c in range(len(p)):
        (cx, cy, a, b, ca, sa), harm = p[c, 0:6], p[c, 6:14]
        body, tex_amp, tx, ty, rim, rim_w, halo, halo_w, nu, nv, nr, nuc_amp, vac_amp, in_mask, in_cover = p[c, 14:29]
        table, outline = [], []
        for k in range(n_angles + 1):
            d = 4.0 * k / n_angles
            x, y = ((1.0 - d, d) if d < 1.0 else (1.0 - d, 2.0 - d) if d < 2.0 else (d - 3.0, 2.0 - d) if d < 3.0
                    else (d - 3.0, d - 4.0))
            norm = math.sqrt(x * x + y * y)
            c1, s1 = x / norm, y / norm
            c2, s2 = c1 * c1 - s1 * s1, 2.0 * c1 * s1
            c3, s3 = c1 * (4.0 * c1 * c1 - 3.0), s1 * (3.0 - 4.0 * s1 * s1)
            c5, s5 = c2 * c3 - s2 * s3, s2 * c3 + c2 * s3
            c6, s6 = 2.0 * c3 * c3 - 1.0, 2.0 * s3 * c3
            f = 1.0
            for h, basis in zip(harm, (c2, s2, c3, s3, c5, s5, c6, s6)):
                f = f + h * basis
            outline.append(max(f, 0.35))
            table.append(1.0 / (outline[-1] * outline[-1]))
        f_lo, f_hi = min(outline), max(outline)
        rim_s, halo_s = (1.0 - rim_w) ** 2, (1.0 + halo_w) ** 2
        core2 = f_lo * f_lo * rim_s
        r_out2 = ((1.0 + halo_w) * f_hi) ** 2
        reach = int(math.ceil((1.0 + halo_w) * f_hi * max(a, b))) + 2
        for py in range(int(cy) - reach, int(cy) + reach + 1):
            for px in range(int(cx) - reach, int(cx) + reach + 1):
                dx, dy = px + 0.5 - cx, py + 0.5 - cy
                u, v = dx * ca + dy * sa, -dx * sa + dy * ca
                eu, ev = u * (1.0 / a), v * (1.0 / b)
                r2 = eu * eu + ev * ev
                if r2 >= r_out2:
                    continue
                s = 0.0
                if r2 >= core2:
                    t = abs(ev) / (abs(eu) + abs(ev) + 1e-12)
                    d = (t if ev >= 0.0 else 4.0 - t) if eu >= 0.0 else (2.0 - t if ev >= 0.0 else 2.0 + t)
                    pos = d * (n_angles / 4.0)
                    k = min(int(pos), n_angles - 1)
                    s = r2 * (table[k] + (pos - k) * (table[k + 1] - table[k]))
                    if s >= halo_s:
                        continue
                row, col = py % size, px % size
                if s < 1.0:
                    tr, tc = (py + int(ty)) % tile, (px + int(tx)) % tile
                    val = float(f32(body) + f32(tex_amp) * texture[tr, tc])
                    if s > rim_s:
                        e = (s - rim_s) * (1.0 / (1.0 - rim_s))
                        val -= rim * e * e
                    if nr > 0.0:
                        du, dv = u - nu, v - nv
                        q = 1.0 - (du * du + dv * dv) * (1.0 / float(f32(nr) * f32(nr)))
                        if q > 0.0:
                            val += nuc_amp * q * (1.0 + 2.5 * float(vacuoles[(tr + 97) % tile, (tc + 53) % tile]))
                    if vac_amp != 0.0:
                        val += float(f32(vac_amp) * vacuoles[tr, tc])
                    mask[row, col] = 255 if in_mask > 0.5 else mask[row, col]
                    cover[row, col] = 1 if in_cover > 0.5 else cover[row, col]
                else:
                    q = 1.0 - (s - 1.0) * (1.0 / (halo_s - 1.0))
                    val = halo * q * q
                accum[row, col] = np.float32(float(accum[row, col]) + val)
    return accum, mask, cover


def _random_cells(rng, n):
    """Drawing rows over the whole parameter range, some across the frame's edges (the torus wraps)."""
    from data_pipelines.synthetic import appearance as ap

    rows = np.zeros((n, ap.N_PARAMS), np.float32)
    rows[:, ap.D_CX] = rng.uniform(-4, 260, n)
    rows[:, ap.D_CY] = rng.uniform(-4, 260, n)
    radius = rng.uniform(2.0, 22.0, n)
    aspect = rng.uniform(1.0, 3.5, n)
    rows[:, ap.D_A], rows[:, ap.D_B] = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
    angle = rng.uniform(0, math.pi, n)
    rows[:, ap.D_COS], rows[:, ap.D_SIN] = np.cos(angle), np.sin(angle)
    rows[:, ap.D_HARM : ap.D_HARM + 8] = rng.normal(0, 0.12, (n, 8))
    rows[:, ap.D_BODY] = rng.uniform(-20, 5, n)
    rows[:, ap.D_TEX_AMP] = rng.uniform(0, 12, n)
    rows[:, ap.D_TEX_X], rows[:, ap.D_TEX_Y] = rng.integers(0, 256, n), rng.integers(0, 256, n)
    rows[:, ap.D_RIM], rows[:, ap.D_RIM_W] = rng.uniform(0, 40, n), rng.uniform(0.08, 0.45, n)
    rows[:, ap.D_HALO], rows[:, ap.D_HALO_W] = rng.uniform(0, 40, n), 2.4 / np.maximum(radius, 0.5)
    rows[:, ap.D_NUC_U], rows[:, ap.D_NUC_V] = rng.uniform(-0.25, 0.25, (2, n)) * rows[:, [ap.D_A, ap.D_B]].T
    rows[:, ap.D_NUC_R] = np.where(rng.random(n) < 0.8, 0.45 * np.minimum(rows[:, ap.D_A], rows[:, ap.D_B]), 0.0)
    rows[:, ap.D_NUC_AMP] = -16.0
    rows[:, ap.D_VAC_AMP] = np.where(rng.random(n) < 0.4, rng.uniform(-40, 80, n), 0.0)
    rows[:, ap.D_MASK] = rng.random(n) < 0.5
    rows[:, ap.D_COVER] = rng.random(n) < 0.7
    return rows


def test_cell_painter_equals_its_plain_formulation_bit_for_bit():
    from data_pipelines.synthetic import render

    rng = np.random.default_rng(7)
    params = _random_cells(rng, 40)
    texture, vacuoles = render.texture_tile(1.5), render.vacuole_tile()
    accum = np.zeros((256, 256), np.float32)
    mask, cover = np.zeros((256, 256), np.uint8), np.zeros((256, 256), np.uint8)
    render._paint_cells(params, render.outline_basis(), texture, vacuoles, accum, mask, cover)
    ref_accum, ref_mask, ref_cover = _reference_paint(params, texture, vacuoles)
    assert np.count_nonzero(ref_accum) > 10_000 and ref_mask.any() and ref_cover.any()  # the test draws something
    assert np.array_equal(accum.view(np.uint32), ref_accum.view(np.uint32))
    assert np.array_equal(mask, ref_mask) and np.array_equal(cover, ref_cover)


def test_exposure_and_sharpening_equal_their_numpy_formulation_bit_for_bit():
    from data_pipelines.synthetic import render

    rng = np.random.default_rng(3)
    noise = render.noise_tile()
    pad = np.empty((258, 258), np.float32)
    for oy, ox, level in ((0, 0, 30.0), (300, 500, 30.0), (511, 255, 30.0), (17, 3, 400.0)):  # incl. clipping
        accum = (rng.normal(0, level, (256, 256)) * (rng.random((256, 256)) < 0.7)).astype(np.float32)
        illumination = render.illumination_field(rng)
        background, gain, amp = float(rng.uniform(118, 132)), 1.0 + 0.01 * rng.standard_normal(), 1.7
        image = np.empty((256, 256), np.uint8)
        render._expose(accum, illumination, background, gain, noise, amp, oy, ox, pad, image)
        shifted = np.roll(noise, (-oy, -ox), axis=(0, 1))[:256, :256].astype(np.float64)
        frame = ((background + accum.astype(np.float64)) * illumination * gain + amp * shifted).astype(np.float32)
        padded = np.pad(frame, 1, mode="edge")
        cols = padded[:-2] + padded[1:-1] + padded[2:]  # float32 sums, in this order
        box = cols[:, :-2] + cols[:, 1:-1] + cols[:, 2:]
        sharp = np.floor((34.0 * frame.astype(np.float64) - 2.0 * box.astype(np.float64)) / 16.0 + 0.5)
        assert np.array_equal(image, np.clip(sharp, 0, 255).astype(np.uint8))


# -- wells -----------------------------------------------------------------------------------------------------


def test_wells_render_identically_in_any_order_and_at_any_cadence():
    config = make_config("demo", **TINY)
    layout = plate_layout(config, 0)
    picked = [_well(layout, "Cladribine"), _well(layout, "DMSO"), _well(layout, "Everolimus")]
    forward = [render_well(s, config, 0) for s in picked]
    backward = [render_well(s, config, 0) for s in reversed(picked)][::-1]
    for a, b in zip(forward, backward):
        assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(forward[0].images, forward[1].images)
    # Halving the frame interval adds frames but leaves the shared ones untouched (the simulation clock is fixed).
    dense = make_config("demo", **{**TINY, "frame_interval_h": 10.0})
    dense_frames = render_well(_well(plate_layout(dense, 0), "Cladribine"), dense, 0)
    assert np.array_equal(dense_frames.images[::2], forward[0].images)
    assert np.array_equal(dense_frames.masks[::2], forward[0].masks)
    assert np.array_equal(dense_frames.images[0], forward[0].images[0])
    assert forward[0].images.dtype == np.uint8 and forward[0].images.shape[1:] == (256, 256)


def test_masks_mark_signatures_only_where_an_effect_is_planted():
    config = make_config("demo", cell_lines=["ACHN"], drugs=list(make_config("demo").drugs), replicates=1,
                         n_dmso=1, n_pbs=1, frame_interval_h=20.0)
    layout = plate_layout(config, 0)
    seen_strong = 0
    for spec in layout:
        cond = spec.condition
        # Lowest and highest concentration of each drug, and the controls.
        siblings = [s.condition.concentration_uM for s in layout if s.condition.drug == cond.drug]
        if cond.concentration_uM not in (min(siblings), max(siblings)):
            continue
        frames = render_well(spec, config, 0)
        marked = (frames.masks > 0).mean(axis=(1, 2))
        if cond.effect in ("control", "no_effect"):
            assert marked.max() == 0.0, cond
        else:
            assert cond.response >= 0.69
            assert marked[frames.times_h < 0].max() == 0.0, cond  # nothing before the drug
            assert marked.max() > 0.02, cond
            seen_strong += 1
    assert seen_strong >= 6  # every active drug of the demo acts at its top concentration


# -- biology in the numbers and in the pixels ----------------------------------------------------------------


def _image_confluence(images: np.ndarray) -> np.ndarray:
    """Fraction of textured pixels (local 7×7 std above the flat background's): an independent confluence read-out."""
    x = images.astype(np.float32)
    mean = uniform_filter(x, size=(1, 7, 7))
    std = np.sqrt(np.maximum(uniform_filter(x * x, size=(1, 7, 7)) - mean * mean, 0.0))
    return (std > 9.0).mean(axis=(1, 2))


@pytest.fixture(scope="module")
def time_courses():
    config = make_config("demo", cell_lines=["HT29"], replicates=1, n_dmso=1, n_pbs=1, frame_interval_h=8.0)
    layout = plate_layout(config, 0)
    return {d: render_well(_well(layout, d), config, 0) for d in
            ("DMSO", "Cladribine", "Topotecan", "Everolimus", "Etomoxir", "Paclitaxel", "Metformin")}


def test_dmso_confluence_grows_then_saturates(time_courses):
    dmso = time_courses["DMSO"]
    conf = dmso.confluence
    assert conf[0] < 0.35 and conf[-1] > 0.8
    assert np.all(np.diff(conf) > -0.03)  # no collapse
    assert conf[-1] - conf[-3] < 0.05  # plateau over the last 16 h (contact inhibition)
    growth = np.diff(conf)
    assert growth[-3:].mean() < 0.5 * growth[len(growth) // 3 : 2 * len(growth) // 3].mean()
    image_conf = _image_confluence(dmso.images)
    assert np.corrcoef(image_conf, conf)[0, 1] > 0.95  # the pixels show the growth too


def test_cytotoxic_wells_end_emptier_than_dmso_and_cytostatic_wells_recover(time_courses):
    dmso = time_courses["DMSO"]
    for drug in ("Cladribine", "Topotecan"):
        tox = time_courses[drug]
        assert tox.n_live[-1] < 0.25 * dmso.n_live[-1], drug
        assert tox.confluence[-1] < 0.5 * dmso.confluence[-1], drug
        assert _image_confluence(tox.images[-1:])[0] < 0.6 * _image_confluence(dmso.images[-1:])[0], drug
        assert tox.n_dead.max() + tox.n_debris[-1] > 10, drug  # the cells died, they did not just vanish
    t = dmso.times_h
    mid = np.argmin(np.abs(t - 40.0))
    for drug in ("Everolimus", "Etomoxir"):
        stat = time_courses[drug]
        assert stat.n_live[mid] < 0.6 * dmso.n_live[mid], drug  # arrested while DMSO grows
        assert stat.n_live[-1] > 2.0 * stat.n_live[mid], drug  # ... then recovers
        assert stat.n_dead.max() <= dmso.n_dead.max() + 4, drug  # without killing beyond the basal rate
    mixed = time_courses["Paclitaxel"]
    assert mixed.n_live[-1] < 0.5 * dmso.n_live[-1]
    none = time_courses["Metformin"]
    assert abs(none.confluence[-1] - dmso.confluence[-1]) < 0.1


def _attached_area_course(line: str, condition, replicate: int, times: np.ndarray) -> np.ndarray:
    """Summed spread area of the attached cells / field area at each time, from the population alone (no pixels)."""
    from data_pipelines.synthetic.catalogue import CELL_LINES
    from data_pipelines.synthetic.design import rng_for
    from data_pipelines.synthetic.population import AREA0, MITOTIC, PHASE, STATE, Population

    pop = Population(CELL_LINES[line], condition, rng_for(replicate, "gap-test", line, condition.mechanism),
                     float(times[0]))
    out = []
    for t in times:
        pop.advance_to(float(t))
        c = pop.cells
        attached = c[:, STATE] <= MITOTIC
        out.append((c[attached, AREA0] * (1.0 + np.minimum(c[attached, PHASE], 1.0))).sum() / (256.0 * 256.0))
    return np.array(out)


def _late_gain(curve: np.ndarray) -> float:
    """How much of its peak the curve still gains (+) or loses (-) over its last third: the temporal analysis's own
    shape read-out ('late_change'), unsmoothed."""
    from cellssl_jax.temporal.effects import shape_features

    return shape_features(curve, smooth=False).late_change


@pytest.mark.parametrize("line", ["ACHN", "HT29"])
def test_planted_gap_to_dmso_levels_off_for_mixed_widens_for_cytotoxic_narrows_for_cytostatic(line):
    """The gap to DMSO in attached area, population only, full response, 3 replicate fields: the mixed gap rises,
    then levels off inside the 96 h window (it neither keeps widening like the cytotoxic one nor falls back like the
    cytostatic one). Before the mixed kill phase ended after a hold, it widened to the end like cytotoxic."""
    from data_pipelines.synthetic.design import Condition

    times = np.arange(-4.0, 97.0, 4.0)

    def mean_area(mechanism: str, onset_h: float) -> np.ndarray:
        effect = "control" if mechanism == "control" else mechanism
        response = 0.0 if mechanism == "control" else 1.0
        cond = Condition(line, "X", 1.0, effect, mechanism, "none", 1.0, 2.0, onset_h, response)
        return np.mean([_attached_area_course(line, cond, r, times) for r in range(3)], axis=0)

    dmso = mean_area("control", math.nan)
    post = times > 0
    gaps = {m: (dmso - mean_area(m, onset))[post] for m, onset in
            (("mixed", 8.0), ("cytotoxic", 11.0), ("cytostatic", 5.0))}
    for mechanism, gap in gaps.items():
        assert gap.max() > 0.4, (mechanism, gap.max())  # every planted effect opens a clear gap
    mixed, tox, stat = gaps["mixed"], gaps["cytotoxic"], gaps["cytostatic"]
    assert _late_gain(tox) > 0.1 and tox[-1] > 0.95 * tox.max()  # widens to the end
    assert stat[-1] < 0.7 * stat.max()  # rises, then narrows
    # Mixed: rises (its peak is not at the start), then a plateau: over the last third it gains or loses at most a
    # tenth of its peak and ends near it.
    assert np.argmax(mixed) > len(mixed) // 3
    assert abs(_late_gain(mixed)) < 0.1, _late_gain(mixed)
    assert mixed[-1] > 0.85 * mixed.max()


@pytest.mark.slow
def test_distance_to_dmso_follows_the_papers_prototypes():
    """§5.4: cytotoxic rises to the end; cytostatic rises then falls; no effect stays low. Measured on pixels with
    a translation-invariant descriptor (intensity and local-contrast histograms) averaged over replicate wells."""
    config = make_config("demo", cell_lines=["ACHN"], drugs=["Topotecan", "Etomoxir", "Metformin"], replicates=3,
                         n_dmso=4, n_pbs=0, frame_interval_h=8.0)
    layout = plate_layout(config, 0)

    def descriptor(images):
        x = images.astype(np.float32)
        mean = uniform_filter(x, size=(1, 5, 5))
        std = np.sqrt(np.maximum(uniform_filter(x * x, size=(1, 5, 5)) - mean * mean, 0.0))
        h1 = [np.histogram(im, bins=16, range=(0, 256))[0] for im in x]
        h2 = [np.histogram(s, bins=16, range=(0, 64))[0] for s in std]
        return np.concatenate([h1, h2], axis=1) / x[0].size

    def mean_descriptor(drug):
        wells = [s for s in layout if s.condition.drug == drug]
        conc = max(s.condition.concentration_uM for s in wells)
        top = [s for s in wells if s.condition.concentration_uM == conc]
        return np.mean([descriptor(render_well(s, config, 0).images) for s in top], axis=0)

    control = mean_descriptor("DMSO")
    times = config.frame_times()
    post = times > 0
    tox, stat, none = (np.linalg.norm(mean_descriptor(d) - control, axis=1)[post]
                       for d in ("Topotecan", "Etomoxir", "Metformin"))
    third = len(tox) // 3
    assert tox[-third:].mean() > 1.5 * tox[:third].mean() and np.argmax(tox) >= len(tox) - third
    peak = int(np.argmax(stat))
    assert third <= peak < len(stat) - 2 and stat[-1] < 0.6 * stat[peak]
    assert none.max() < 0.5 * tox.max() and none.mean() < 0.5 * stat.max()
