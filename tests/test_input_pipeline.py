"""Tests of the Grain input pipelines (data_pipelines/input_pipeline.py) and the crop/augment functions (augment.py).

They run against an in-memory source with the contract of ``data_pipelines.source.open_source`` (random access,
``{'image': uint8 [H, W, C], 'row_id': int64}``), so they do not depend on a built dataset.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import augment as A
from data_pipelines import input_pipeline as ip

REFERENCE_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"


class InMemorySource:
    """Random-access source of random uint8 images; ``row_id`` = 1000 + index so ids and indices cannot be confused."""

    def __init__(self, n: int, size: int = 48, channels: int = 1, seed: int = 0, images: np.ndarray | None = None):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8) if images is None else images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "row_id": np.int64(1000 + index)}


def small_config(**overrides):
    cfg = ip.default_input_config()
    cfg.batch_size = 4
    cfg.size_crops = (24, 24, 16)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def take(ds_or_iter, n):
    it = iter(ds_or_iter)
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["row_id"], y["row_id"])
        assert len(x["crops"]) == len(y["crops"])
        for cx, cy in zip(x["crops"], y["crops"]):
            np.testing.assert_array_equal(cx, cy)


def reference_file(name: str) -> Path:
    path = REFERENCE_DIR / name
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"reference file {path} is missing (CI=true: reference checks must run)")
        pytest.skip(f"reference file {path} not present")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Crop boxes


@pytest.mark.parametrize("scale", [(0.5, 0.75), (0.5, 0.5), (0.08, 1.0), (0.2, 0.3)])
def test_crop_box_area_aspect_and_position_within_ranges(scale):
    rng = np.random.default_rng(1)
    height = width = 256
    areas, aspects = [], []
    for _ in range(3000):
        box = A.sample_crop_box(height, width, rng, scale)
        assert 0 <= box.top and box.top + box.height <= height and 0 <= box.left and box.left + box.width <= width
        # w and h are each rounded to integers: allow about half a pixel on each side.
        frac = box.height * box.width / (height * width)
        tol = (box.height + box.width) / 2 / (height * width) + 1e-9
        if scale[1] < 1.0:  # with scale up to 1 the central fallback (whole image) may occur
            assert scale[0] - tol <= frac <= scale[1] + tol, (box, frac)
        aspect = box.width / box.height
        slack = 1.0 / min(box.height, box.width)
        assert 3 / 4 * (1 - slack) <= aspect <= 4 / 3 * (1 + slack), box
        areas.append(frac)
        aspects.append(aspect)
    # The draws fill their ranges (not stuck at one value): log-aspect spans most of (log 3/4, log 4/3).
    assert np.log(min(aspects)) < np.log(3 / 4) + 0.05 and np.log(max(aspects)) > np.log(4 / 3) - 0.05
    if scale[1] - scale[0] > 0.1:
        assert min(areas) < scale[0] + 0.05 and max(areas) > min(scale[1], 0.95) - 0.05


def torchvision_get_params(height, width, scale, ratio, uniforms):
    """torchvision RandomResizedCrop.get_params transcribed, fed from a list of uniforms in [0, 1) (4 per try)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        u = uniforms[4 * attempt: 4 * attempt + 4]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("shape", [(256, 256), (100, 300), (300, 100), (37, 41)])
@pytest.mark.parametrize("scale", [(1.0, 1.0), (0.5, 0.75), (0.08, 1.0), (0.9, 1.0)])
def test_crop_box_is_torchvisions_get_params(shape, scale):
    ratio = (3 / 4, 4 / 3)
    for seed in range(300):
        uniforms = np.random.default_rng(seed).random(40).tolist()
        box = A.sample_crop_box(*shape, np.random.default_rng(seed), scale, ratio)
        assert (box.top, box.left, box.height, box.width) == torchvision_get_params(*shape, scale, ratio, uniforms)


def test_scale_one_on_square_image_is_whole_image_and_fallback_is_central():
    rng = np.random.default_rng(2)
    for _ in range(200):
        assert A.sample_crop_box(256, 256, rng, (1.0, 1.0)) == A.CropBox(0, 0, 256, 256)
    # A wide image cannot hold scale 1 at aspect <= 4/3: torchvision falls back to the central 4/3 box.
    assert A.sample_crop_box(100, 300, rng, (1.0, 1.0)) == A.CropBox(0, (300 - 133) // 2, 100, 133)


def test_multi_crop_is_box_then_resized_crop_then_augment():
    """The fused multi_crop (flip while resizing) equals the plain composition of the public steps, draw for draw."""
    image = np.random.default_rng(10).integers(0, 256, (90, 70, 2), dtype=np.uint8)
    specs = (A.CropSpec(32, 1.0, 1.0), A.CropSpec(24, 0.3, 0.6), A.CropSpec(16, 0.5, 0.5))
    params = A.AugmentParams(hflip_p=0.5, blur_p=0.5, vflip_p=0.3, brightness=0.2)
    for seed in range(40):
        fused = A.multi_crop(image, np.random.default_rng(seed), specs, params)
        rng = np.random.default_rng(seed)
        for spec, crop in zip(specs, fused):
            box = A.sample_crop_box(90, 70, rng, (spec.min_scale, spec.max_scale))
            expected = A.augment(A.resized_crop(image, box, spec.size, as_float=True), rng, params)
            np.testing.assert_array_equal(crop, expected)
        # Writing into rows of batch arrays (what the pipeline does) gives the same crops.
        batches = [np.full((3, s.size, s.size, 2), np.nan, np.float32) for s in specs]
        written = A.multi_crop(image, np.random.default_rng(seed), specs, params, out=[b[1] for b in batches])
        for batch, crop, out in zip(batches, fused, written):
            assert out.base is batch or out.base is batch.base
            np.testing.assert_array_equal(batch[1], crop)
            assert np.isnan(batch[0]).all() and np.isnan(batch[2]).all()


@pytest.mark.parametrize("shape", [(256, 256, 1), (48, 64, 1), (70, 90, 1), (40, 24, 3), (8, 8, 1)])
def test_transposed_planes_are_the_transpose(shape):
    """Both transposes (8x8 word tiles for one channel with sides multiple of 8, a plain loop otherwise)."""
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(A.transposed_planes(image), image.transpose(2, 1, 0))
    # A non-contiguous view takes the plain loop and gives the same planes.
    wide = np.concatenate([image, image], axis=1)[:, : shape[1]]
    np.testing.assert_array_equal(A.transposed_planes(wide), image.transpose(2, 1, 0))


ALL_AUGMENTATIONS = A.AugmentParams(hflip_p=0.5, blur_p=0.5, vflip_p=0.5, rot90=True, brightness=0.3, contrast=0.4)


def test_uint8_hand_over_then_finish_is_multi_crop_bit_for_bit():
    """What the uint8 hand-over carries (uint8 crops, flipped and rotated, + photometric rows) finishes on the host
    into exactly multi_crop's floats, for the paper's chain and for every optional augmentation."""
    image = np.random.default_rng(12).integers(0, 256, (90, 70, 2), dtype=np.uint8)
    specs = (A.CropSpec(32, 1.0, 1.0), A.CropSpec(24, 0.3, 0.6), A.CropSpec(16, 0.5, 0.5))
    seen = np.zeros(len(A.PHOTOMETRIC_COLUMNS), int)  # crops on which each column differed from the identity
    for params in (None, A.AugmentParams(hflip_p=0.5, blur_p=0.5), ALL_AUGMENTATIONS):
        for seed in range(30):
            expected = A.multi_crop(image, np.random.default_rng(seed), specs, params)
            rows = [np.zeros((s.size, s.size, 2), np.uint8) for s in specs]
            photometric = A.multi_crop_uint8(image, np.random.default_rng(seed), specs, params, (3 / 4, 4 / 3), rows)
            seen += (photometric != np.float32(A.PHOTOMETRIC_IDENTITY)).sum(axis=0)
            if params is None:
                np.testing.assert_array_equal(photometric, np.float32([A.PHOTOMETRIC_IDENTITY] * len(specs)))
            for k, crop in enumerate(expected):
                np.testing.assert_array_equal(A.finish_crops(rows[k][None], photometric[k : k + 1])[0], crop)
    assert (seen > 0).all(), seen
    with pytest.raises(ValueError, match="photometric rows must have shape"):
        A.finish_crops(rows[0][None], np.zeros((1, 2), np.float32))


def test_device_finish_equals_host_finish():
    """data_pipelines.device_finish (jitted, what the step runs with input.finish='device') gives the host's floats:
    exactly where a crop has no photometric augmentation, to float32 rounding where it has."""
    import jax
    import jax.numpy as jnp

    from data_pipelines import device_finish

    image = np.random.default_rng(5).integers(0, 256, (80, 90, 3), dtype=np.uint8)
    specs = (A.CropSpec(24, 0.3, 1.0),) * 40
    rows = [np.zeros((24, 24, 3), np.uint8) for _ in specs]
    photometric = A.multi_crop_uint8(image, np.random.default_rng(0), specs, ALL_AUGMENTATIONS, (3 / 4, 4 / 3), rows)
    photometric[:4] = A.PHOTOMETRIC_IDENTITY  # some crops with nothing photometric to do
    crops = np.stack(rows)
    host = A.finish_crops(crops, photometric)
    device = np.asarray(jax.jit(device_finish.finish_crops)(jnp.asarray(crops), jnp.asarray(photometric)))
    np.testing.assert_array_equal(device[:4], host[:4])
    np.testing.assert_allclose(device, host, rtol=0, atol=2e-6)
    assert (photometric[:, 4] != 0).sum() > 5 and (photometric[:, 1] != 0).sum() > 5  # blurred and contrasted crops
    with pytest.raises(ValueError, match="photometric rows"):
        device_finish.finish_crops(jnp.asarray(crops), jnp.asarray(photometric[:, :2]))


@pytest.mark.parametrize("worker_count", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_finish_on_device_batches_carry_the_same_crops(worker_count):
    """finish='device': uint8 crops + photometric rows, which finish into the batches finish='host' yields; with
    worker processes too (there the host finish happens in this process after the workers)."""
    source = InMemorySource(12)
    cfg = small_config(worker_count=worker_count, vflip_p=0.5, rot90=True, brightness=0.2, contrast=0.2, blur_p=0.5)
    cfg.finish = "host"
    host = take(ip.create_train_dataset(source, cfg, seed=4, process_index=0, process_count=1), 3)
    cfg.finish = "auto"  # 'device' for a pipeline that feeds an accelerator
    device = take(ip.create_train_dataset(source, cfg, seed=4, process_index=0, process_count=1, accelerator=True), 3)
    for h, d in zip(host, device):
        assert set(d) == {"crops_uint8", "photometric", "row_id"}
        np.testing.assert_array_equal(h["row_id"], d["row_id"])
        for crop, crop_u8, photometric in zip(h["crops"], d["crops_uint8"], d["photometric"]):
            assert crop_u8.dtype == np.uint8 and photometric.shape == (4, len(A.PHOTOMETRIC_COLUMNS))
            np.testing.assert_array_equal(A.finish_crops(crop_u8, photometric), crop)
    assert ip.resolve_finish("auto", accelerator=True) == "device"
    assert ip.resolve_finish("auto", accelerator=False) == "host"
    with pytest.raises(ValueError, match="input.finish must be one of"):
        ip.create_train_dataset(source, small_config(finish="gpu"), seed=0, process_index=0, process_count=1)


def test_worker_count_auto_starts_workers_only_for_an_accelerator():
    assert ip.default_input_config().worker_count == -1
    assert ip.resolve_worker_count(-1, accelerator=False, cpu_count=16) == 0  # the step needs the CPU's cores
    assert ip.resolve_worker_count(-1, accelerator=True, cpu_count=16) == 12  # what fed an H200 (BENCHMARKS.md)
    assert ip.resolve_worker_count(-1, accelerator=True, cpu_count=2) == 1
    assert ip.resolve_worker_count(-1, accelerator=True, cpu_count=224) == 32
    assert ip.resolve_worker_count(3, accelerator=False) == 3
    with pytest.raises(ValueError, match="worker_count must be >= 0 or -1"):
        ip.resolve_worker_count(-2, accelerator=True)


def test_batch_arrays_are_reused_only_once_released():
    """Batches are written into recycled arrays: one still held (whole, or through a view) is never overwritten."""
    source = InMemorySource(64)
    cfg = small_config(batch_size=4, read_threads=0)
    reference = take(ip.create_train_dataset(source, cfg, seed=5, process_index=0, process_count=1), 8)
    it = iter(ip.create_train_dataset(source, cfg, seed=5, process_index=0, process_count=1))
    held = next(it)
    view = next(it)["crops"][1][:2]  # only a view of batch 1's second crop array survives
    released = next(it)
    released_ids = [id(c) for c in released["crops"]]
    del released
    later = [next(it) for _ in range(5)]
    assert_batches_equal([held], reference[:1])
    np.testing.assert_array_equal(view, reference[1]["crops"][1][:2])
    assert_batches_equal(later, reference[3:])
    # The released arrays did come back (the point of recycling), the held ones did not.
    later_ids = {id(c) for batch in later for c in batch["crops"]}
    assert set(released_ids) <= later_ids
    assert not {id(c) for c in held["crops"]} & later_ids


def test_multi_crop_boxes_follow_their_specs():
    cfg = ip.default_input_config()
    image = np.random.default_rng(3).integers(0, 256, (256, 256, 1), dtype=np.uint8)
    specs = ip.crop_specs(cfg)
    assert [s.size for s in specs] == [128] * 5
    for index in range(200):
        boxes: list[A.CropBox] = []
        crops = ip.multi_crop_element(image, cfg, seed=7, epoch=0, index=index, boxes=boxes)
        assert len(crops) == len(boxes) == 5
        assert boxes[0] == A.CropBox(0, 0, 256, 256)  # the global view is the whole image
        for spec, box in zip(specs[1:], boxes[1:]):
            frac = box.height * box.width / 256**2
            tol = (box.height + box.width) / 2 / 256**2
            assert spec.min_scale - tol <= frac <= spec.max_scale + tol


# --------------------------------------------------------------------------------------------------------------------
# Resize and float conversion


def test_resized_crop_is_bit_identical_to_pillow_bilinear():
    """Our kernel vs Pillow: Pillow run as two single-axis resizes, i.e. its classic horizontal-then-vertical order
    (Pillow <= 12, the authors' version; Pillow 13 sometimes runs the vertical pass first)."""
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (120, 140, 1), dtype=np.uint8)
    image[30:60, 40:90] = 255  # hard edges and saturated values exercise rounding and clipping
    plane = Image.fromarray(image[:, :, 0])
    same_as_one_call = 0
    for _ in range(120):
        h, w = (int(v) for v in rng.integers(1, [121, 141]))
        top, left = int(rng.integers(0, 121 - h)), int(rng.integers(0, 141 - w))
        size = int(rng.choice([7, 32, 64, 128, 200]))
        ours = A.resized_crop(image, A.CropBox(top, left, h, w), size)[:, :, 0]
        crop = plane.crop((left, top, left + w, top + h))
        pillow = np.asarray(crop.resize((size, h), Image.BILINEAR).resize((size, size), Image.BILINEAR))
        np.testing.assert_array_equal(ours, pillow)
        same_as_one_call += np.array_equal(ours, np.asarray(crop.resize((size, size), Image.BILINEAR)))
    assert same_as_one_call > 0
    # The whole-image view of the multi-crop (256 → 128) equals Pillow's one-call resize exactly.
    square = rng.integers(0, 256, (256, 256, 1), dtype=np.uint8)
    np.testing.assert_array_equal(
        A.resized_crop(square, A.CropBox(0, 0, 256, 256), 128)[:, :, 0],
        np.asarray(Image.fromarray(square[:, :, 0]).resize((128, 128), Image.BILINEAR)),
    )


def test_float_crop_is_uint8_crop_over_255_and_channels_are_independent():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    box = A.CropBox(5, 9, 50, 41)
    u8 = A.resized_crop(image, box, 32)
    f32 = A.resized_crop(image, box, 32, as_float=True)
    assert f32.dtype == np.float32
    np.testing.assert_array_equal(f32, np.divide(u8, np.float32(255), dtype=np.float32))
    for c in range(3):
        np.testing.assert_array_equal(u8[:, :, c], A.resized_crop(image[:, :, c:c + 1].copy(), box, 32)[:, :, 0])
    with pytest.raises(ValueError, match="outside"):
        A.resized_crop(image, A.CropBox(40, 0, 30, 10), 8)


# --------------------------------------------------------------------------------------------------------------------
# Augmentations


def test_gaussian_blur_matches_2d_reflect_convolution():
    rng = np.random.default_rng(6)
    image = rng.random((20, 17, 2), dtype=np.float32)
    for sigma in (0.1, 0.7, 2.0):
        x = np.array([-1.0, 0.0, 1.0])
        k = np.exp(-0.5 * (x / sigma) ** 2)
        k /= k.sum()
        np.testing.assert_allclose(A.gaussian_kernel3(sigma), k, rtol=1e-6)
        kernel = np.outer(k, k)
        padded = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="reflect")
        expected = sum(kernel[i, j] * padded[i:i + 20, j:j + 17] for i in range(3) for j in range(3))
        np.testing.assert_allclose(A.gaussian_blur3(image, sigma), expected, atol=1e-6)
        # Strided (flipped) input gives the same as its contiguous copy.
        np.testing.assert_array_equal(
            A.gaussian_blur3(image[:, ::-1], sigma), A.gaussian_blur3(np.ascontiguousarray(image[:, ::-1]), sigma)
        )


def _binomial_ok(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p))


def test_hflip_and_blur_happen_with_their_probabilities_and_stay_in_unit_range():
    rng = np.random.default_rng(7)
    crop = rng.random((16, 16, 1), dtype=np.float32)
    n = 2000
    flip_only = A.AugmentParams(hflip_p=0.5, blur_p=0.0)
    flips = 0
    for _ in range(n):
        out = A.augment(crop, rng, flip_only)
        flipped = np.array_equal(out, crop[:, ::-1])
        assert flipped or np.array_equal(out, crop)
        flips += flipped
    assert _binomial_ok(flips, n, 0.5), flips

    blur_only = A.AugmentParams(hflip_p=0.0, blur_p=0.2)
    blurs = 0
    for _ in range(n):
        out = A.augment(crop, rng, blur_only)
        assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
        blurs += not np.array_equal(out, crop)
    assert _binomial_ok(blurs, n, 0.2), blurs

    paper = A.AugmentParams()
    extremes = np.zeros((16, 16, 1), np.float32)
    extremes[::2] = 1.0
    for _ in range(300):
        out = A.augment(extremes, rng, paper)
        assert 0.0 <= out.min() and out.max() <= 1.0


def test_optional_augmentations_do_what_they_say():
    rng = np.random.default_rng(8)
    crop = rng.random((12, 12, 2), dtype=np.float32) * 0.5 + 0.2  # in [0.2, 0.7]: no clipping at 1.4x
    out = A.augment(crop, rng, A.AugmentParams(hflip_p=0.0, blur_p=0.0, vflip_p=1.0))
    np.testing.assert_array_equal(out, crop[::-1])
    seen = set()
    for _ in range(200):
        out = A.augment(crop, rng, A.AugmentParams(hflip_p=0.0, blur_p=0.0, rot90=True))
        k = [k for k in range(4) if np.array_equal(out, np.rot90(crop, k, axes=(0, 1)))]
        assert len(k) == 1
        seen.add(k[0])
    assert seen == {0, 1, 2, 3}
    for _ in range(100):
        out = A.augment(crop, rng, A.AugmentParams(hflip_p=0.0, blur_p=0.0, brightness=0.4))
        factor = float(out.sum() / crop.sum())
        assert 0.6 - 1e-5 <= factor <= 1.4 + 1e-5
        np.testing.assert_allclose(out, np.clip(crop * np.float32(factor), 0, 1), atol=1e-5)
        out = A.augment(crop, rng, A.AugmentParams(hflip_p=0.0, blur_p=0.0, contrast=0.4))
        ratio = float(out.std() / crop.std())
        assert 0.6 - 1e-4 <= ratio <= 1.4 + 1e-4
        np.testing.assert_allclose(out.mean(), crop.mean(), atol=1e-5)  # no clipping at these values


# --------------------------------------------------------------------------------------------------------------------
# Training pipeline


def test_train_batches_have_the_contract_shapes_and_are_seeded():
    source = InMemorySource(20)
    cfg = small_config()
    batches = take(ip.create_train_dataset(source, cfg, seed=3, process_index=0, process_count=1), 6)
    for batch in batches:
        assert set(batch) == {"crops", "row_id"}
        assert isinstance(batch["crops"], tuple) and len(batch["crops"]) == 5
        assert [c.shape for c in batch["crops"]] == [(4, 24, 24, 1)] * 2 + [(4, 16, 16, 1)] * 3
        for crop in batch["crops"]:
            assert crop.dtype == np.float32 and crop.min() >= 0.0 and crop.max() <= 1.0
        assert batch["row_id"].dtype == np.int64 and batch["row_id"].shape == (4,)
    again = take(ip.create_train_dataset(source, cfg, seed=3, process_index=0, process_count=1), 6)
    assert_batches_equal(batches, again)
    other = take(ip.create_train_dataset(source, cfg, seed=4, process_index=0, process_count=1), 6)
    assert not all(np.array_equal(a["row_id"], b["row_id"]) for a, b in zip(batches, other))
    assert not np.array_equal(batches[0]["crops"][1], other[0]["crops"][1])
    # Each epoch (20 rows = 5 batches) is a permutation, and the next epoch is shuffled differently.
    epoch0 = np.concatenate([b["row_id"] for b in batches[:5]])
    assert sorted(epoch0) == list(range(1000, 1020))
    assert not np.array_equal(epoch0[:4], batches[5]["row_id"])


def test_crops_depend_only_on_seed_epoch_and_element():
    """Batches equal the per-element recipe, and do not change with reader threads (workers: see the resume test)."""
    source = InMemorySource(12)
    cfg = small_config()
    batches = take(ip.create_train_dataset(source, cfg, seed=11, process_index=0, process_count=1), 6)  # 2 epochs
    for step, batch in enumerate(batches):
        epoch = step * 4 // 12
        for j, row_id in enumerate(batch["row_id"]):
            index = int(row_id) - 1000
            expected = ip.multi_crop_element(source.images[index], cfg, seed=11, epoch=epoch, index=index)
            for k, crop in enumerate(expected):
                np.testing.assert_array_equal(batch["crops"][k][j], crop)
    threaded = small_config(read_threads=2, prefetch_buffer_size=4)
    assert_batches_equal(batches, take(ip.create_train_dataset(source, threaded, seed=11, process_index=0,
                                                                process_count=1), 6))


def test_process_shards_are_disjoint_cover_each_epoch_and_form_the_single_process_stream():
    source = InMemorySource(24)
    cfg = small_config(batch_size=8, num_epochs=2)
    single = list(ip.create_train_dataset(source, cfg, seed=5, process_index=0, process_count=1))
    shards = [list(ip.create_train_dataset(source, cfg, seed=5, process_index=p, process_count=2)) for p in range(2)]
    assert len(single) == 6 and len(shards[0]) == len(shards[1]) == 6
    for step in range(6):
        ids = [shards[p][step]["row_id"] for p in range(2)]
        assert ids[0].shape == (4,)
        assert not set(ids[0]) & set(ids[1])
        assert sorted(np.concatenate(ids)) == sorted(single[step]["row_id"])
        # The same element gets the same crops in either layout.
        for p in range(2):
            for j, row_id in enumerate(ids[p]):
                i = list(single[step]["row_id"]).index(row_id)
                np.testing.assert_array_equal(shards[p][step]["crops"][2][j], single[step]["crops"][2][i])
    for epoch in range(2):
        rows = np.concatenate([shards[p][s]["row_id"] for p in range(2) for s in range(3 * epoch, 3 * epoch + 3)])
        assert sorted(rows) == list(range(1000, 1024))
    with pytest.raises(ValueError, match="multiple of process_count"):
        ip.create_train_dataset(source, small_config(batch_size=6), seed=0, process_index=0, process_count=4)


def test_multi_channel_images_are_cropped_alike_on_every_channel():
    gray = InMemorySource(8, channels=1, seed=9)
    rgb = InMemorySource(8, images=np.concatenate([gray.images, 255 - gray.images, gray.images], axis=-1))
    cfg = small_config()
    b1 = take(ip.create_train_dataset(gray, cfg, seed=2, process_index=0, process_count=1), 2)
    b3 = take(ip.create_train_dataset(rgb, cfg, seed=2, process_index=0, process_count=1), 2)
    for x, y in zip(b1, b3):
        np.testing.assert_array_equal(x["row_id"], y["row_id"])
        for c1, c3 in zip(x["crops"], y["crops"]):
            assert c3.shape[-1] == 3
            np.testing.assert_array_equal(c3[..., 0], c1[..., 0])
            np.testing.assert_array_equal(c3[..., 2], c1[..., 0])
            # channel 1 is the negative image: same geometry, so it matches 1 - x up to blur/resize rounding
            np.testing.assert_allclose(c3[..., 1], 1.0 - c1[..., 0], atol=2.5 / 255)
    ev = next(iter(ip.create_eval_dataset(rgb, image_size=24, batch_size=4, process_index=0, process_count=1)))
    assert ev["image"].shape == (4, 24, 24, 3)


def test_one_crop_config_gives_the_whole_image_resized():
    source = InMemorySource(4, size=64)
    cfg = ip.one_crop_config(small_config())
    cfg.augment = False
    assert ip.crop_specs(cfg) == (A.CropSpec(128, 1.0, 1.0),)
    batch = next(iter(ip.create_train_dataset(source, cfg, seed=0, process_index=0, process_count=1)))
    assert len(batch["crops"]) == 1
    for j, row_id in enumerate(batch["row_id"]):
        image = source.images[int(row_id) - 1000]
        expected = np.asarray(Image.fromarray(image[:, :, 0]).resize((128, 128), Image.BILINEAR))
        np.testing.assert_array_equal(batch["crops"][0][j, :, :, 0], np.divide(expected, np.float32(255),
                                                                               dtype=np.float32))


def test_bad_inputs_raise_clear_errors():
    class BadSource(InMemorySource):
        def __getitem__(self, index):
            return {"image": self.images[index].astype(np.float32), "row_id": np.int64(index)}

    it = iter(ip.create_train_dataset(BadSource(4), small_config(), seed=0, process_index=0, process_count=1))
    with pytest.raises(ValueError, match=r"source row \d+ .*uint8"):
        next(it)
    with pytest.raises(ValueError, match="same length"):
        ip.create_train_dataset(InMemorySource(4), small_config(nmb_crops=(1, 1)), seed=0, process_index=0,
                                process_count=1)
    with pytest.raises(ValueError, match="min <= max"):
        ip.crop_specs(small_config(min_scale_crops=(1.0, 0.8, 0.5)))


# --------------------------------------------------------------------------------------------------------------------
# Iterator state


@pytest.mark.parametrize("worker_count", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_restored_iterator_continues_at_the_exact_batch(worker_count):
    source = InMemorySource(16)
    cfg = small_config(worker_count=worker_count)
    ds = ip.create_train_dataset(source, cfg, seed=21, process_index=0, process_count=1)
    it = iter(ds)
    head = take(it, 3)
    state = it.get_state()
    tail = take(it, 4)
    it.close()  # a restart: the restored iterator is new (and with workers, so are its processes)
    restored = iter(ip.create_train_dataset(source, cfg, seed=21, process_index=0, process_count=1))
    restored.set_state(state)
    assert_batches_equal(tail, take(restored, 4))
    restored.close()
    if worker_count:
        # Workers compute whole batches: the stream is the in-process one.
        reference = take(ip.create_train_dataset(source, small_config(), seed=21, process_index=0, process_count=1), 7)
        assert_batches_equal(head + tail, reference)


@pytest.mark.parametrize("saved_with, restored_with", [(0, 0), pytest.param(1, 0, marks=pytest.mark.slow),
                                                      pytest.param(0, 2, marks=pytest.mark.slow)])
def test_iterator_state_restores_under_another_worker_count(saved_with, restored_with):
    """The batches do not depend on the worker count, and neither does the state: a run resumed on a machine where
    worker_count=-1 resolves to another count (or with the count changed) continues at the exact batch. Grain's own
    mp_prefetch state has one entry per worker and failed there (KeyError / IndexError)."""
    source = InMemorySource(10)
    reference = take(ip.create_train_dataset(source, small_config(), seed=5, process_index=0, process_count=1), 7)
    it = iter(ip.create_train_dataset(source, small_config(worker_count=saved_with), seed=5, process_index=0,
                                      process_count=1))
    take(it, 3)  # 12 positions: across the first epoch boundary (10 rows)
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    restored = iter(ip.create_train_dataset(source, small_config(worker_count=restored_with), seed=5, process_index=0,
                                            process_count=1))
    restored.set_state(state)
    assert_batches_equal(take(restored, 4), reference[3:])
    restored.close()


def test_iterator_restores_a_state_written_by_grains_own_iterator():
    """Checkpoints written before the state became {'next_batch': n} hold Grain's iterator state ({'next_index': n}
    without workers): they still restore, and the state then stays in that form."""
    source = InMemorySource(10)
    reference = take(ip.create_train_dataset(source, small_config(), seed=5, process_index=0, process_count=1), 6)
    restored = iter(ip.create_train_dataset(source, small_config(), seed=5, process_index=0, process_count=1))
    restored.set_state({"next_index": 2})
    assert_batches_equal(take(restored, 3), reference[2:5])
    assert restored.get_state() == {"next_index": 5}


def test_iterator_state_round_trips_through_grains_orbax_handler(tmp_path):
    import grain

    source = InMemorySource(16)
    cfg = small_config()
    it = iter(ip.create_train_dataset(source, cfg, seed=1, process_index=0, process_count=1))
    take(it, 2)
    grain.checkpoint.CheckpointHandler().save(tmp_path, args=grain.checkpoint.CheckpointSave(item=it))
    expected = take(it, 2)
    fresh = iter(ip.create_train_dataset(source, cfg, seed=1, process_index=0, process_count=1))
    grain.checkpoint.CheckpointHandler().restore(tmp_path, args=grain.checkpoint.CheckpointRestore(item=fresh))
    assert_batches_equal(expected, take(fresh, 2))


# --------------------------------------------------------------------------------------------------------------------
# Evaluation pipeline


def test_eval_native_size_delivers_source_pixels_bit_for_bit_in_order_with_padding():
    source = InMemorySource(11, size=20, channels=2)
    batches = list(ip.create_eval_dataset(source, image_size=None, batch_size=4, process_index=0, process_count=1))
    assert len(batches) == 3
    images = np.concatenate([b["image"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    rows = np.concatenate([b["row_id"] for b in batches])
    assert images.dtype == np.float32 and valid.dtype == np.bool_ and rows.dtype == np.int64
    np.testing.assert_array_equal(valid, [True] * 11 + [False])
    np.testing.assert_array_equal(rows, list(range(1000, 1011)) + [-1])
    np.testing.assert_array_equal(np.round(images[:11] * 255).astype(np.uint8), source.images)
    np.testing.assert_array_equal(images[:11], np.divide(source.images, np.float32(255), dtype=np.float32))
    assert not images[11].any()


def test_eval_processes_cover_rows_once_and_yield_equal_batch_counts():
    source = InMemorySource(13, size=16)
    per_process = [
        list(ip.create_eval_dataset(source, image_size=8, batch_size=6, process_index=p, process_count=3))
        for p in range(3)
    ]
    assert {len(b) for b in per_process} == {math.ceil(13 / 6)}
    for step in range(3):
        rows = np.concatenate([per_process[p][step]["row_id"] for p in range(3)])
        valid = np.concatenate([per_process[p][step]["valid"] for p in range(3)])
        expected = [r for r in range(1000 + 6 * step, 1000 + 6 * step + 6) if r < 1013]
        assert sorted(rows[valid]) == expected  # global batch k holds source rows [6k, 6k+6)
    assert all(b["image"].shape == (2, 8, 8, 1) for batches in per_process for b in batches)


def test_eval_resize_matches_the_authors_inference_preprocessing():
    """x/255 then antialiased bilinear 256→128 in float, against the reference array made with the authors' code."""
    reference = np.load(reference_file("hct15_input_128.npy"))[0, 0]
    image = np.asarray(Image.open(reference_file("HCT15_example.jpg")))
    source = InMemorySource(1, images=image[None, :, :, None])
    batch = next(iter(ip.create_eval_dataset(source, image_size=128, batch_size=1, process_index=0, process_count=1)))
    got = batch["image"][0, :, :, 0]
    assert got.shape == reference.shape == (128, 128)
    max_abs = float(np.abs(got - reference).max())
    print(f"max |eval - reference| = {max_abs:.3g}")
    assert max_abs <= 1e-6


def test_one_crop_config_copies_its_base():
    base = ip.default_input_config()
    one = ip.one_crop_config(base)
    one.num_epochs = 3
    one.batch_size = 8
    assert base.num_epochs is None and base.batch_size == 64 and base.nmb_crops == (1, 1, 3)
    assert len(ip.crop_specs(ip.default_input_config())) == 5
