"""easy_vqa accuracy per question type, with the two baselines that say whether a model uses the
image: the majority answer, and the text-only answer (each question's most frequent training
answer).

Accuracy is greedy exact match. For one answer followed by its end token, greedy decoding yields
exactly the gold answer iff the argmax at every answer position, given the gold prefix, is the gold
token; so one teacher-forced forward pass per example scores it (no decoding loop).
"""
from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from mma_jax.data.images import preprocess
from mma_jax.data.packing import example_fields, merge_row
from mma_jax.data.pipeline import _text, easy_vqa_input, with_system
from mma_jax.layout import ChatLayout
from mma_jax.train.loss import answer_positions

TYPES = ("yes_no", "shape", "color")


@dataclasses.dataclass
class Report:
  accuracy: float
  per_type: dict[str, float]
  majority: float
  text_only: float
  n: int

  def lines(self) -> list[str]:
    out = [f"{t}: accuracy={self.per_type[t]:.4f}" for t in TYPES if t in self.per_type]
    out.append(f"accuracy={self.accuracy:.4f} majority={self.majority:.4f} "
               f"text_only={self.text_only:.4f}")
    return out


def baselines(train_source, test_source) -> tuple[float, float]:
  """(majority, text_only) accuracies on the test split, learned from the train split."""
  by_question = collections.defaultdict(collections.Counter)
  overall = collections.Counter()
  for i in range(len(train_source)):
    record = train_source[i]
    question, answer = _text(record["question"]), _text(record["answer"])
    by_question[question][answer] += 1
    overall[answer] += 1
  majority_answer = overall.most_common(1)[0][0]
  majority = text_only = 0
  for i in range(len(test_source)):
    record = test_source[i]
    question, answer = _text(record["question"]), _text(record["answer"])
    majority += answer == majority_answer
    guess = by_question[question].most_common(1)[0][0] if question in by_question else (
        majority_answer)
    text_only += answer == guess
  return majority / len(test_source), text_only / len(test_source)


def evaluate(graphdef, params, frozen, layout: ChatLayout, source, *, image_size: int,
             image_norm: str, batch_size: int, max_length: int, limit: int = 0,
             system_prompt: str | None = None) -> dict:
  """{question type: (correct, total)} over `source` (a tfds easy_vqa split)."""

  @functools.partial(jax.jit, static_argnames="answer_slots")
  def correct_rows(params, frozen, batch, answer_slots):
    model = nnx.merge(graphdef, params, frozen)
    # The head runs on the answer positions only: [B, slots, V], not [B, L, V].
    index, valid, _ = answer_positions(batch["loss_mask"], answer_slots)
    hidden = jnp.take_along_axis(model.hidden(**batch), index[..., None], axis=1)
    predicted = jnp.argmax(model.logits(hidden), axis=-1)
    wrong = (predicted != jnp.take_along_axis(batch["targets"], index, axis=1)) & valid
    return ~jnp.any(wrong, axis=1)

  n = len(source) if not limit else min(limit, len(source))
  tally = collections.defaultdict(lambda: [0, 0])
  for start in tqdm(range(0, n, batch_size), desc="eval easy_vqa", unit="batch", leave=False):
    records = [source[i] for i in range(start, min(start + batch_size, n))]
    rows, images = [], []
    for record in records:
      item = easy_vqa_input(record)
      conversation = with_system(item.conversation, system_prompt)
      rows.append(merge_row([example_fields(layout.conversation(conversation))],
                            max_length, layout.num_image_tokens))
      images.append(preprocess(item.images[0], image_size, image_norm))
    pad = batch_size - len(rows)   # a full batch keeps one compiled shape
    rows += [rows[-1]] * pad
    images += [images[-1]] * pad
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch["images"] = np.stack(images)[:, None]
    batch["image_valid"] = np.ones((batch_size, 1), bool)
    slots = 1 << int(np.max(np.sum(batch["loss_mask"] > 0, axis=1))).bit_length()
    correct = np.asarray(correct_rows(params, frozen, batch, slots))[:len(records)]
    for record, ok in zip(records, correct):
      kind = _text(record["question_type"])
      tally[kind][0] += int(ok)
      tally[kind][1] += 1
  return dict(tally)


def report(tally: dict, majority: float, text_only: float) -> Report:
  correct = sum(c for c, _ in tally.values())
  total = sum(t for _, t in tally.values())
  return Report(accuracy=correct / max(total, 1),
                per_type={k: c / t for k, (c, t) in tally.items()},
                majority=majority, text_only=text_only, n=total)
