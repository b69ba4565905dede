"""Small manual_dir fixtures for the llava_instruct and image_captions builders: multi-turn and
multi-image rows, images in several modes and sizes, and deliberately broken rows, each with the
reason it must be skipped for."""
import json
import pathlib

import numpy as np
from PIL import Image


def write_images(images_dir: pathlib.Path) -> None:
  """Images in the modes real data has: RGB, RGBA, grayscale, palette, JPEG; and one fake."""
  images_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  pixels = lambda h, w, c: rng.integers(0, 256, (h, w, c), dtype=np.uint8)
  Image.fromarray(pixels(40, 56, 3)).save(images_dir / "rgb.png")
  Image.fromarray(pixels(32, 32, 4)).save(images_dir / "rgba.png")
  Image.fromarray(pixels(20, 30, 1)[..., 0]).save(images_dir / "gray.png")
  Image.fromarray(pixels(24, 24, 3)).convert("P").save(images_dir / "palette.png")
  Image.fromarray(pixels(48, 36, 3)).save(images_dir / "photo.jpg")
  (images_dir / "broken.jpg").write_bytes(b"this is not a JPEG at all")


def human(value):
  return {"from": "human", "value": value}


def gpt(value):
  return {"from": "gpt", "value": value}


LONG_ANSWER = " ".join(["The shapes are arranged in a long and winding line."] * 20)

# (row, None if kept else the reason it is skipped)
LLAVA_ROWS = [
    ({"id": "single", "image": "rgb.png",
      "conversations": [human("<image>\nWhat is shown?"), gpt("Noise.")]}, None),
    ({"id": "multi_turn", "image": "photo.jpg",
      "conversations": [human("What colour dominates?\n<image>"), gpt("None really."),
                        human("Is it a photo?"), gpt("It is a JPEG."),
                        human("Any text?"), gpt("No.")]}, None),
    ({"id": "two_images", "image": ["rgba.png", "gray.png"],
      "conversations": [human("<image> <image>\nWhich is grey?"), gpt("The second.")]}, None),
    ({"id": "image_per_turn", "image": ["palette.png", "rgb.png"],
      "conversations": [human("<image>\nDescribe it."), gpt("Coloured dots."),
                        human("And this one? <image>"), gpt("More dots.")]}, None),
    ({"id": "text_only",
      "conversations": [human("Say hello."), gpt("Hello.")]}, None),
    ({"id": "long_answer", "image": "rgb.png",
      "conversations": [human("<image>\nDescribe at length."), gpt(LONG_ANSWER)]}, None),
    ({"id": "missing_file", "image": "nowhere.png",
      "conversations": [human("<image>\nWhat?"), gpt("Nothing.")]}, "missing_image_file"),
    ({"id": "broken_file", "image": "broken.jpg",
      "conversations": [human("<image>\nWhat?"), gpt("Nothing.")]}, "undecodable_image"),
    ({"id": "robot", "image": "rgb.png",
      "conversations": [human("<image>\nWho?"), {"from": "robot", "value": "Me."}]},
     "unknown_role"),
    ({"id": "no_conversations", "image": "rgb.png"}, "malformed_row"),
    ({"id": "gpt_first", "image": "rgb.png",
      "conversations": [gpt("Hi."), human("<image>\nWhat?")]}, "bad_turn_order"),
    ({"id": "no_placeholder", "image": "rgb.png",
      "conversations": [human("What is it?"), gpt("Dots.")]}, "image_count_mismatch"),
    ({"id": "unanswered", "image": "rgb.png",
      "conversations": [human("<image>\nWhat?"), gpt("Dots."), human("And?")]},
     "missing_answer"),
    ({"id": "empty_answer", "image": "rgb.png",
      "conversations": [human("<image>\nWhat?"), gpt("  ")]}, "empty_answer"),
]


def write_llava(manual_dir: pathlib.Path) -> None:
  write_images(manual_dir / "images")
  rows = [row for row, _ in LLAVA_ROWS] + ["not an object"]
  (manual_dir / "train.json").write_text(json.dumps(rows))


LLAVA_KEPT = [row["id"] for row, reason in LLAVA_ROWS if reason is None]
LLAVA_SKIPPED = {"missing_image_file": 1, "undecodable_image": 1, "unknown_role": 1,
                 "malformed_row": 2, "bad_turn_order": 1, "image_count_mismatch": 1,
                 "missing_answer": 1, "empty_answer": 1}

CAPTION_LINES = [
    (json.dumps({"image": "rgb.png", "caption": "Coloured noise."}), None),
    (json.dumps({"image": "photo.jpg", "caption": "A noisy photo."}), None),
    (json.dumps({"image": "gray.png", "caption": "Grey noise."}), None),
    (json.dumps({"image": "rgba.png", "caption": "Noise with alpha."}), None),
    ("", None),                                              # blank: not a row
    ('{"image": "rgb.png", "caption": ', "malformed_row"),   # cut-off JSON
    (json.dumps({"image": "rgb.png"}), "malformed_row"),
    (json.dumps({"image": "rgb.png", "caption": " "}), "empty_caption"),
    (json.dumps({"image": "rgb.png", "caption": "An <image> here."}), "image_outside_user_turn"),
    (json.dumps({"image": "nowhere.png", "caption": "Lost."}), "missing_image_file"),
    (json.dumps({"image": "broken.jpg", "caption": "Broken."}), "undecodable_image"),
]
CAPTIONS_KEPT = ["rgb.png", "photo.jpg", "gray.png", "rgba.png"]
CAPTIONS_SKIPPED = {"malformed_row": 2, "empty_caption": 1, "image_outside_user_turn": 1,
                    "missing_image_file": 1, "undecodable_image": 1}


def write_captions(manual_dir: pathlib.Path) -> None:
  write_images(manual_dir / "images")
  (manual_dir / "train.jsonl").write_text("\n".join(line for line, _ in CAPTION_LINES) + "\n")
