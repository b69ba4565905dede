"""Image preprocessing as the official AKI code does it (the fixture's pixels, made by running it)
and the official SFT augmentation: crop boxes drawn as torchvision draws them, flips, and
pipelines whose augmented pixels depend on (seed, record index, epoch) only, resume included."""
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from mma_jax.config import Config, ModelConfig, VisionConfig
from mma_jax.data.images import (AUGMENT_RATIO, Augmentation, apply_augmentation, augment_rng,
                                 draw_augmentation, preprocess, random_resized_crop_box,
                                 resize_rgb, resizes_first)
from mma_jax.data.pipeline import DataPipeline
from mma_jax.data.tokenizer import load_tokenizer

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "aki_official"


@pytest.fixture(scope="module")
def official():
  with np.load(FIXTURE / "official.npz") as npz:
    return {k: npz[k] for k in npz.files if k.startswith("pixel")}


def image_path(name):
  return str(FIXTURE / "images" / f"{name}.png")


# ----------------------------------------------------------------------------- the resize order
@pytest.mark.parametrize("name", ["rgb", "palette", "rgba"])
def test_resize_first_gives_the_official_pixels(official, name):
  path = image_path(name)
  np.testing.assert_array_equal(resize_rgb(path, 56, resize_first=True),
                                official[f"pixels_u8_{name}_56"])
  # the official tensor is [3, H, W], Normalize(0.5, 0.5): SigLIP's normalisation
  np.testing.assert_allclose(preprocess(path, 56, "siglip", resize_first=True),
                             official[f"pixel_values_{name}_56"].transpose(1, 2, 0),
                             atol=1e-6, rtol=0)
  if name != "rgb":
    np.testing.assert_array_equal(resize_rgb(path, 384, resize_first=True),
                                  official[f"pixels_u8_{name}_384"])
  # encoded bytes go the same way as a path
  with open(path, "rb") as f:
    np.testing.assert_array_equal(resize_rgb(f.read(), 56, resize_first=True),
                                  official[f"pixels_u8_{name}_56"])


def test_the_default_order_differs_where_the_mode_matters(official):
  with Image.open(image_path("palette")) as p, Image.open(image_path("rgba")) as a:
    assert (p.mode, a.mode) == ("P", "RGBA")
  theirs = lambda name: official[f"pixel_values_{name}_56"].transpose(1, 2, 0)
  ours = lambda name: preprocess(image_path(name), 56, "siglip")
  np.testing.assert_allclose(ours("rgb"), theirs("rgb"), atol=1e-6, rtol=0)   # RGB: one order
  assert np.abs(ours("palette") - theirs("palette")).max() > 1.0   # 'P' resized NEAREST there
  assert np.abs(ours("rgba") - theirs("rgba")).max() > 1.5         # RGBA premultiplied there
  for name in ("palette", "rgba"):
    assert (resize_rgb(image_path(name), 384) != official[f"pixels_u8_{name}_384"]).any()


def test_arrays_with_alpha_are_resized_premultiplied_too(official):
  with Image.open(image_path("rgba")) as image:
    array = np.asarray(image)
  assert array.shape[-1] == 4
  np.testing.assert_array_equal(resize_rgb(array, 56, resize_first=True),
                                official["pixels_u8_rgba_56"])


def test_the_flavour_decides_the_order_in_one_place():
  assert not resizes_first("default", inference=True)
  assert not resizes_first("default", inference=False)
  assert resizes_first("official", inference=True)       # local_demo.py, eval_cv_bench/eval.py
  assert not resizes_first("official", inference=False)  # the official loaders convert first
  with pytest.raises(ValueError, match="unknown data.flavour 'aki'"):
    resizes_first("aki", inference=True)


# ------------------------------------------------------------------------------ the augmentation
def test_crop_boxes_stay_inside_and_cover_half_to_all_of_the_image():
  size, fractions, moved = 384, [], 0
  for seed in range(2000):
    top, left, h, w = random_resized_crop_box(size, size, augment_rng(seed, 0, 0))
    assert 0 <= top and top + h <= size and 0 <= left and left + w <= size
    # the area is drawn in [0.5, 1] of the image, then each side is rounded
    assert 0.5 * size * size - (h + w) / 2 <= h * w <= size * size
    assert AUGMENT_RATIO[0] - 0.01 <= w / h <= AUGMENT_RATIO[1] + 0.01
    fractions.append(h * w / size**2)
    moved += top > 0 or left > 0
  assert min(fractions) < 0.52 and max(fractions) > 0.95 and moved > 1900


def test_crop_falls_back_to_a_centre_crop_in_the_ratio_range():
  # 100 x 10: no crop of half its area or more has a ratio within [3/4, 4/3] -> the centre
  # crop of the full height, 10 * 4/3 wide (torchvision's fallback)
  assert random_resized_crop_box(10, 100, augment_rng(0, 0, 0)) == (0, 43, 10, 13)
  assert random_resized_crop_box(100, 10, augment_rng(0, 0, 0)) == (43, 0, 13, 10)


def test_flips_half_the_time_and_augmentation_is_crop_resize_flip():
  flips = [draw_augmentation(64, augment_rng(7, i, 0)).flip for i in range(2000)]
  assert 0.45 < np.mean(flips) < 0.55
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  whole = Augmentation(0, 0, 32, 32, flip=False)
  np.testing.assert_array_equal(apply_augmentation(pixels, whole), pixels)
  mirrored = apply_augmentation(pixels, Augmentation(0, 0, 32, 32, flip=True))
  np.testing.assert_array_equal(mirrored, pixels[:, ::-1])
  # the crop, resized back (in float, as the official code on its tensor; rounded once): on a
  # smooth picture within a step of PIL's uint8 bicubic, which rounds after each pass
  y, x = np.mgrid[0:32, 0:32]
  smooth = np.stack([x * 6, y * 7, 255 - (x + y) * 3], -1).astype(np.uint8)
  crop = apply_augmentation(smooth, Augmentation(3, 5, 20, 24, flip=False))
  expected = Image.fromarray(smooth[3:23, 5:29]).resize((32, 32), Image.Resampling.BICUBIC)
  assert np.abs(crop.astype(int) - np.asarray(expected)).max() <= 1
  assert crop.dtype == np.uint8 and crop.shape == (32, 32, 3)
  np.testing.assert_array_equal(apply_augmentation(smooth, Augmentation(3, 5, 20, 24, flip=True)),
                                crop[:, ::-1])


def test_the_generator_depends_on_seed_record_and_epoch_only():
  draw = lambda *key: draw_augmentation(384, augment_rng(*key))
  assert draw(0, 5, 1) == draw(0, 5, 1)
  assert len({draw(0, 5, 1), draw(1, 5, 1), draw(0, 6, 1), draw(0, 5, 2)}) == 4
  assert draw(-1, 0, 0) == draw(-1, 0, 0)   # any int seed


# -------------------------------------------------------------------------------- the pipeline
SIZE = 16


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer("gpt2", "phi3")[0]


@pytest.fixture(scope="module")
def records():
  rng = np.random.default_rng(3)
  return [{"question": f"what shape is number {i}?", "answer": ["circle", "square"][i % 2],
           "image": rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), "image_id": i}
          for i in range(12)]


def pipeline(records, tokenizer, **kw):
  args = dict(dataset="easy_vqa", tokenizer=tokenizer, num_image_tokens=4, batch_size=2,
              max_length=128, image_size=SIZE, images_per_row=2, pack_window=4,
              read_threads=2, process_index=0, process_count=1, augment=True)
  return DataPipeline(records, **{**args, **kw})


def take(p, n):
  it = iter(p)
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for name in x:
      np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def test_augmented_batches_repeat_with_the_seed_and_change_with_it(records, tokenizer):
  reference = take(pipeline(records, tokenizer), 14)     # more than two epochs
  assert_same(take(pipeline(records, tokenizer), 14), reference)
  assert_same(take(pipeline(records, tokenizer, read_threads=1), 14), reference)
  # the seed changes the pixels, not only the order: compare in source order
  ordered = lambda **kw: take(pipeline(records, tokenizer, shuffle=False, **kw), 6)
  a, b, plain = ordered(seed=0), ordered(seed=1), ordered(augment=False)
  for x, y, z in zip(a, b, plain):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(x["tokens"], z["tokens"])
  assert all((x["images"] != y["images"]).any() for x, y in zip(a, b))
  assert all((x["images"] != z["images"]).any() for x, z in zip(a, plain))
  # every epoch crops anew: batch 6 holds the records of batch 0, one epoch on
  later = take(pipeline(records, tokenizer, shuffle=False), 7)
  np.testing.assert_array_equal(later[6]["tokens"], later[0]["tokens"])
  assert (later[6]["images"] != later[0]["images"]).any()


def test_a_records_pixels_do_not_depend_on_the_shard(records, tokenizer):
  one = lambda i, n: take(pipeline(records, tokenizer, shuffle=False, packing=False,
                                   batch_size=1, process_index=i, process_count=n), 6)
  single, first, second = one(0, 1), one(0, 2), one(1, 2)
  for k in range(3):   # process i of 2 reads records i, i + 2, ...
    np.testing.assert_array_equal(first[k]["images"], single[2 * k]["images"])
    np.testing.assert_array_equal(second[k]["images"], single[2 * k + 1]["images"])


def test_each_record_gets_its_own_draw(records, tokenizer):
  same = [{**r, "image": records[0]["image"]} for r in records]   # one picture, twelve records
  batches = take(pipeline(same, tokenizer, shuffle=False, packing=False, batch_size=1), 12)
  pixels = {b["images"][0, 0].tobytes() for b in batches}
  assert len(pixels) >= 10


def test_resume_continues_with_the_same_augmented_pixels(records, tokenizer):
  make = lambda: pipeline(records, tokenizer, batch_size=1)   # states inside windows too
  reference = take(make(), 14)
  it = iter(make())
  inside_a_window = set()
  for stop_after in range(1, 9):
    assert_same([next(it)], reference[stop_after - 1:stop_after])
    state = json.loads(json.dumps(it.get_state()))
    inside_a_window.add(state["rows_returned"] > 0)
    resumed = iter(make())
    resumed.set_state(state)
    assert_same([next(resumed) for _ in range(6)], reference[stop_after:stop_after + 6])
  assert inside_a_window == {True, False}


def test_only_training_pipelines_augment(easy_vqa_dir):
  config = Config(model=ModelConfig(vision=VisionConfig(family="siglip", image_size=16)))
  config.data.data_dir = str(easy_vqa_dir)
  config.train.batch_size = config.eval.batch_size = 2
  make = lambda training: DataPipeline.from_config(config, split="test[:8]", num_image_tokens=4,
                                                   training=training)
  assert not make(True).augment
  config.data.augment = True
  assert make(True).augment and not make(False).augment
