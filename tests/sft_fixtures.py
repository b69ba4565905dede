"""A tiny SFT data root in the original release formats of the official AKI SFT sources, at the
paths the official configs (configs/sft_datasets/*.yaml) name under `root`.

`write_root(root)` writes the good records only: what the official dataset classes can load
(tests/fixtures/official_sft/make_expected.py feeds them this root). `write_root(root,
broken=True)` adds the broken rows, each with the reason our builders skip it for (BROKEN).
Standard library and Pillow only: the script imports this file in the official code's venv.

GOOD[dataset] lists the ids our builders give the good records, in the order written, each with
a text unique within its dataset (question, caption or phrase) that identifies the record in
the official classes' output, which carries no ids.
"""
from __future__ import annotations

import json
import pathlib

from PIL import Image

# image path under the root -> (width, height); sizes match the annotation files below.
IMAGES = {
    "VQA/train2014/COCO_train2014_000000000009.jpg": (32, 24),
    "VQA/train2014/COCO_train2014_000000000025.jpg": (20, 30),
    "GQA/images/2354786.jpg": (24, 24),
    "GQA/images/n161313.jpg": (16, 20),
    "A-OKVQA/train2017/000000000139.jpg": (28, 20),
    "A-OKVQA/train2017/000000000285.jpg": (20, 20),
    "vsr/val2017/000000000632.jpg": (24, 18),
    "OCRVQA/images/0001.jpg": (18, 26),
    "OCRVQA/images/0002.gif": (16, 24),
    "ScienceQA/images/train/1/image.png": (30, 20),
    "VisualGenome/images/1.jpg": (40, 30),
    "VisualGenome/images/2.jpg": (32, 32),
    "broken/not_an_image.jpg": None,
}

VQA_QUESTIONS = [  # (question_id, image_id, question, multiple_choice_answer)
    (90, 9, "How many cookies can be seen?", "2"),
    (91, 9, "What is the table made of?", "wood"),
    (250, 25, "Is the giraffe eating?", "yes"),
]
GQA_QUESTIONS = {
    "02930152": {"imageId": "2354786", "question": "Is the sky dark?", "answer": "yes",
                 "fullAnswer": "Yes, the sky is dark."},
    "07333408": {"imageId": "n161313", "question": "What is on the white wall?", "answer": "pipe",
                 "fullAnswer": "The pipe is on the wall."},
}
VSR_LINES = [  # (image_link, caption, label)
    ("http://images.cocodataset.org/train2017/000000000139.jpg",
     "The cat is on the table.", 1),
    ("http://images.cocodataset.org/val2017/000000000632.jpg",
     "The dish is beside the fish.", 0),          # "is" inside words: the official split bug
    ("http://images.cocodataset.org/train2017/000000000285.jpg",
     "The bear is next to the bench which is red.", 1),   # two whole-word "is"
]
OCRVQA_BOOKS = {
    "0001": {"imageURL": "http://ecx.images-amazon.com/images/I/51x.jpg", "split": 1,
             "questions": ["Who wrote this book?", "What is the title of this book?"],
             "answers": ["Jane Doe", "Tiny Gardens"], "title": "Tiny Gardens"},
    "0002": {"imageURL": "http://ecx.images-amazon.com/images/I/52y.gif", "split": 1,
             "questions": ["Is this a comedy book?"], "answers": ["No"], "title": "Rocks"},
    "0003": {"imageURL": "http://ecx.images-amazon.com/images/I/53z.jpg", "split": 2,
             "questions": ["Who is the author of this validation book?"], "answers": ["X"]},
}
AOKVQA_ROWS = [
    {"split": "train", "image_id": 139, "question_id": "22MexNkBPpdZGX6sxbxVBH",
     "question": "What is the man by the bags awaiting?",
     "choices": ["skateboarder", "train", "delivery", "cab"], "correct_choice_idx": 3,
     "direct_answers": ["ride"] * 10, "difficult_direct_answer": False,
     "rationales": ["He has bags.", "A cab takes bags."]},
    {"split": "train", "image_id": 285, "question_id": "2CkdzkBXtnE4zUjn7nKbqQ",
     "question": "Where does this bear live?",
     "choices": ["zoo", "ocean", "desert", "forest"], "correct_choice_idx": 0,
     "direct_answers": ["zoo"] * 10, "difficult_direct_answer": False,
     "rationales": ["There is a fence."]},
]


def science_problem(question, choices, answer, hint, image, split="train"):
  return {"question": question, "choices": choices, "answer": answer, "hint": hint,
          "image": image, "task": "closed choice", "grade": "grade2", "subject": "natural science",
          "topic": "science", "category": "Science", "skill": "Skill",
          "lecture": "A lecture.", "solution": "A solution.", "split": split}


SCIENCEQA_PROBLEMS = {
    "1": science_problem("Which of these states is farthest north?",
                         ["West Virginia", "Louisiana", "Arizona", "Oklahoma"], 0, "",
                         "image.png"),
    "2": science_problem("Which word would you find on a dictionary page?",
                         ["hollow", "hatch", "hurry"], 2, "Look at the guide words.", None),
    "3": science_problem("Which is a validation question?", ["a", "b"], 1, "", None,
                         split="val"),
}


def mdetr(entries):
  """MDETR finetune_refcoco*_train.json from [(id, file_name, W, H, caption, bbox)]."""
  images = [{"file_name": f, "height": h, "width": w, "id": i, "original_id": 100 + i,
             "caption": c, "dataset_name": "refcoco", "tokens_negative": [[0, len(c)]]}
            for i, f, w, h, c, _ in entries]
  annotations = [{"area": 1.0, "iscrowd": 0, "image_id": i, "category_id": 1, "id": i,
                  "bbox": b, "original_id": 900 + i}
                 for i, _, _, _, _, b in entries]
  return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "p"}]}


COCO_9 = "COCO_train2014_000000000009.jpg"
COCO_25 = "COCO_train2014_000000000025.jpg"
REFCOCO = {   # file stem -> entries (ids unique per file); boxes that exercise the rounding
  "refcoco": [(1, COCO_9, 32, 24, "left cookie", [5.0, 3.0, 8.0, 9.0]),        # .15625 -> 0.156
              (2, COCO_25, 20, 30, "giraffe on right", [10.5, 0.0, 9.49, 29.99])],
  "refcoco+": [(3, COCO_9, 32, 24, "brown plate", [0.0, 0.0, 16.0, 12.0]),
               (4, COCO_25, 20, 30, "tall animal", [1.25, 2.5, 3.75, 7.5])],
  "refcocog": [(5, COCO_9, 32, 24, "a plate with two cookies on it", [2.0, 4.0, 28.0, 19.0])],
}
VG_IMAGES = [{"image_id": 1, "width": 40, "height": 30, "url": "x", "coco_id": None},
             {"image_id": 2, "width": 32, "height": 32, "url": "y", "coco_id": None}]
VG_REGIONS = [
    {"id": 1, "regions": [
        {"region_id": 1382, "image_id": 1, "x": 5, "y": 3, "width": 10, "height": 12,
         "phrase": "the clock is green in colour"},
        {"region_id": 1383, "image_id": 1, "x": 30, "y": 20, "width": 15, "height": 14,
         "phrase": "Shade Is Along The Street "},     # beyond the image: not clamped
    ]},
    {"id": 2, "regions": [
        {"region_id": 2001, "image_id": 2, "x": 0, "y": 0, "width": 32, "height": 32,
         "phrase": "a white wall"},
    ]},
]
LLAVA_ROWS = [
    {"id": "000000000139", "image": "000000000139.jpg", "conversations": [
        {"from": "human", "value": "What is the man doing?\n<image>"},
        {"from": "gpt", "value": "He is waiting for a cab with his bags."},
        {"from": "human", "value": "Is it daytime?"},
        {"from": "gpt", "value": "Yes, it is daytime."}]},
    {"id": "000000000285", "image": "000000000285.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the bear."},
        {"from": "gpt", "value": "A large brown bear sits in the grass."}]},
]

# dataset -> [(our id, the record's unique text)], in the order written.
GOOD = {
    "vqav2": [(str(q), text) for q, _, text, _ in VQA_QUESTIONS],
    "gqa": [(k, q["question"]) for k, q in GQA_QUESTIONS.items()],
    "vsr": [(str(n), caption) for n, (_, caption, _) in enumerate(VSR_LINES, 1)],
    "ocr_vqa": [(f"{key}:{k}", q) for key, book in OCRVQA_BOOKS.items() if book["split"] == 1
                for k, q in enumerate(book["questions"])],
    "aokvqa": [(r["question_id"], r["question"]) for r in AOKVQA_ROWS],
    "scienceqa": [(pid, p["question"]) for pid, p in SCIENCEQA_PROBLEMS.items()
                  if p["split"] == "train"],
    "refcoco": [(str(e[0]), e[4]) for e in REFCOCO["refcoco"]],
    "refcoco_plus": [(str(e[0]), e[4]) for e in REFCOCO["refcoco+"]],
    "refcocog": [(str(e[0]), e[4]) for e in REFCOCO["refcocog"]],
    "visual_genome": [(str(r["region_id"]), r["phrase"]) for e in VG_REGIONS
                      for r in e["regions"]],
    "llava_instruct": [(row["id"], row["conversations"][2 * k]["value"])
                       for row in LLAVA_ROWS for k in range(len(row["conversations"]) // 2)],
}

# dataset -> {reason: count} of the rows write_root(broken=True) adds (one each unless noted).
BROKEN = {
    "vqav2": {"missing_annotation": 1, "missing_image_file": 1, "malformed_row": 1},
    "gqa": {"malformed_row": 1, "undecodable_image": 1},
    "vsr": {"malformed_row": 2, "unknown_image_folder": 1, "missing_image_file": 1},
    "ocr_vqa": {"malformed_row": 1, "missing_image_file": 1, "empty_answer": 1},
    "aokvqa": {"bad_answer_index": 1, "malformed_row": 1, "missing_image_file": 1},
    "scienceqa": {"bad_answer_index": 1, "missing_image_file": 1, "malformed_row": 1},
    "refcoco": {"missing_annotation": 1, "malformed_row": 1, "missing_image_file": 1},
    "refcoco_plus": {"bad_image_size": 1},
    "refcocog": {"empty_answer": 1},
    "visual_genome": {"malformed_row": 2, "annotation_mismatch": 1, "missing_image_metadata": 1,
                      "missing_image_file": 1},
}


def write_json(path: pathlib.Path, data) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data, indent=1))


def write_images(root: pathlib.Path) -> None:
  for n, (name, size) in enumerate(IMAGES.items()):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if size is None:
      path.write_bytes(b"not an image at all")
      continue
    image = Image.new("RGB", size, (40 * n % 256, 90, 200 - 10 * n))
    image.save(path, format={".jpg": "JPEG", ".png": "PNG", ".gif": "GIF"}[path.suffix])


def write_root(root: pathlib.Path, broken: bool = False) -> pathlib.Path:
  """Writes every source's files under `root` (see the module docstring); returns root."""
  root = pathlib.Path(root)
  write_images(root)
  if broken:   # the broken image of gqa's broken row
    (root / "GQA/images/bad.jpg").write_bytes(b"not an image at all")

  questions = [{"question_id": q, "image_id": i, "question": text}
               for q, i, text, _ in VQA_QUESTIONS]
  annotations = [{"question_id": q, "image_id": i, "multiple_choice_answer": a,
                  "question_type": "what", "answer_type": "other",
                  "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": 1}]}
                 for q, i, _, a in VQA_QUESTIONS]
  if broken:
    questions += [{"question_id": 777, "image_id": 9, "question": "Which has no annotation?"},
                  {"question_id": 778, "image_id": 404, "question": "Where is the image?"},
                  {"question_id": 779, "image_id": 9}]
    annotations += [{"question_id": 778, "image_id": 404, "multiple_choice_answer": "gone"},
                    {"question_id": 779, "image_id": 9, "multiple_choice_answer": "x"}]
  write_json(root / "VQA/v2_OpenEnded_mscoco_train2014_questions.json",
             {"data_subtype": "train2014", "data_type": "mscoco", "questions": questions})
  write_json(root / "VQA/v2_mscoco_train2014_annotations.json",
             {"data_subtype": "train2014", "data_type": "mscoco", "annotations": annotations})

  gqa = dict(GQA_QUESTIONS)
  if broken:
    gqa["bad1"] = {"imageId": "2354786", "question": "No answer here?", "fullAnswer": "None."}
    gqa["bad2"] = {"imageId": "bad", "question": "Broken image?", "answer": "no",
                   "fullAnswer": "No."}
  write_json(root / "GQA/train_balanced_questions.json", gqa)

  lines = [json.dumps({"image": link.split("/")[-1], "image_link": link, "caption": caption,
                       "label": label, "relation": "on", "annotator_id": 1,
                       "vote_true_validator_id": [2], "vote_false_validator_id": []})
           for link, caption, label in VSR_LINES]
  if broken:
    lines += ['{"image_link": "http://images.cocodataset.org/train2017/000000000139.jpg", ',
              json.dumps({"image_link": "http://x/train2017/000000000139.jpg", "label": 1}),
              json.dumps({"image_link": "http://x/test2017/000000000139.jpg",
                          "caption": "The cat is far.", "label": 0}),
              json.dumps({"image_link": "http://x/val2017/000000404404.jpg",
                          "caption": "The cup is gone.", "label": 1})]
  (root / "vsr").mkdir(parents=True, exist_ok=True)
  (root / "vsr/train-random.jsonl").write_text("\n".join(lines) + "\n")

  books = dict(OCRVQA_BOOKS)
  if broken:
    books["0004"] = {"imageURL": "http://x/54.jpg", "split": 1, "answers": ["No question"]}
    books["0005"] = {"imageURL": "http://x/55.jpg", "split": 1,
                     "questions": ["Where is my cover?"], "answers": ["Lost"]}
    books["0001"] = dict(books["0001"], questions=books["0001"]["questions"] + ["Is it empty?"],
                         answers=books["0001"]["answers"] + [" "])   # one bad pair of a book
  write_json(root / "OCRVQA/dataset.json", books)

  rows = list(AOKVQA_ROWS)
  if broken:
    bad = dict(AOKVQA_ROWS[0], question_id="bad_index", question="Index out of range?")
    rows += [dict(bad, correct_choice_idx=4),
             {k: v for k, v in bad.items() if k != "choices"} | {"question_id": "no_choices"},
             dict(bad, question_id="no_image", image_id=404)]
  write_json(root / "A-OKVQA/aokvqa_v1p0_train.json", rows)

  problems = dict(SCIENCEQA_PROBLEMS)
  if broken:
    problems["4"] = science_problem("Bad answer index?", ["a", "b"], 2, "", None)
    problems["5"] = science_problem("Where is the picture?", ["a", "b"], 0, "", "image.png")
    problems["6"] = {k: v for k, v in science_problem("No hint?", ["a", "b"], 0, "", None).items()
                     if k != "hint"}
  write_json(root / "ScienceQA/problems.json", problems)

  for stem, entries in REFCOCO.items():
    data = mdetr(entries)
    if broken and stem == "refcoco":
      extra = mdetr([(11, COCO_9, 32, 24, "no box for me", [1.0, 1.0, 2.0, 2.0]),
                     (12, COCO_9, 32, 24, "bad box", [1.0, 1.0, 2.0]),
                     (13, "COCO_train2014_000000000404.jpg", 32, 24, "no image", [0, 0, 1, 1])])
      data["images"] += extra["images"]
      data["annotations"] += extra["annotations"][1:]
    if broken and stem == "refcoco+":
      extra = mdetr([(14, COCO_9, 0, 24, "zero width", [1.0, 1.0, 2.0, 2.0])])
      data["images"] += extra["images"]
      data["annotations"] += extra["annotations"]
    if broken and stem == "refcocog":
      extra = mdetr([(15, COCO_9, 32, 24, "   ", [1.0, 1.0, 2.0, 2.0])])
      data["images"] += extra["images"]
      data["annotations"] += extra["annotations"]
    write_json(root / f"ref/annotations/finetune_{stem}_train.json", data)

  regions = [dict(e, regions=list(e["regions"])) for e in VG_REGIONS]
  if broken:
    regions[0]["regions"] += [
        {"region_id": 1390, "image_id": 1, "x": 1, "y": 1, "width": 2, "height": 2},
        {"region_id": 1391, "image_id": 2, "x": 1, "y": 1, "width": 2, "height": 2,
         "phrase": "a region of another image"}]
    regions += [{"id": 3, "regions": [{"region_id": 3001, "image_id": 3, "x": 0, "y": 0,
                                       "width": 1, "height": 1, "phrase": "no size"}]},
                {"id": 4, "regions": "not a list"}]
  images = list(VG_IMAGES)
  if broken:
    regions += [{"id": 5, "regions": [{"region_id": 5001, "image_id": 5, "x": 0, "y": 0,
                                       "width": 1, "height": 1, "phrase": "no file"}]}]
    images += [{"image_id": 5, "width": 10, "height": 10}]
  write_json(root / "VisualGenome/region_descriptions.json", regions)
  write_json(root / "VisualGenome/image_data.json", images)

  write_json(root / "llava/llava_instruct_150k.json", LLAVA_ROWS)
  return root


def write_llava_manual(root: pathlib.Path, manual_dir: pathlib.Path) -> pathlib.Path:
  """The llava_instruct builder's manual_dir for the root's LLaVA-150k: train.json and images/
  linked to the files the official config names (llava/llava_instruct_150k.json,
  A-OKVQA/train2017/)."""
  manual_dir = pathlib.Path(manual_dir)
  manual_dir.mkdir(parents=True, exist_ok=True)
  (manual_dir / "train.json").symlink_to(pathlib.Path(root, "llava/llava_instruct_150k.json"))
  (manual_dir / "images").symlink_to(pathlib.Path(root, "A-OKVQA/train2017").resolve(),
                                     target_is_directory=True)
  return manual_dir
