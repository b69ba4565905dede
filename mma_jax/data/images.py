"""Image preprocessing for the vision towers: decode to RGB, bicubic resize, normalise per tower.

The pipeline resizes in its readers (`resize_rgb`, uint8: a quarter of the bytes to buffer and to
send between processes) and normalises while copying into the batch (`normalize(..., out=)`);
`preprocess` is both steps.

Two resize orders (`resize_first`): by default an image is converted to RGB, then resized (what
the HF image processors do; a palette image is resized by its colours). `resize_first=True`
resizes the image in its own mode, then converts to RGB: the official AKI inference order
(local_demo.py, eval_cv_bench/eval.py: torchvision Resize on the PIL image as opened), where PIL
resizes 'P' (palette) and '1' images NEAREST whatever is asked and RGBA premultiplied (fully
transparent pixels come out black). RGB, L and decoded arrays without alpha give the same pixels
either way. `resizes_first(flavour, inference=)` is the one place that decides which order a
run uses.

Augmentation (`draw_augmentation`, `apply_augmentation`): the official AKI SFT augmentation,
RandomResizedCrop(size, scale (0.5, 1), ratio (3/4, 4/3), bicubic) + RandomHorizontalFlip(0.5)
applied to the already resized image, with the crop drawn as torchvision draws it but from a
numpy Generator (`augment_rng`: a function of the seed, the record and the epoch).

Inputs may be encoded bytes (what the llava_instruct and image_captions builders store), a file
path, or an already decoded uint8 array (tfds Image features, as in easy_vqa). A file that is
missing or cannot be decoded raises `ImageError` naming the input; its `reason` is the key the
pipeline counts skipped examples by.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os

import numpy as np
from PIL import Image

from mma_jax.templates import FLAVOURS

# Per-channel (mean, std) applied after scaling pixels to [0, 1], as the HF image processors do.
NORMALIZATION = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


class ImageError(ValueError):
  """An image that cannot be used; `reason` is `missing_image_file` or `undecodable_image`."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def _describe(image, name: str | None) -> str:
  """How errors name an image: the caller's label (which example, which image) and the input."""
  if isinstance(image, (str, os.PathLike)):
    what = repr(os.fspath(image))
  elif isinstance(image, (bytes, bytearray, memoryview)):
    what = f"<{len(image)} encoded bytes>"
  else:
    what = f"<{type(image).__name__}>"
  return f"{name!r} {what}" if name else what


def decode_image(image, name: str | None = None) -> Image.Image:
  """bytes | path | uint8 array [H, W(, C)] -> a decoded PIL image in its own mode (an array
  [H, W] is 'L', [H, W, 3] 'RGB', [H, W, 4] 'RGBA'). `name` labels errors."""
  label = _describe(image, name)
  if isinstance(image, np.ndarray):
    return _array_to_image(image, label)
  try:
    if isinstance(image, (str, os.PathLike)):
      if not os.path.isfile(image):
        raise ImageError("missing_image_file", f"image file {label} does not exist")
      with Image.open(image) as pil:
        pil.load()                   # decode errors surface here
        return pil
    if isinstance(image, (bytes, bytearray, memoryview)):
      with Image.open(io.BytesIO(image)) as pil:
        pil.load()
        return pil
  except ImageError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError("undecodable_image", f"cannot decode image {label}: {e}") from None
  raise ImageError("undecodable_image", f"image {label} is not bytes, a path or an array")


def _to_rgb(pil: Image.Image, label: str) -> Image.Image:
  try:
    return pil.convert("RGB")
  except (OSError, ValueError) as e:
    raise ImageError("undecodable_image", f"cannot convert image {label} to RGB: {e}") from None


def decode_rgb(image, name: str | None = None) -> Image.Image:
  """bytes | path | uint8 array [H, W(, C)] -> an RGB PIL image. `name` labels errors."""
  return _to_rgb(decode_image(image, name), _describe(image, name))


def _array_to_image(array: np.ndarray, label: str) -> Image.Image:
  if array.dtype != np.uint8 or array.ndim not in (2, 3):
    raise ImageError("undecodable_image", f"image {label} must be a uint8 [H, W] or [H, W, C] "
                     f"array, got {array.dtype} {array.shape}")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 3 and array.shape[-1] not in (3, 4):
    raise ImageError("undecodable_image", f"image {label} has {array.shape[-1]} channels")
  return Image.fromarray(array)


def resizes_first(flavour: str, *, inference: bool) -> bool:
  """The resize order of a run (data.flavour): True = resize in the image's own mode, then RGB.

  "default": convert first, everywhere. "official": as the official AKI code, which resizes
  first where it prepares images itself for a prompt (local_demo.py, eval_cv_bench/eval.py call
  the factory transform on the image as opened), while its training loaders convert to RGB
  before that same transform (train/data.py decodes webdataset images with "pilrgb";
  sft_data_utils/base.py opens them with `.convert("RGB")`). So training data is converted
  first under both flavours and only prompts (generation, evaluation, pictures) differ."""
  if flavour not in FLAVOURS:
    raise ValueError(f"unknown data.flavour {flavour!r}; choose one of: {', '.join(FLAVOURS)}")
  return flavour == "official" and inference


def resize_rgb(image, size: int, name: str | None = None, *,
               resize_first: bool = False) -> np.ndarray:
  """Any accepted image -> uint8 [size, size, 3]: RGB and a bicubic resize (as the HF
  processors), in that order, or with `resize_first` resized in its own mode, then RGB (the
  official AKI inference order; see the module docstring)."""
  if not resize_first:
    rgb = decode_rgb(image, name)
    if rgb.size != (size, size):
      rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb)
  pil = decode_image(image, name)
  if pil.size != (size, size):
    try:   # (PIL itself picks NEAREST for 'P' and '1', and resizes RGBA / LA premultiplied)
      pil = pil.resize((size, size), Image.Resampling.BICUBIC)
    except (OSError, ValueError) as e:
      raise ImageError("undecodable_image", f"cannot resize image {_describe(image, name)} in "
                       f"its mode {pil.mode}: {e}") from None
  return np.asarray(_to_rgb(pil, _describe(image, name)))


# ---------------------------------------------------------------------------------- augmentation
AUGMENT_SCALE = (0.5, 1.0)       # of the image's area (official SFT: sft_data_utils/base.py)
AUGMENT_RATIO = (3 / 4, 4 / 3)   # width / height (torchvision's default)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """One draw of the SFT augmentation: the crop (top, left, height, width) and the flip."""
  top: int
  left: int
  height: int
  width: int
  flip: bool


def augment_rng(seed: int, record_index: int, epoch: int) -> np.random.Generator:
  """The generator of one record's augmentation in one epoch: a function of these three only,
  so a resumed run, any number of reader threads or worker processes, draw the same."""
  return np.random.default_rng([seed % 2**64, record_index, epoch, 0xA61])


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float] = AUGMENT_SCALE,
                            ratio: tuple[float, float] = AUGMENT_RATIO
                            ) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a crop drawn as torchvision's RandomResizedCrop draws it: up to 10
  tries of an area uniform in `scale` of the image and an aspect ratio (w / h) log-uniform in
  `ratio`, sides rounded, kept when it fits, at a uniform position; else a centre crop of the
  whole image narrowed to the ratio range."""
  area = height * width
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_low, log_high))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  w, h = width, height
  if width / height < min(ratio):
    h = int(round(width / min(ratio)))
  elif width / height > max(ratio):
    w = int(round(height * max(ratio)))
  return (height - h) // 2, (width - w) // 2, h, w


def draw_augmentation(size: int, rng: np.random.Generator) -> Augmentation:
  """The crop of a [size, size] image, then the flip (probability 1/2), in torchvision's order."""
  top, left, h, w = random_resized_crop_box(size, size, rng)
  return Augmentation(top, left, h, w, flip=bool(rng.random() < 0.5))


def apply_augmentation(pixels: np.ndarray, aug: Augmentation) -> np.ndarray:
  """uint8 [S, S, 3] -> uint8 [S, S, 3]: the crop resized back to S x S (bicubic), then
  mirrored left-right if `aug.flip`. The official code does this on the normalised float
  tensor with torchvision's antialiased bicubic (PIL's filter); so the resize runs in float
  (PIL mode 'F', per channel) and only its result is rounded to uint8, clipping the overshoot
  that the official tensor keeps beyond [-1, 1] at hard edges."""
  size = pixels.shape[0]
  crop = pixels[aug.top:aug.top + aug.height, aug.left:aug.left + aug.width]
  if crop.shape[:2] != (size, size):
    channels = [np.asarray(Image.fromarray(crop[..., c].astype(np.float32)).resize(
        (size, size), Image.Resampling.BICUBIC)) for c in range(crop.shape[-1])]
    crop = np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)
  return np.ascontiguousarray(crop[:, ::-1]) if aug.flip else crop


def normalize(pixels: np.ndarray, norm: str, out: np.ndarray | None = None) -> np.ndarray:
  """uint8 [..., H, W, 3] -> float32 (x / 255 - mean) / std, written into `out` if given (a
  C-contiguous float32 array of the same shape)."""
  if norm not in NORMALIZATION:
    raise ValueError(f"unknown image normalisation {norm!r}; choose one of: "
                     f"{', '.join(NORMALIZATION)}")
  if out is None:
    out = np.empty(pixels.shape, np.float32)
  if out.shape != pixels.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
    raise ValueError(f"normalize: out must be C-contiguous float32 {pixels.shape}")
  mean, std = (np.asarray(v, np.float32) for v in NORMALIZATION[norm])
  # Per-channel constants tiled along a whole row: numpy's inner loop then runs W * 3 elements
  # long instead of 3 (about 6x faster; the values are the same).
  width = pixels.shape[-2]
  rows = out.reshape(*pixels.shape[:-2], width * 3)
  np.multiply(pixels.reshape(rows.shape), np.tile(1 / (255 * std), width), out=rows,
              dtype=np.float32)
  rows -= np.tile(mean / std, width)
  return out


def preprocess(image, size: int, norm: str, name: str | None = None, *,
               resize_first: bool = False) -> np.ndarray:
  """Any accepted image -> float32 [size, size, 3]: RGB, bicubic resize (in the order
  `resize_first` says), (x / 255 - mean) / std."""
  return normalize(resize_rgb(image, size, name, resize_first=resize_first), norm)
