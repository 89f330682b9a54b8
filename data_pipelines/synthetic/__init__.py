"""Synthetic time-lapse plate: a simulated live-cell imaging experiment with planted drug effects.

Modules, in the order data flows: catalogue (cell lines, drugs) → design (presets, dose-response, planted effects,
layout, seeds) → population (agent simulation of one field of view) → appearance (cells → drawing parameters,
signatures) → render (pixels) → plate (wells, stream, files). The public face is re-exported here and by
`data_pipelines.synthetic_plate`, which is also the CLI.
"""

from .catalogue import CELL_LINES, CONTROLS, DRUGS, MECHANISMS, SIGNATURES, CellLine, Drug
from .design import (
    EFFECTS,
    IMAGE_SIZE,
    Condition,
    PlateConfig,
    WellSpec,
    ground_truth,
    hill_response,
    make_config,
    plate_layout,
)
from .plate import (
    GROUND_TRUTH_COLUMNS,
    MANIFEST_COLUMNS,
    WellFrames,
    iter_plate,
    iter_well_frames,
    render_plate,
    render_well,
    write_stream,
)

__all__ = [
    "CELL_LINES", "CONTROLS", "DRUGS", "EFFECTS", "GROUND_TRUTH_COLUMNS", "IMAGE_SIZE", "MANIFEST_COLUMNS",
    "MECHANISMS", "SIGNATURES", "CellLine", "Condition", "Drug", "PlateConfig", "WellFrames", "WellSpec",
    "ground_truth", "hill_response", "iter_plate", "iter_well_frames", "make_config", "plate_layout",
    "render_plate", "render_well", "write_stream",
]
