"""Short-answer VQA sources of the official AKI SFT mixture: `vqav2`, `gqa`, `ocr_vqa`.

INPUT `Answer the question using a single word or phrase. {question}`, TARGET the answer, as the
official VQADataset, GQADataset and OCRVQADataset (sft_data_utils/) with the "default" template.
Files, under the SFT data root (manual_dir):

  vqav2    VQA/v2_OpenEnded_mscoco_train2014_questions.json +
           VQA/v2_mscoco_train2014_annotations.json (joined on question_id), images VQA/train2014/COCO_{data_subtype}_{image_id:012}.jpg;
           TARGET multiple_choice_answer; id: the question_id.
           Own skip reasons: missing_annotation, annotation_mismatch (another image_id).
  gqa      GQA/train_balanced_questions.json ({question id: question}), images
           GQA/images/{imageId}.jpg; TARGET `answer` (not fullAnswer); id: the question id.
  ocr_vqa  OCRVQA/dataset.json ({book id: {imageURL, questions, answers, split}}), rows of
           split 1 (train; the others are not train rows, not skips), images
           OCRVQA/images/{book id}{extension of imageURL}; one sample (and row) per
           question/answer pair (zipped, as the official code); id: `{book id}:{pair index}`.
"""
from __future__ import annotations

import os

from etils import epath

from mma_jax.data.builder_utils import RowError
from mma_jax.data.pipeline import VQA_PROMPT
from mma_jax.data.sft.common import Sample, SftBuilder, field, load_json, manual_instructions


class Vqav2(SftBuilder):
  """VQAv2 train questions with their most common answer (the official VQADataset)."""

  name = "vqav2"
  FILES = ("VQA/v2_OpenEnded_mscoco_train2014_questions.json",
           "VQA/v2_mscoco_train2014_annotations.json", "VQA/train2014/")
  MANUAL_DOWNLOAD_INSTRUCTIONS = manual_instructions(FILES)
  HOMEPAGE = "https://visualqa.org/"

  @staticmethod
  def load_rows(root: epath.Path, options):
    """(question, its annotation or None, the data_subtype naming the image files)."""
    questions_path, annotations_path = root / Vqav2.FILES[0], root / Vqav2.FILES[1]
    questions = load_json(questions_path, Vqav2.name)
    annotations = load_json(annotations_path, Vqav2.name)
    try:
      subtype, rows = questions["data_subtype"], questions["questions"]
      answers = {a["question_id"]: a for a in annotations["annotations"]}
    except (KeyError, TypeError) as e:
      raise ValueError(f"vqav2: '{questions_path}' or '{annotations_path}' is not a VQAv2 "
                       f"questions/annotations file (missing {e})") from None
    labelled = []
    for index, q in enumerate(rows):
      question_id = q.get("question_id") if isinstance(q, dict) else None
      labelled.append((f"{index} (question_id {question_id!r})",
                       (q, answers.get(question_id), subtype)))
    return labelled

  @staticmethod
  def samples(row, options) -> list[Sample]:
    q, answer, subtype = row
    question_id, image_id = field(q, "question_id", int), field(q, "image_id", int)
    question = field(q, "question", str)
    if answer is None:
      raise RowError("missing_annotation", f"no annotation has question_id {question_id}")
    if answer.get("image_id") != image_id:
      raise RowError("annotation_mismatch", f"the annotation of question {question_id} is of "
                     f"image {answer.get('image_id')!r}, the question of image {image_id}")
    image = f"VQA/train2014/COCO_{subtype}_{image_id:012}.jpg"
    return [Sample(str(question_id), image, VQA_PROMPT.format(question=question),
                   field(answer, "multiple_choice_answer", str))]


class Gqa(SftBuilder):
  """GQA balanced train questions with their short answer (the official GQADataset)."""

  name = "gqa"
  FILES = ("GQA/train_balanced_questions.json", "GQA/images/")
  MANUAL_DOWNLOAD_INSTRUCTIONS = manual_instructions(FILES)
  HOMEPAGE = "https://cs.stanford.edu/people/dorarad/gqa/"

  @staticmethod
  def load_rows(root: epath.Path, options):
    path = root / Gqa.FILES[0]
    questions = load_json(path, Gqa.name, dict, "an object {question id: question}")
    return [(f"{key!r}", (key, q)) for key, q in questions.items()]

  @staticmethod
  def samples(row, options) -> list[Sample]:
    key, q = row
    image = f"GQA/images/{field(q, 'imageId', str)}.jpg"
    return [Sample(key, image, VQA_PROMPT.format(question=field(q, "question", str)),
                   field(q, "answer", str))]


class OcrVqa(SftBuilder):
  """OCR-VQA train books, one sample per question/answer pair (the official OCRVQADataset)."""

  name = "ocr_vqa"
  FILES = ("OCRVQA/dataset.json", "OCRVQA/images/")
  MANUAL_DOWNLOAD_INSTRUCTIONS = manual_instructions(FILES)
  HOMEPAGE = "https://ocr-vqa.github.io/"
  TRAIN_SPLIT = 1   # dataset.json's split codes: 1 train, 2 validation, 3 test

  @staticmethod
  def load_rows(root: epath.Path, options):
    """One row per question/answer pair, (book id, book, pair index); a book without question
    and answer lists is one row, (book id, book, None)."""
    path = root / OcrVqa.FILES[0]
    books = load_json(path, OcrVqa.name, dict, "an object {book id: book}")
    labelled = []
    for key, book in books.items():
      pairs = (min(len(book["questions"]), len(book["answers"]))   # zipped, as the official code
               if isinstance(book, dict) and isinstance(book.get("questions"), list)
               and isinstance(book.get("answers"), list) else None)
      if pairs is None:
        labelled.append((f"{key!r}", (key, book, None)))
      else:
        labelled += [(f"{key!r} pair {k}", (key, book, k)) for k in range(pairs)]
    return labelled

  @staticmethod
  def samples(row, options) -> list[Sample]:
    key, book, k = row
    if field(book, "split", int) != OcrVqa.TRAIN_SPLIT:
      return []
    if k is None:
      raise RowError("malformed_row", "a book needs 'questions' and 'answers' lists")
    extension = os.path.splitext(field(book, "imageURL", str))[1]
    question, answer = book["questions"][k], book["answers"][k]
    if not (isinstance(question, str) and isinstance(answer, str)):
      raise RowError("malformed_row", f"question and answer {k} must be strings, got "
                     f"{question!r}, {answer!r}")
    return [Sample(f"{key}:{k}", f"OCRVQA/images/{key}{extension}",
                   VQA_PROMPT.format(question=question), answer)]
