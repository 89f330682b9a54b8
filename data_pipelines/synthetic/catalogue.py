"""The cast of the synthetic plate: 21 cell lines and 31 drugs with the names of the paper's data set.

Names and the drug order come from the authors' `constants.py` (original_method.md §1.1). Everything else here is
invented for the simulation and only meant to be plausible:
- cell lines: size, outline, texture and motility are picked so that tissues look different (small round epithelial
  colon/breast lines, spindle-shaped mesenchymal lines, dendritic melanoma lines, large flat renal/lung lines);
  doubling times lie in the NCI-60 range (about 20-55 h) but are not quoted from any table;
- drugs: the effect class and the number of active concentrations follow the paper's last figure (§5.5, one unnamed
  cell line), the morphological signature and the top concentration are invented from the drug's textbook action.
"""

from __future__ import annotations

from dataclasses import dataclass

MECHANISMS = ("cytotoxic", "cytostatic", "mixed", "no_effect")
SIGNATURES = ("rounding", "enlargement", "elongation", "granularity", "fragmentation")
CONTROLS = ("DMSO", "PBS")


@dataclass(frozen=True)
class CellLine:
    """How one cell line looks and grows. Lengths are pixels of the 256×256 image, times hours."""

    name: str
    radius_px: float  # radius of a spread cell just after division
    aspect: float  # mean long/short axis ratio of a spread cell
    irregularity: float  # amplitude of the outline's low harmonics (0 = ellipse)
    texture_sigma_px: float  # grain size of the cytoplasm texture
    texture_amp: float  # grey levels of that texture
    body_level: float  # mean grey offset of a spread cell body against the background
    halo: float  # grey levels of the bright phase halo around the cell
    doubling_h: float  # cell-cycle length without contact inhibition
    motility_px_h: float  # typical speed of a spread cell

    def seeding_confluence(self) -> float:
        """Confluence at the first frame: slow lines are seeded denser so that every line's DMSO wells reach the
        plateau inside the 96 h window (as a lab would choose the seeding density)."""
        return float(min(0.45, max(0.1, 0.8 / 2.0 ** (48.0 / self.doubling_h))))


# name, radius, aspect, irregularity, texture sigma, texture amp, body level, halo, doubling h, motility
_CELL_LINE_ROWS = [
    ("ACHN", 13.2, 1.5, 0.15, 0.96, 13.0, -2.0, 48.0, 27.0, 2.0),
    ("HT29", 8.8, 1.2, 0.08, 0.54, 17.0, 2.0, 61.0, 20.0, 0.8),
    ("M14", 10.4, 1.9, 0.22, 0.72, 14.0, 0.0, 51.0, 26.0, 2.5),
    ("IGROV1", 10.4, 1.3, 0.12, 0.66, 15.0, -1.0, 54.0, 31.0, 1.2),
    ("MDAMB231", 9.6, 2.6, 0.18, 0.6, 14.0, 1.0, 58.0, 42.0, 3.0),
    ("SF539", 12.0, 2.0, 0.2, 0.84, 13.0, -3.0, 48.0, 35.0, 2.2),
    ("HS578T", 12.4, 2.4, 0.2, 0.9, 11.0, -2.0, 45.0, 54.0, 2.0),
    ("SKMEL2", 11.2, 1.7, 0.25, 0.78, 14.0, 0.0, 51.0, 45.0, 1.8),
    ("SW620", 8.0, 1.4, 0.1, 0.54, 18.0, 3.0, 64.0, 20.0, 1.5),
    ("EKVX", 13.6, 1.4, 0.16, 1.02, 13.0, -3.0, 45.0, 44.0, 1.4),
    ("OVCAR4", 11.2, 1.3, 0.12, 0.72, 15.0, -1.0, 51.0, 41.0, 1.0),
    ("UACC257", 10.4, 1.6, 0.24, 0.66, 17.0, 1.0, 54.0, 38.0, 2.0),
    ("BT549", 12.0, 2.2, 0.22, 0.78, 13.0, -2.0, 48.0, 54.0, 2.4),
    ("LOXIMVI", 8.8, 1.8, 0.2, 0.6, 15.0, 1.0, 58.0, 21.0, 3.2),
    ("MALME3M", 12.0, 1.8, 0.28, 0.84, 14.0, -1.0, 48.0, 46.0, 1.6),
    ("A498", 14.4, 1.4, 0.14, 1.08, 11.0, -3.0, 45.0, 47.0, 1.5),
    ("COLO205", 8.0, 1.1, 0.06, 0.48, 18.0, 4.0, 67.0, 24.0, 0.8),
    ("HOP62", 12.8, 1.6, 0.18, 0.9, 13.0, -2.0, 48.0, 39.0, 1.8),
    ("HCT15", 9.6, 1.3, 0.12, 0.6, 17.0, 1.0, 58.0, 21.0, 1.0),
    ("OVCAR5", 11.2, 1.4, 0.14, 0.78, 14.0, -1.0, 51.0, 49.0, 1.2),
    ("T47D", 8.8, 1.2, 0.1, 0.54, 17.0, 2.0, 61.0, 46.0, 0.7),
]
CELL_LINES: dict[str, CellLine] = {row[0]: CellLine(*row) for row in _CELL_LINE_ROWS}


@dataclass(frozen=True)
class Drug:
    """A drug of the catalogue. `pattern` is its row of the paper's figure (§5.5): one character per concentration,
    low to high; '.' no effect, S cytostatic, M mixed, T cytotoxic."""

    name: str
    pattern: str
    signature: str  # one of SIGNATURES, or 'none' for drugs without effect
    top_uM: float  # highest concentration; the others follow in 10-fold steps

    @property
    def mechanism(self) -> str:
        """The class at the top concentration. Everolimus and Etomoxir show no effect at the top concentration of
        the one cell line in the figure but S/M marks below it; they are taken as the catalogue's two cytostatic
        drugs (mTOR and fatty-acid oxidation inhibitors), since otherwise no drug would be cytostatic."""
        marks = self.pattern.replace(".", "")
        if not marks:
            return "no_effect"
        return {"T": "cytotoxic", "M": "mixed", "S": "cytostatic"}.get(self.pattern[-1], "cytostatic")

    @property
    def n_active(self) -> int:
        """How many of the 5 concentrations act in the reference cell line (the figure's count of marks)."""
        return sum(ch != "." for ch in self.pattern)


# In the order of the authors' constants.py (it defines the class indices used by the lens task).
_DRUG_ROWS = [
    ("Chlormethine", "...MT", "fragmentation", 100.0),
    ("Clofarabine", "...MT", "rounding", 10.0),
    ("Panzem-2-ME2", ".....", "none", 10.0),
    ("Pemetrexed", "..MTT", "enlargement", 10.0),
    ("Asparaginase", "...SM", "granularity", 10.0),
    ("Irinotecan", "....T", "enlargement", 100.0),
    ("Gemcitabine", "...TT", "fragmentation", 1.0),
    ("17-AAG", "..TTT", "rounding", 10.0),
    ("Docetaxel", "...MM", "rounding", 0.1),
    ("Erlotinib", ".....", "none", 10.0),
    ("UK5099", ".....", "none", 100.0),
    ("Fluorouracil", "....T", "enlargement", 100.0),
    ("Everolimus", "S.SM.", "granularity", 1.0),
    ("MEDICA 16", ".....", "none", 100.0),
    ("BPTES", ".....", "none", 10.0),
    ("Oligomycin A", "...MM", "granularity", 1.0),
    ("Trametinib", "..TTT", "elongation", 1.0),
    ("Oxaliplatin", "....T", "fragmentation", 100.0),
    ("Rapamycin", "...SM", "granularity", 1.0),
    ("Etomoxir", "...S.", "elongation", 100.0),
    ("Lenvatinib", ".....", "none", 10.0),
    ("Oxfenicine", ".....", "none", 1000.0),
    ("Mercaptopurine", "....T", "enlargement", 100.0),
    ("Metformin", ".....", "none", 1000.0),
    ("Omacetaxine", "...TT", "rounding", 1.0),
    ("Cladribine", "...ST", "rounding", 11.0),
    ("Paclitaxel", "...MM", "enlargement", 0.1),
    ("Methotrexate", "...TT", "enlargement", 10.0),
    ("Topotecan", "...ST", "fragmentation", 1.0),
    ("YC-1", "S...M", "elongation", 100.0),
    ("Decitabine", "....M", "enlargement", 10.0),
]
DRUGS: dict[str, Drug] = {row[0]: Drug(*row) for row in _DRUG_ROWS}

# The demo's eight: two per class, and within a class two different signatures (all five signatures appear).
DEMO_CELL_LINES = ("ACHN", "HT29")
DEMO_DRUGS = (
    "Cladribine",  # cytotoxic, rounding
    "Topotecan",  # cytotoxic, fragmentation
    "Paclitaxel",  # mixed, enlargement
    "Oligomycin A",  # mixed, granularity
    "Everolimus",  # cytostatic, granularity
    "Etomoxir",  # cytostatic, elongation
    "Metformin",  # no effect
    "BPTES",  # no effect
)
