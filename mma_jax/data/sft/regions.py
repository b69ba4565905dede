"""Region-captioning sources of the official AKI SFT mixture: `refcoco`, `refcoco_plus`,
`refcocog`, `visual_genome`.

INPUT `Provide a short description for this region. <bbox>[x1, y1][x2, y2]</bbox>` (corners over
the image size, 3 decimals: common.box_text), TARGET the phrase as written, as the official
RefExpLocDataset and VGDataset with the "default" template. Image sizes come from the annotation
files, as the official code takes them. Files, under the SFT data root (manual_dir):

  refcoco, refcoco_plus, refcocog
      ref/annotations/finetune_{refcoco,refcoco+,refcocog}_train.json (MDETR's annotations:
      `images` [{id, file_name, width, height, caption}] and `annotations` [{image_id, bbox
      [x, y, w, h]}], paired on the image id), images VQA/train2014/{file_name};
      TARGET the caption (the referring expression); id: the MDETR image entry's id.
  visual_genome
      VisualGenome/region_descriptions.json ([{id, regions: [{region_id, image_id, x, y, width,
      height, phrase}]}]) + VisualGenome/image_data.json ([{image_id, width, height}]), images
      VisualGenome/images/{id}.jpg; one sample per region, boxes not clamped; id: the region_id.
Own skip reasons: missing_annotation (no box for a RefCOCO entry), annotation_mismatch (a VG
region of another image), missing_image_metadata (no size for a VG image), bad_image_size.
"""
from __future__ import annotations

import pathlib

from mma_jax.data.builder_utils import RowError
from mma_jax.data.sft.common import (NUMBER, REGION_PROMPT, Rows, Sample, SftBuilder, box_text,
                                     field, load_json, manual_instructions)


def image_size(row) -> tuple[float, float]:
  width, height = field(row, "width", NUMBER), field(row, "height", NUMBER)
  if width <= 0 or height <= 0:
    raise RowError("bad_image_size", f"the image size {width}x{height} is not positive")
  return width, height


def xywh(box) -> list:
  if not (isinstance(box, list) and len(box) == 4
          and all(isinstance(v, NUMBER) and not isinstance(v, bool) for v in box)):
    raise RowError("malformed_row", f"a box must be 4 numbers [x, y, w, h], got {box!r}")
  return box


class _RefExp(SftBuilder, skip_registration=True):
  """RefCOCO-family region captioning from MDETR's annotations (the official RefExpLocDataset)."""

  HOMEPAGE = "https://github.com/ashkamath/mdetr/blob/main/.github/refexp.md"

  def rows(self, root: pathlib.Path) -> Rows:
    path = root / self.FILES[0]
    data = load_json(path, self.name)
    try:
      entries = data["images"]
      boxes = {}
      for annotation in data["annotations"]:
        boxes.setdefault(annotation["image_id"], annotation)
    except (KeyError, TypeError) as e:
      raise ValueError(f"{self.name}: '{path}' is not an MDETR annotation file (`images` and "
                       f"`annotations` with image_id; {e!r})") from None

    def parse(entry) -> list[Sample]:
      entry_id = field(entry, "id", int)
      if entry_id not in boxes:
        raise RowError("missing_annotation", f"no annotation has image_id {entry_id}")
      x, y, w, h = xywh(field(boxes[entry_id], "bbox", list))
      box = box_text(x, y, w, h, *image_size(entry))
      image = f"VQA/train2014/{field(entry, 'file_name', str)}"
      return [Sample(str(entry_id), image, REGION_PROMPT.format(bbox=box),
                     field(entry, "caption", str))]

    for index, entry in enumerate(entries):
      entry_id = entry.get("id") if isinstance(entry, dict) else None
      yield f"{index} (id {entry_id!r})", lambda entry=entry: parse(entry)


class Refcoco(_RefExp):
  """RefCOCO referring expressions as region captions."""
  name = "refcoco"
  FILES = ("ref/annotations/finetune_refcoco_train.json", "VQA/train2014/")
  MANUAL_DOWNLOAD_INSTRUCTIONS = manual_instructions(FILES)


class RefcocoPlus(_RefExp):
  """RefCOCO+ referring expressions as region captions."""
  name = "refcoco_plus"
  FILES = ("ref/annotations/finetune_refcoco+_train.json", "VQA/train2014/")
  MANUAL_DOWNLOAD_INSTRUCTIONS = manual_instructions(FILES)


class Refcocog(_RefExp):
  """RefCOCOg referring expressions as region captions."""
  name = "refcocog"
  FILES = ("ref/annotations/finetune_refcocog_train.json", "VQA/train2014/")
  MANUAL_DOWNLOAD_INSTRUCTIONS = manual_instructions(FILES)


class VisualGenome(SftBuilder):
  """Visual Genome region descriptions as region captions (the official VGDataset)."""

  name = "visual_genome"
  FILES = ("VisualGenome/region_descriptions.json", "VisualGenome/image_data.json",
           "VisualGenome/images/")
  MANUAL_DOWNLOAD_INSTRUCTIONS = manual_instructions(FILES)
  HOMEPAGE = "https://homes.cs.washington.edu/~ranjay/visualgenome/"

  def rows(self, root: pathlib.Path) -> Rows:
    regions_path, images_path = root / self.FILES[0], root / self.FILES[1]
    images = load_json(images_path, self.name)
    regions = load_json(regions_path, self.name)
    if not (isinstance(images, list) and isinstance(regions, list)):
      raise ValueError(f"{self.name}: '{regions_path}' and '{images_path}' must hold JSON lists")
    sizes = {m.get("image_id"): m for m in images if isinstance(m, dict)}

    def parse(image_id, region) -> list[Sample]:
      region_id = field(region, "region_id", int)
      if field(region, "image_id", int) != image_id:
        raise RowError("annotation_mismatch", f"region {region_id} is of image "
                       f"{region['image_id']}, listed under image {image_id}")
      if image_id not in sizes:
        raise RowError("missing_image_metadata", f"image_data.json has no image_id {image_id}")
      box = box_text(*(field(region, k, NUMBER) for k in ("x", "y", "width", "height")),
                     *image_size(sizes[image_id]))
      return [Sample(str(region_id), f"VisualGenome/images/{image_id}.jpg",
                     REGION_PROMPT.format(bbox=box), field(region, "phrase", str))]

    def malformed(message):
      raise RowError("malformed_row", message)

    for index, entry in enumerate(regions):
      if not (isinstance(entry, dict) and isinstance(entry.get("id"), int)
              and isinstance(entry.get("regions"), list)):
        yield f"image entry {index}", lambda: malformed("an image entry needs an int 'id' and a "
                                                        "'regions' list")
        continue
      for k, region in enumerate(entry["regions"]):
        yield (f"region {k} of image entry {index} (id {entry['id']})",
               lambda image_id=entry["id"], region=region: parse(image_id, region))
