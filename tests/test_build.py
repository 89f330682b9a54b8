"""Manifest -> TFDS/ArrayRecord build -> random-access source (data_pipelines.build, data_pipelines.source)."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_pipelines.build import BuildError, BuildOptions, build_dataset, encode_image, main
from data_pipelines.manifest import load_manifest
from data_pipelines.source import dataset_info, load_dataset_manifest, open_source

SIZE = 32


def _noise(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _meta(i: int) -> dict:
    """Row i of a small plate: wells A01.. with DMSO in the first two."""
    return {"Metadata_Plate": "P1", "Metadata_Well": f"A{i % 24 + 1}", "Metadata_Site": i // 24 + 1,
            "Metadata_CellLine": "ACHN", "Metadata_Drug": "DMSO" if i < 2 else "Docetaxel",
            "Metadata_Concentration_uM": 0.1, "Metadata_Time_h": 2.0, "Metadata_Replicate": i % 4}


def _write_manifest(folder: Path, rows: list[dict]) -> Path:
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _build(manifest_path: Path, out: Path, channels=None, **options):
    options.setdefault("image_size", SIZE)
    options.setdefault("workers", 2)
    manifest = load_manifest(manifest_path, channels=channels)
    return build_dataset(manifest, out, BuildOptions(**options), progress=False)


def _by_row_id(dataset_dir: Path) -> dict[int, np.ndarray]:
    source = open_source(dataset_dir)
    images = {}
    for i in range(len(source)):
        record = source[i]
        assert record["image"].dtype == np.uint8 and isinstance(record["row_id"], np.int64)
        assert record["image"].flags.writeable
        images[int(record["row_id"])] = record["image"]
    return images


# --------------------------------------------------------------------------------------------- round trips
def test_grayscale_png_and_jpeg_come_back_bit_for_bit(tmp_path):
    expected, rows = {}, []
    for i in range(10):
        pixels = _noise(i, (SIZE, SIZE))
        name = f"img/{i}.{'jpg' if i % 2 else 'png'}"
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / name)
        expected[i] = np.asarray(Image.open(tmp_path / name))  # JPEG: what the decoder gives, not `pixels`
        rows.append({"path": name, "mask_path": f"masks/{i}.png", **_meta(i)})
    manifest_path = _write_manifest(tmp_path, rows)

    report = _build(manifest_path, tmp_path / "ds", channels=["phase"], num_shards=3)

    assert (report.num_rows, report.num_examples, report.num_quarantined) == (10, 10, 0)
    images = _by_row_id(tmp_path / "ds")
    assert sorted(images) == list(range(10))
    for i, image in images.items():
        assert image.shape == (SIZE, SIZE, 1)
        np.testing.assert_array_equal(image[..., 0], expected[i])
    source = open_source(tmp_path / "ds")
    assert [int(source[i]["row_id"]) for i in range(10)] == list(range(10))  # manifest order is kept

    table = load_dataset_manifest(tmp_path / "ds")
    assert list(table["row_id"]) == list(range(10)) and table["quarantine_reason"].isna().all()
    assert list(table["Metadata_Replicate"]) == [i % 4 for i in range(10)]
    assert table.at[3, "mask_path"] == str(tmp_path / "masks" / "3.png")
    info = dataset_info(tmp_path / "ds")
    assert info["channels"] == ["phase"] and info["image_shape"] == [SIZE, SIZE, 1]
    assert info["counts"] == {"manifest_rows": 10, "examples": 10, "quarantined": 0, "plates": 1}
    assert info["source_manifest"] == str(manifest_path.resolve()) and info["build_time_utc"]
    shards = list((tmp_path / "ds" / info["tfds"]["data_dir"]).glob("*.array_record-*"))
    assert len(shards) == 3
    assert (tmp_path / "ds" / "quarantine.csv").read_text().strip() == "row_id,path,reason"


@pytest.mark.parametrize("names", [("DNA", "RNA", "AGP"), ("DNA", "ER", "RNA", "AGP", "Mito")])
def test_per_channel_files_are_stacked_in_channel_order(tmp_path, names):
    expected, rows = {}, []
    for i in range(6):
        planes = [_noise(100 * i + k, (SIZE, SIZE)) for k in range(len(names))]
        row = dict(_meta(i))
        for name, plane in zip(names, planes):
            Image.fromarray(plane).save(tmp_path / f"{i}_{name}.png")
            row[f"path_{name}"] = f"{i}_{name}.png"
        rows.append(row)
        expected[i] = np.stack(planes, axis=-1)
    _build(_write_manifest(tmp_path, rows), tmp_path / "ds")

    images = _by_row_id(tmp_path / "ds")
    for i, image in images.items():
        np.testing.assert_array_equal(image, expected[i])
    info = dataset_info(tmp_path / "ds")
    assert info["channels"] == list(names)
    assert info["image_encoding"] == "raw"  # the default, for any channel count


def _channel_plate(folder: Path, channels: int, count: int = 5) -> tuple[Path, dict[int, np.ndarray]]:
    """``count`` rows of per-channel noise PNGs, one file per channel; returns the manifest and the pixels."""
    expected, rows = {}, []
    for i in range(count):
        planes = [_noise(1000 * channels + 10 * i + k, (SIZE, SIZE)) for k in range(channels)]
        row = dict(_meta(i))
        for k, plane in enumerate(planes):
            Image.fromarray(plane).save(folder / f"{i}_c{k}.png")
            row[f"path_c{k}"] = f"{i}_c{k}.png"
        rows.append(row)
        expected[i] = np.stack(planes, axis=-1)
    return _write_manifest(folder, rows), expected


@pytest.mark.parametrize(("encoding", "channels"),  # PNG and 5 channels: test_png_is_refused_for_more_than_4_channels
                         [(e, c) for e in ("raw", "png", "zlib") for c in (1, 3, 5) if (e, c) != ("png", 5)])
def test_every_image_encoding_comes_back_bit_for_bit(tmp_path, encoding, channels):
    manifest_path, expected = _channel_plate(tmp_path, channels)
    _build(manifest_path, tmp_path / "ds", image_encoding=encoding, num_shards=2)

    info = dataset_info(tmp_path / "ds")
    assert info["image_encoding"] == info["options"]["image_encoding"] == encoding
    source = open_source(tmp_path / "ds")
    assert source.image_encoding == encoding and source.image_shape == (SIZE, SIZE, channels)
    images = _by_row_id(tmp_path / "ds")
    assert sorted(images) == sorted(expected)
    for i, image in images.items():
        assert image.shape == (SIZE, SIZE, channels)
        np.testing.assert_array_equal(image, expected[i])
    batch = source.__getitems__([3, 1])
    np.testing.assert_array_equal(batch[0]["image"], expected[3])
    np.testing.assert_array_equal(batch[1]["image"], expected[1])
    # the files stay ordinary TFDS datasets: TFDS's own decoding reads the same pixels
    import tensorflow_datasets as tfds

    tfds_source = tfds.builder_from_directory(str(tmp_path / "ds" / info["tfds"]["data_dir"])).as_data_source("train")
    example = tfds_source[2]
    assert int(example["row_id"]) == 2
    np.testing.assert_array_equal(np.asarray(example["image"]).reshape(SIZE, SIZE, channels), expected[2])


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_array_record_compresses_raw_records_with_zstd_unless_told_not_to(tmp_path, compression):
    """'raw' leaves compression to ArrayRecord: the shards must say which, and zstd must make them smaller."""
    from array_record.python.array_record_module import ArrayRecordReader

    # Shards grow in 64 KiB blocks, so tiny images would not show the compression. zstd has no pixel prediction:
    # what it gains on cell images comes from their narrow histogram (dark background), imitated here by 2 bits
    # of noise on a constant level.
    images, size = 16, 256
    rows, expected = [], {}
    for i in range(images):
        expected[i] = 20 + _noise(i, (size, size)) % 4
        Image.fromarray(expected[i]).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", **_meta(i)})
    _build(_write_manifest(tmp_path, rows), tmp_path / "ds", channels=["phase"], num_shards=1, image_size=size,
           record_compression=compression)
    info = dataset_info(tmp_path / "ds")
    assert info["options"]["record_compression"] == compression
    assert info["tfds"]["array_record_writer_options"].startswith("group_size:1,")
    (shard,) = (tmp_path / "ds" / info["tfds"]["data_dir"]).glob("*.array_record-*")
    reader = ArrayRecordReader(str(shard))
    try:
        written = reader.writer_options_string()
    finally:
        reader.close()
    assert "group_size:1," in written  # one record per chunk: what TFDS's random-access reader expects
    pixels = images * size * size
    if compression == "zstd":
        assert "zstd:3" in written and shard.stat().st_size < pixels / 2
    else:
        assert "uncompressed" in written and shard.stat().st_size > pixels
    for i, image in _by_row_id(tmp_path / "ds").items():
        np.testing.assert_array_equal(image[..., 0], expected[i])


def test_png_is_refused_for_more_than_4_channels(tmp_path):
    manifest_path, _ = _channel_plate(tmp_path, 5, count=2)
    with pytest.raises(BuildError, match=r"'png' holds at most 4 channels, the manifest has 5 .*use 'raw' or 'zlib'"):
        _build(manifest_path, tmp_path / "ds", image_encoding="png")
    assert not (tmp_path / "ds").exists()  # refused before any work
    with pytest.raises(ValueError, match="image_encoding must be one of raw, png, zlib"):
        BuildOptions(image_encoding="jpeg")
    with pytest.raises(ValueError, match="record_compression must be one of zstd, none"):
        BuildOptions(record_compression="brotli")


def test_a_dataset_built_before_raw_existed_still_opens(tmp_path):
    """Older builds wrote image_encoding 'png' or 'zlib' and had no image_encoding among their options."""
    manifest_path, expected = _channel_plate(tmp_path, 1, count=3)
    _build(manifest_path, tmp_path / "ds", image_encoding="png")
    info_path = tmp_path / "ds" / "dataset.json"
    info = json.loads(info_path.read_text())
    del info["options"]["image_encoding"]
    info_path.write_text(json.dumps(info))
    for i, image in _by_row_id(tmp_path / "ds").items():
        np.testing.assert_array_equal(image, expected[i])


def test_a_raw_record_of_the_wrong_size_names_the_example(tmp_path):
    manifest_path, _ = _channel_plate(tmp_path, 1, count=2)
    _build(manifest_path, tmp_path / "ds")
    info_path = tmp_path / "ds" / "dataset.json"
    info = json.loads(info_path.read_text())
    info["image_shape"] = [SIZE, SIZE, 2]
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=rf"example 1: {SIZE * SIZE} image bytes \(raw\), {2 * SIZE * SIZE} expected"):
        open_source(tmp_path / "ds")[1]
    info["image_encoding"] = "webp"
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"dataset\.json: image_encoding 'webp' is not one of raw, png, zlib"):
        open_source(tmp_path / "ds")


def test_multipage_tiff_pages_become_channels(tmp_path):
    expected, rows = {}, []
    for i in range(4):
        pages = [_noise(10 * i + k, (SIZE, SIZE)) for k in range(5)]
        images = [Image.fromarray(p) for p in pages]
        images[0].save(tmp_path / f"{i}.tif", save_all=True, append_images=images[1:])
        rows.append({"path": f"{i}.tif", **_meta(i)})
        expected[i] = np.stack(pages, axis=-1)
    names = ["DNA", "ER", "RNA", "AGP", "Mito"]
    _build(_write_manifest(tmp_path, rows), tmp_path / "ds", channels=names)

    for i, image in _by_row_id(tmp_path / "ds").items():
        np.testing.assert_array_equal(image, expected[i])
    assert open_source(tmp_path / "ds").channels == tuple(names)


def test_size_policies_resize_with_pil_bilinear_or_crop_the_centre(tmp_path):
    rgb = _noise(1, (40, 48, 3))
    Image.fromarray(rgb).save(tmp_path / "0.png")
    gray = _noise(2, (SIZE, SIZE))
    Image.fromarray(gray).save(tmp_path / "1.png")
    rows = [{"path": "0.png", **_meta(0)}, {"path": "1.png", **_meta(1)}]
    path = _write_manifest(tmp_path, rows)
    # the second image has one band where three are expected: quarantined, the first decides the channel count
    _build(path, tmp_path / "resized", max_bad_fraction=0.5)
    resized = _by_row_id(tmp_path / "resized")[0]
    per_band = [np.asarray(Image.fromarray(rgb[..., k]).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
                for k in range(3)]
    np.testing.assert_array_equal(resized, np.stack(per_band, axis=-1))

    _build(path, tmp_path / "cropped", size_mismatch="center_crop", max_bad_fraction=0.5)
    np.testing.assert_array_equal(_by_row_id(tmp_path / "cropped")[0], rgb[4:36, 8:40])


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("level", [0, 1])
def test_png_encoding_is_lossless_for_every_png_channel_count(channels, level):
    pixels = _noise(channels, (7, 5, channels))  # odd, non-square: catches a swapped width/height
    encoded = encode_image(pixels, level)
    with Image.open(io.BytesIO(encoded)) as image:
        assert image.format == "PNG" and image.mode == {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
        decoded = np.asarray(image)
    np.testing.assert_array_equal(decoded.reshape(pixels.shape), pixels)


def test_raw_and_zlib_encodings_hand_the_array_to_the_tensor_feature():
    pixels = _noise(5, (7, 5, 5))[:, ::-1]  # a non-contiguous view must come out contiguous
    for encoding in ("raw", "zlib"):
        encoded = encode_image(pixels, encoding=encoding)
        assert encoded.flags.c_contiguous
        np.testing.assert_array_equal(encoded, pixels)
    with pytest.raises(ValueError, match="PNG holds at most 4 channels, got 5"):
        encode_image(pixels, encoding="png")


# --------------------------------------------------------------------------------------------------- bad images
def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _plate_with_bad_images(folder: Path) -> tuple[Path, dict[int, str]]:
    """12 rows: 5 good grayscale PNGs and 7 bad files; returns the manifest and the expected reason per bad row."""
    files = {
        2: b"",                                                           # 0-byte
        3: _encoded(_noise(3, (64, 64)), "PNG")[:600],                   # truncated PNG
        4: _encoded(_noise(4, (64, 64)), "JPEG")[:900],                  # truncated JPEG
        5: _encoded((_noise(5, (SIZE, SIZE)).astype(np.uint16) * 257), "PNG"),  # 16-bit
        6: _encoded(_noise(6, (SIZE, SIZE, 3)), "PNG"),                  # 3 channels, 1 expected
        7: _encoded(_noise(7, (SIZE + 8, SIZE)), "PNG"),                 # wrong size, resizing off
        8: b"this is not an image at all",
    }
    reasons = {2: r"empty file \(0 bytes\)", 3: r"truncated or corrupt image", 4: r"truncated or corrupt image",
               5: r"16-bit image \(mode I;16\), 8-bit expected", 6: r"wrong channel count: 3 found",
               7: r"size 40x32 \(HxW\), 32x32 expected \(resizing is off\)", 8: r"not a readable image"}
    rows = []
    for i in range(12):
        data = files.get(i, _encoded(_noise(100 + i, (SIZE, SIZE)), "PNG"))
        suffix = ".jpg" if i == 4 else ".png"
        (folder / f"{i}{suffix}").write_bytes(data)
        rows.append({"path": f"{i}{suffix}", **_meta(i)})
    return _write_manifest(folder, rows), reasons


def test_bad_images_go_to_quarantine_with_their_reason(tmp_path):
    manifest_path, reasons = _plate_with_bad_images(tmp_path)
    report = _build(manifest_path, tmp_path / "ds", channels=["phase"], size_mismatch="reject",
                    max_bad_fraction=0.6)

    assert (report.num_examples, report.num_quarantined) == (12 - len(reasons), len(reasons))
    quarantine = pd.read_csv(tmp_path / "ds" / "quarantine.csv")
    assert list(quarantine["row_id"]) == sorted(reasons)
    for row_id, path, reason in quarantine.itertuples(index=False):
        assert pd.Series([reason]).str.contains(reasons[row_id]).all(), (row_id, reason)
        assert Path(path).name.startswith(f"{row_id}.")
    assert sorted(_by_row_id(tmp_path / "ds")) == [i for i in range(12) if i not in reasons]
    table = load_dataset_manifest(tmp_path / "ds")
    assert list(table.index[table["quarantine_reason"].notna()]) == sorted(reasons)


def test_16_bit_images_can_be_rescaled_instead(tmp_path):
    wide = np.array([[0, 1, 128, 129], [257, 32767, 65534, 65535]], dtype=np.uint16)
    wide = np.tile(wide, (SIZE // 2, SIZE // 4))
    Image.fromarray(wide).save(tmp_path / "0.png")
    Image.fromarray(_noise(1, (SIZE, SIZE))).save(tmp_path / "1.png")
    path = _write_manifest(tmp_path, [{"path": "0.png", **_meta(0)}, {"path": "1.png", **_meta(1)}])
    _build(path, tmp_path / "ds", channels=["phase"], high_bit_depth="rescale")
    image = _by_row_id(tmp_path / "ds")[0][..., 0]
    np.testing.assert_array_equal(image[:2, :4], [[0, 0, 0, 1], [1, 127, 255, 255]])  # round(v * 255 / 65535)


def test_the_build_fails_past_the_bad_fraction_and_leaves_no_dataset(tmp_path):
    manifest_path, _ = _plate_with_bad_images(tmp_path)
    with pytest.raises(BuildError, match=r"bad images .* at most 1 allowed .*quarantine\.csv"):
        _build(manifest_path, tmp_path / "ds", channels=["phase"], max_bad_fraction=0.1)
    assert not (tmp_path / "ds" / "dataset.json").exists() and not (tmp_path / "ds" / "tfds").exists()
    assert len(pd.read_csv(tmp_path / "ds" / "quarantine.csv")) == 2  # stopped at the second bad image
    with pytest.raises(FileNotFoundError, match="not a finished dataset build"):
        open_source(tmp_path / "ds")


# ------------------------------------------------------------------------------------ source, determinism, CLI
def test_source_pickles_small_and_reads_in_batches(tmp_path):
    rows = []
    for i in range(5):
        Image.fromarray(_noise(i, (SIZE, SIZE))).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", **_meta(i)})
    _build(_write_manifest(tmp_path, rows), tmp_path / "ds", channels=["phase"])
    source = open_source(tmp_path / "ds")
    first = source[0]
    blob = pickle.dumps(source)
    assert len(blob) < 1000  # the directory and split, not the open files
    copy = pickle.loads(blob)
    batch = copy.__getitems__([4, 0, -1])
    assert [int(r["row_id"]) for r in batch] == [4, 0, 4]
    np.testing.assert_array_equal(batch[1]["image"], first["image"])
    with pytest.raises(IndexError):
        copy[5]
    assert len(open_source(tmp_path / "ds", split="train[:2]")) == 2


def test_shards_are_identical_for_any_worker_count(tmp_path):
    rows = []
    for i in range(40):
        Image.fromarray(_noise(i, (SIZE + 4, SIZE))).save(tmp_path / f"{i}.png")  # resized: real work per image
        rows.append({"path": f"{i}.png", **_meta(i)})
    path = _write_manifest(tmp_path, rows)
    contents = []
    for workers in (0, 3):
        _build(path, tmp_path / f"w{workers}", channels=["phase"], workers=workers, num_shards=2)
        folder = tmp_path / f"w{workers}" / dataset_info(tmp_path / f"w{workers}")["tfds"]["data_dir"]
        contents.append({p.name: p.read_bytes() for p in sorted(folder.glob("*.array_record-*"))})
    assert len(contents[0]) == 2 and contents[0] == contents[1]


def test_cli_builds_and_refuses_to_overwrite(tmp_path, capsys):
    rows = []
    for i in range(3):
        Image.fromarray(_noise(i, (SIZE, SIZE))).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", **_meta(i)})
    path = _write_manifest(tmp_path, rows)
    args = ["--manifest", str(path), "--out", str(tmp_path / "ds"), "--image-size", str(SIZE),
            "--channels", "phase", "--workers", "1"]
    assert main(args) == 0
    assert "3 images written" in capsys.readouterr().out
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["counts"]["examples"] == 3 and info["image_encoding"] == "raw"
    assert main(args) == 1
    assert "already holds a build" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--image-encoding", "png", "--record-compression", "none"]) == 0
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["image_encoding"] == "png" and info["options"]["record_compression"] == "none"
    np.testing.assert_array_equal(open_source(tmp_path / "ds")[2]["image"][..., 0], _noise(2, (SIZE, SIZE)))

    pd.DataFrame([{**rows[0], "Metadata_Well": "Z99"}]).to_csv(tmp_path / "bad.csv", index=False)
    assert main(["--manifest", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "bad.csv" in err and "line 2: Metadata_Well 'Z99'" in err


def test_a_per_channel_file_with_several_bands_is_quarantined_by_column(tmp_path):
    rows = []
    for i in range(3):
        row = dict(_meta(i))
        for name in ("DNA", "RNA"):
            shape = (SIZE, SIZE, 3) if (i, name) == (2, "RNA") else (SIZE, SIZE)
            Image.fromarray(_noise(i, shape)).save(tmp_path / f"{i}_{name}.png")
            row[f"path_{name}"] = f"{i}_{name}.png"
        rows.append(row)
    _build(_write_manifest(tmp_path, rows), tmp_path / "ds", max_bad_fraction=0.5)
    quarantine = pd.read_csv(tmp_path / "ds" / "quarantine.csv")
    assert list(quarantine["row_id"]) == [2] and quarantine.at[0, "path"].endswith("2_RNA.png")
    assert quarantine.at[0, "reason"].startswith("path_RNA: wrong channel count: 3 bands or pages, 1 expected")


def _png_16_bit_rgb(path: Path, wide: np.ndarray) -> None:
    """A 16-bit RGB PNG (PIL cannot write one)."""
    import struct
    import zlib

    height, width, _ = wide.shape
    raw = b"".join(b"\x00" + wide[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_colour_is_refused_unless_rescaled(tmp_path):
    wide = np.random.default_rng(0).integers(0, 65536, (SIZE, SIZE, 3)).astype(np.uint16)
    _png_16_bit_rgb(tmp_path / "1.png", wide)
    Image.fromarray(_noise(0, (SIZE, SIZE, 3))).save(tmp_path / "0.png")
    path = _write_manifest(tmp_path, [{"path": "0.png", **_meta(0)}, {"path": "1.png", **_meta(1)}])
    report = _build(path, tmp_path / "ds", max_bad_fraction=0.5)  # PIL opens it as 8-bit RGB
    assert report.num_quarantined == 1
    assert "16-bit image (mode RGB, stored as RGB;16B)" in pd.read_csv(tmp_path / "ds" / "quarantine.csv").reason[0]
    _build(path, tmp_path / "ds2", high_bit_depth="rescale")
    np.testing.assert_array_equal(_by_row_id(tmp_path / "ds2")[1], wide >> 8)


def test_a_build_where_every_image_is_bad_fails_with_a_build_error(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"not an image")
    path = _write_manifest(tmp_path, [{"path": f"{i}.png", **_meta(i)} for i in range(3)])
    with pytest.raises(BuildError, match=r"all 3 images are bad.*line 2 \(row_id 0\) .*0\.png: not a readable"):
        _build(path, tmp_path / "ds", channels=["phase"], max_bad_fraction=1.0)
    assert len(pd.read_csv(tmp_path / "ds" / "quarantine.csv")) == 3 and not (tmp_path / "ds" / "tfds").exists()


def test_the_failed_build_names_the_manifest_and_its_line(tmp_path):
    manifest_path, _ = _plate_with_bad_images(tmp_path)
    with pytest.raises(BuildError, match=rf"of {manifest_path.resolve()}\)\..* e\.g\. line 4 \(row_id 2\) "):
        _build(manifest_path, tmp_path / "ds", channels=["phase"], max_bad_fraction=0.1)


def test_a_manifest_is_built_once_into_the_folder_commands_derive_for_it(tmp_path):
    """What `evaluate.py features --data MANIFEST` relies on: a build is used as is, a manifest is built beside the
    output once and reused on a rerun, and a stale or foreign build there is refused, not silently read."""
    from data_pipelines.build import as_built_dataset

    rows = []
    for i in range(3):
        Image.fromarray(_noise(i, (SIZE, SIZE))).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", **_meta(i)})
    manifest = _write_manifest(tmp_path, rows)
    built = as_built_dataset(manifest, tmp_path / "derived")
    assert built == (tmp_path / "derived").resolve() and len(open_source(built)) == 3
    stamp = (built / "dataset.json").read_text()
    assert as_built_dataset(manifest, tmp_path / "derived") == built  # reused: not built again
    assert (built / "dataset.json").read_text() == stamp
    assert as_built_dataset(built, tmp_path / "unused") == built and not (tmp_path / "unused").exists()

    later = (built / "dataset.json").stat().st_mtime + 5
    os.utime(manifest, (later, later))  # the manifest changed after the build
    with pytest.raises(BuildError, match="changed since"):
        as_built_dataset(manifest, tmp_path / "derived")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildError, match="no dataset.json"):
        as_built_dataset(tmp_path / "empty", tmp_path / "other")
    with pytest.raises(BuildError, match="no such manifest file"):
        as_built_dataset(tmp_path / "moved.csv", tmp_path / "other")
    (tmp_path / "half").mkdir()  # what an interrupted build leaves: outputs but no dataset.json
    (tmp_path / "half" / "quarantine.csv").write_text("row_id,path,reason\n")
    assert len(open_source(as_built_dataset(manifest, tmp_path / "half"))) == 3
