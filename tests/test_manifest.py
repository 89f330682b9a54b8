"""Manifest reading and validation, and the authors' file layout (data_pipelines.manifest, .original_layout)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_pipelines.manifest import ManifestError, load_manifest, validate, write_manifest
from data_pipelines.original_layout import example_filename, parse_filename, read_original_layout


def _png(path: Path, value: int = 0, size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def _row(path: str, well: str, *, plate="P1", site=1, drug="DMSO", dose=367.0, time=0.0, **extra) -> dict:
    return {"path": path, "Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site,
            "Metadata_CellLine": "ACHN", "Metadata_Drug": drug, "Metadata_Concentration_uM": dose,
            "Metadata_Time_h": time, **extra}


# ------------------------------------------------------------------------------------------------ good manifests
def test_load_normalises_resolves_and_keeps_extras(tmp_path):
    for i in range(3):
        _png(tmp_path / "img" / f"{i}.png", i)
    rows = [
        _row("img/0.png", "B7", mask_path="masks/0.png", Metadata_Frame=0, Metadata_Effect="none"),
        _row("img/1.png", "b07", time=-2.5, mask_path="masks/1.png", Metadata_Frame=1, Metadata_Effect="none"),
        _row(str(tmp_path / "img" / "2.png"), "p024", drug="None", dose=0.11, time=4, mask_path="",
             Metadata_Frame=2, Metadata_Effect="cytotoxic"),
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)

    m = load_manifest(tmp_path / "manifest.csv", channels=["phase"])

    f = m.frame
    assert m.channels == ("phase",) and m.channel_columns == ("path",) and m.single_file
    assert m.source == (tmp_path / "manifest.csv").resolve()
    assert list(f["Metadata_Well"]) == ["B07", "B07", "P24"]
    assert list(f["path"]) == [str(tmp_path / "img" / f"{i}.png") for i in range(3)]
    assert f.at[0, "mask_path"] == str(tmp_path / "masks" / "0.png")  # relative to the manifest, not checked
    assert pd.isna(f.at[2, "mask_path"])
    assert f["Metadata_Site"].dtype == np.int64 and f["Metadata_Time_h"].dtype == np.float64
    assert list(f["Metadata_Time_h"]) == [0.0, -2.5, 4.0]
    assert f.at[2, "Metadata_Drug"] == "None"  # a drug name, not a missing value
    assert list(f["Metadata_Frame"]) == [0, 1, 2] and list(f["Metadata_Effect"]) == ["none", "none", "cytotoxic"]
    assert m.image_files(1) == (str(tmp_path / "img" / "1.png"),)


def test_write_then_load_round_trips_csv_and_parquet(tmp_path):
    for i in range(2):
        _png(tmp_path / "data" / "img" / f"{i}.png", i)
    table = pd.DataFrame([_row(f"img/{i}.png", f"A{i + 1}", Metadata_Replicate=i) for i in range(2)])
    original = validate(table, base_dir=tmp_path / "data", channels=["phase"])
    for name in ("copy.csv", "copy.parquet"):
        out = write_manifest(original, tmp_path / "data" / name, relative_paths=True)
        if name.endswith(".csv"):
            assert "img/0.png" in out.read_text()  # written relative to the manifest
        again = load_manifest(out, channels=["phase"])
        pd.testing.assert_frame_equal(again.frame, original.frame)


def test_channel_columns_keep_order_and_can_be_selected(tmp_path):
    rows = []
    for i in range(2):
        files = {f"path_{ch}": str(_png(tmp_path / f"{ch}_{i}.png", i)) for ch in ("DNA", "RNA", "AGP")}
        rows.append({**_row("", f"A{i + 1}"), **files})
    table = pd.DataFrame(rows).drop(columns="path")

    m = validate(table)
    assert m.channels == ("DNA", "RNA", "AGP") and not m.single_file
    assert m.image_files(1) == tuple(str(tmp_path / f"{ch}_1.png") for ch in ("DNA", "RNA", "AGP"))

    picked = validate(table, channels=["AGP", "DNA"])
    assert picked.channels == ("AGP", "DNA") and picked.channel_columns == ("path_AGP", "path_DNA")
    with pytest.raises(ManifestError, match=r"channels \['Mito'\] do not match the path columns"):
        validate(table, channels=["Mito"])


def test_channel_count_is_read_from_a_multipage_tiff(tmp_path):
    pages = [Image.fromarray(np.full((8, 8), k, np.uint8)) for k in range(4)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    m = validate(pd.DataFrame([_row("stack.tif", "A1")]), base_dir=tmp_path)
    assert m.channels == ("c0", "c1", "c2", "c3")


# -------------------------------------------------------------------------------------------------- bad manifests
def test_every_problem_is_reported_with_file_line_and_value(tmp_path):
    for i in range(8):
        _png(tmp_path / f"{i}.png", i)
    rows = [
        _row("0.png", "A1"),                                  # line 2: fine
        _row("1.png", "A2", dose="lots"),                     # line 3: non-numeric dose
        _row("2.png", "A3", time="t0"),                       # line 4: non-numeric time
        _row("3.png", "Q1"),                                  # line 5: row Q does not exist
        _row("4.png", "A25"),                                 # line 6: column 25 does not exist
        _row("0.png", "A6"),                                  # line 7: same file as line 2
        _row("5.png", "A1"),                                  # line 8: same plate/well/site/time as line 2
        _row("missing.png", "A7"),                            # line 9: file not found
        _row("6.png", "B1", plate="P2", drug="Docetaxel"),    # line 10: plate P2 has no DMSO
        _row("7.png", "XX"),                                  # line 11: not a well name
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "bad.csv", index=False)

    with pytest.raises(ManifestError) as caught:
        load_manifest(tmp_path / "bad.csv", channels=["phase"])
    err = caught.value
    text = str(err)
    assert str(tmp_path / "bad.csv") in text and "CSV lines" in text
    expected = [
        r"line 3: Metadata_Concentration_uM is not a finite number: 'lots'",
        r"line 4: Metadata_Time_h is not a finite number: 't0'",
        r"line 5: Metadata_Well 'Q1' is not a well of a 384-well plate",
        r"line 6: Metadata_Well 'A25' is not a well of a 384-well plate",
        r"line 7: duplicate image file .*0\.png .*already used by line 2",
        r"line 8: duplicate plate/well/site/time \('P1', 'A01', site 1, 0 h\) already at line 2",
        r"line 9: path file not found: .*missing\.png \(written 'missing\.png'\)",
        r"plate 'P2' \(first at line 10\) has no DMSO wells",
        r"line 11: Metadata_Well 'XX' is not a well name",
    ]
    for pattern in expected:
        assert re.search(pattern, text), f"{pattern!r} not in:\n{text}"
    assert err.total == len(expected) == len(err.problems)


def test_parquet_errors_name_data_rows(tmp_path):
    _png(tmp_path / "0.png")
    table = pd.DataFrame([_row("0.png", "A1"), _row("0.png", "A2", dose=np.nan)])
    table.to_parquet(tmp_path / "m.parquet")
    with pytest.raises(ManifestError) as caught:
        load_manifest(tmp_path / "m.parquet", channels=["phase"])
    text = str(caught.value)
    assert "m.parquet" in text and "1-based data rows" in text
    assert "row 2: duplicate image file" in text and "row 2: Metadata_Concentration_uM is empty" in text


def test_plate_format(tmp_path):
    _png(tmp_path / "0.png")
    _png(tmp_path / "1.png")
    table = pd.DataFrame([_row("0.png", "H12"), _row("1.png", "I1")])
    validate(table, base_dir=tmp_path, channels=["phase"])  # auto: the plate is a 384-well plate
    with pytest.raises(ManifestError, match=r"row 2: Metadata_Well 'I1' is not a well of a 96-well plate"):
        validate(table, base_dir=tmp_path, channels=["phase"], plate_format=96)


def test_missing_columns_and_long_reports_are_cut(tmp_path):
    with pytest.raises(ManifestError, match="missing required column.*Metadata_Drug"):
        validate(pd.DataFrame([_row("x.png", "A1")]).drop(columns="Metadata_Drug"), check_files=False,
                 channels=["phase"])
    rows = [_row(f"{i}.png", "A1", site=i, time="?") for i in range(30)]
    with pytest.raises(ManifestError) as caught:
        validate(pd.DataFrame(rows), check_files=False, channels=["phase"])
    assert caught.value.total == 30 and "... and 10 more" in str(caught.value)


# ------------------------------------------------------------------------------------------ the authors' layout
def test_parse_filename_of_the_authors_convention():
    got = parse_filename("/data/cropped/batch_1/ACHN_CL3_P2/ACHN_CL3_P2_C15_1_2019y08m30d_00h21m.jpg")
    assert got == {"cell_line": "ACHN", "clone": "CL3", "plate": "P2", "plate_id": "ACHN_CL3_P2", "well": "C15",
                   "site": 1, "timestamp": dt.datetime(2019, 8, 30, 0, 21), "drug": None,
                   "concentration_uM": None, "piece": None}
    cut = parse_filename("MDAMB231_CL1_P1_A3_MEDICA 16_c=0.11_1_2019y09m01d_14h05m_4.jpg")  # morpho-learner
    assert (cut["cell_line"], cut["well"], cut["drug"], cut["concentration_uM"], cut["piece"]) == \
        ("MDAMB231", "A03", "MEDICA 16", 0.11, 4)
    assert parse_filename(example_filename("HT29", "CL1", "P1", "P21", 1, dt.datetime(2019, 12, 31, 23, 59))) \
        ["timestamp"] == dt.datetime(2019, 12, 31, 23, 59)
    for bad in ("ACHN_CL3_P2_C15_2019y08m30d_00h21m.jpg", "ACHN_P2_C15_1_2019y08m30d_00h21m.jpg",
                "ACHN_CL3_P2_C15_1_2019y13m30d_00h21m.jpg", "ACHN_CL3_P2_C15_1_2019y08m30d_00h21m.bmp"):
        with pytest.raises(ValueError, match=re.escape(bad)):
            parse_filename(bad)


def _authors_plate(root: Path, plate="P2", start=dt.datetime(2019, 8, 30, 0, 21)):
    """Three wells (DMSO, Docetaxel, an empty well) imaged every 2 h, three times; metadata CSV for the plate."""
    folder = root / "images" / "batch_1" / f"ACHN_CL3_{plate}"
    for well in ("C15", "D1", "P24"):
        for k in range(3):
            _png(folder / example_filename("ACHN", "CL3", plate, well, 1, start + dt.timedelta(hours=2 * k)), k)
    meta = root / "metadata"
    meta.mkdir(exist_ok=True)
    pd.DataFrame({"Row": ["C", "D", "P"], "Column": [15, 1, 24], "Well": ["C15", "D1", "P24"],
                  "Drug": ["DMSO", "Docetaxel", ""], "Final_conc_uM": [367.0, 0.1, np.nan]}
                 ).to_csv(meta / f"ACHN_CL3_{plate}.csv", index=False)
    return folder


def test_read_original_layout_with_time_from_drug_addition_or_first_image(tmp_path):
    _authors_plate(tmp_path)
    addition = dt.datetime(2019, 8, 30, 2, 21)
    m = read_original_layout(tmp_path / "images", tmp_path / "metadata", drug_addition={"ACHN_CL3_P2": addition})
    f = m.frame
    assert len(f) == 6  # the well without a drug (P24) is dropped, as the authors' code does
    assert set(f["Metadata_Well"]) == {"C15", "D01"} and m.channels == ("phase",)
    assert set(f["Metadata_Plate"]) == {"ACHN_CL3_P2"} and set(f["Metadata_CellLine"]) == {"ACHN"}
    doc = f[f["Metadata_Well"] == "D01"].sort_values("Metadata_Time_h")
    assert list(doc["Metadata_Time_h"]) == [-2.0, 0.0, 2.0]
    assert set(doc["Metadata_Drug"]) == {"Docetaxel"} and set(doc["Metadata_Concentration_uM"]) == {0.1}
    assert doc["Metadata_Timestamp"].iloc[0] == "2019-08-30T00:21:00"

    offset = read_original_layout(tmp_path / "images", tmp_path / "metadata", first_image_time_h=-2.0)
    pd.testing.assert_series_equal(offset.frame["Metadata_Time_h"], f["Metadata_Time_h"])

    with pytest.raises(ManifestError, match="P24 has no drug"):
        read_original_layout(tmp_path / "images", tmp_path / "metadata", unmapped_wells="error")


def test_read_original_layout_aligns_the_global_metadata_like_the_authors(tmp_path):
    _authors_plate(tmp_path)
    start = dt.datetime(2019, 8, 30, 0, 20)  # the imager's clock and the file names differ by a minute
    rows = []
    for well in ("C15", "D1"):
        for k, conf in enumerate([0.1, np.nan, 0.2, 0.3]):  # one extra row without confluence: dropped
            rows.append({"cell": "ACHN", "Well": well, "source_plate": "P2", "Conf": conf,
                         "Time.gmt": str(start + dt.timedelta(hours=2 * k)), "Time": [-4.0, -3.0, -2.0, 0.0][k]})
    pd.DataFrame(rows).to_csv(tmp_path / "pheno-ml-metadata.csv", index=False)
    m = read_original_layout(tmp_path / "images", tmp_path / "metadata",
                             global_metadata=tmp_path / "pheno-ml-metadata.csv")
    assert sorted(m.frame.loc[m.frame["Metadata_Well"] == "C15", "Metadata_Time_h"]) == [-4.0, -2.0, 0.0]


def test_read_original_layout_reports_names_that_do_not_parse(tmp_path):
    folder = _authors_plate(tmp_path)
    _png(folder / "notes_scan.png")
    with pytest.raises(ManifestError, match="notes_scan.png: not an image name"):
        read_original_layout(tmp_path / "images", tmp_path / "metadata")
    m = read_original_layout(tmp_path / "images", tmp_path / "metadata", ignore_unmatched_names=True)
    assert len(m) == 6


def test_read_original_layout_keeps_the_pieces_of_cut_images(tmp_path):
    # morpho-learner's 64x64 cuts: same plate, well, site and time, one file per piece
    when = dt.datetime(2019, 9, 1, 14, 5)
    for well, drug, dose in (("A3", "Docetaxel", 0.11), ("B4", "DMSO", 367.0)):
        for piece in (1, 2):
            name = example_filename("ACHN", "CL1", "P1", well, 1, when, drug=drug, concentration_uM=dose)
            _png(tmp_path / "cut" / name.replace(".jpg", f"_{piece}.jpg"), piece)
    m = read_original_layout(tmp_path / "cut", None)
    assert sorted(zip(m.frame["Metadata_Well"], m.frame["Metadata_Piece"])) == \
        [("A03", 1), ("A03", 2), ("B04", 1), ("B04", 2)]
    # ... and a manifest with the same piece twice is still a duplicate
    rows = [_row("a.png", "B2", Metadata_Piece=1), _row("b.png", "B2", Metadata_Piece=1),
            _row("c.png", "B2", Metadata_Piece=np.nan), _row("d.png", "B2", Metadata_Piece=np.nan)]
    with pytest.raises(ManifestError) as caught:
        validate(pd.DataFrame(rows), check_files=False, channels=["phase"])
    assert caught.value.total == 2 and "row 2: duplicate plate/well/site/time/piece" in str(caught.value)
    assert "row 4: duplicate" in str(caught.value)


def test_channel_count_is_read_from_the_first_file_that_opens(tmp_path):
    (tmp_path / "0.png").write_bytes(b"")  # broken: left to the build's quarantine
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "1.png")
    rows = [_row("0.png", "B2"), _row("1.png", "B3")]
    assert validate(pd.DataFrame(rows), base_dir=tmp_path).channels == ("c0", "c1", "c2")
    (tmp_path / "1.png").write_bytes(b"not an image")
    with pytest.raises(ManifestError, match=r"row 1: cannot read .*0\.png to count its channels"):
        validate(pd.DataFrame(rows), base_dir=tmp_path)


def test_read_original_layout_problems_name_the_image_or_the_metadata_line(tmp_path):
    when = dt.datetime(2019, 8, 30, 0, 21)
    for batch in ("batch_1", "batch_2"):  # the same image in two folders
        _png(tmp_path / "images" / batch / example_filename("ACHN", "CL3", "P2", "C15", 1, when))
    meta = tmp_path / "metadata"
    meta.mkdir()
    pd.DataFrame({"Well": ["C15"], "Drug": ["DMSO"], "Final_conc_uM": [367.0]}).to_csv(meta / "ACHN_CL3_P2.csv",
                                                                                      index=False)
    with pytest.raises(ManifestError, match=r"row 2 \(\S*batch_2\S*\.jpg\): duplicate .* at row 1 \(\S*batch_1"):
        read_original_layout(tmp_path / "images", meta)
    pd.DataFrame({"Well": ["C15"], "Drug": ["DMSO"], "Final_conc_uM": [np.nan]}).to_csv(meta / "ACHN_CL3_P2.csv",
                                                                                       index=False)
    with pytest.raises(ManifestError, match=r"ACHN_CL3_P2\.csv line 2: Final_conc_uM of well C15 \(DMSO\) is empty"):
        read_original_layout(tmp_path / "images" / "batch_1", meta)


def test_errors_name_the_csv_line_after_blank_lines_and_multiline_fields(tmp_path):
    """pandas skips blank lines and reads a quoted field over two lines as one record: the reported line is still
    the one to open in an editor."""
    for i in range(4):
        _png(tmp_path / f"{i}.png", i)
    text = ("path,Metadata_Plate,Metadata_Well,Metadata_Site,Metadata_CellLine,Metadata_Drug,"
            "Metadata_Concentration_uM,Metadata_Time_h,Note\n"
            "0.png,P1,B02,1,ACHN,DMSO,0,0,ok\n"
            "\n"
            "1.png,P1,B03,1,ACHN,DMSO,0,0,\"two\nlines\"\n"
            "   \n"
            "2.png,P1,B04,1,ACHN,,0,0,ok\n"
            "3.png,P1,B05,1,ACHN,Cladribine,-1,0,ok\n")
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path / "m.csv")
    message = str(err.value)
    assert "line 7: Metadata_Drug is empty" in message, message
    assert re.search(r"line 8: Metadata_Concentration_uM .*-1", message), message
