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

from etils import epath

from mma_jax.data.builder_utils import RowError
from mma_jax.data.sft.common import (NUMBER, REGION_PROMPT, Sample, SftBuilder, box_text, field,
                                     load_json, manual_instructions)


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

  def row_options(self) -> str:
    return self.FILES[0]   # which annotation file

  @staticmethod
  def load_rows(root: epath.Path, annotation_file: str):
    """(MDETR image entry, its annotation or None)."""
    path = root / annotation_file
    data = load_json(path, annotation_file)
    try:
      entries = data["images"]
      boxes = {}
      for annotation in data["annotations"]:
        boxes.setdefault(annotation["image_id"], annotation)
    except (KeyError, TypeError) as e:
      raise ValueError(f"'{path}' is not an MDETR annotation file (`images` and `annotations` "
                       f"with image_id; {e!r})") from None
    labelled = []
    for index, entry in enumerate(entries):
      entry_id = entry.get("id") if isinstance(entry, dict) else None
      box = boxes.get(entry_id) if isinstance(entry_id, int) else None
      labelled.append((f"{index} (id {entry_id!r})", (entry, box)))
    return labelled

  @staticmethod
  def samples(row, annotation_file) -> list[Sample]:
    entry, annotation = row
    entry_id = field(entry, "id", int)
    if annotation is None:
      raise RowError("missing_annotation", f"no annotation has image_id {entry_id}")
    x, y, w, h = xywh(field(annotation, "bbox", list))
    box = box_text(x, y, w, h, *image_size(entry))
    image = f"VQA/train2014/{field(entry, 'file_name', str)}"
    return [Sample(str(entry_id), image, REGION_PROMPT.format(bbox=box),
                   field(entry, "caption", str))]


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

  @staticmethod
  def load_rows(root: epath.Path, options):
    """One row per region: (image id, region, the image's size row or None); an image entry
    without an id or a regions list is one row: (None, the entry, None)."""
    regions_path, images_path = root / VisualGenome.FILES[0], root / VisualGenome.FILES[1]
    images = load_json(images_path, VisualGenome.name)
    regions = load_json(regions_path, VisualGenome.name)
    if not (isinstance(images, list) and isinstance(regions, list)):
      raise ValueError(f"visual_genome: '{regions_path}' and '{images_path}' must hold JSON "
                       f"lists")
    sizes = {m.get("image_id"): m for m in images if isinstance(m, dict)}
    labelled = []
    for index, entry in enumerate(regions):
      if not (isinstance(entry, dict) and isinstance(entry.get("id"), int)
              and isinstance(entry.get("regions"), list)):
        labelled.append((f"image entry {index}", (None, entry, None)))
        continue
      image_id = entry["id"]
      for k, region in enumerate(entry["regions"]):
        labelled.append((f"region {k} of image entry {index} (id {image_id})",
                         (image_id, region, sizes.get(image_id))))
    return labelled

  @staticmethod
  def samples(row, options) -> list[Sample]:
    image_id, region, size = row
    if image_id is None:
      raise RowError("malformed_row", "an image entry needs an int 'id' and a 'regions' list")
    region_id = field(region, "region_id", int)
    if field(region, "image_id", int) != image_id:
      raise RowError("annotation_mismatch", f"region {region_id} is of image "
                     f"{region['image_id']}, listed under image {image_id}")
    if size is None:
      raise RowError("missing_image_metadata", f"image_data.json has no image_id {image_id}")
    box = box_text(*(field(region, k, NUMBER) for k in ("x", "y", "width", "height")),
                   *image_size(size))
    return [Sample(str(region_id), f"VisualGenome/images/{image_id}.jpg",
                   REGION_PROMPT.format(bbox=box), field(region, "phrase", str))]
