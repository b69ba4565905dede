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
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from mma_jax.data.images import preprocess, resizes_first
from mma_jax.data.packing import example_fields, merge_row
from mma_jax.data.pipeline import as_text, easy_vqa_input, with_system
from mma_jax.layout import ChatLayout
from mma_jax.sharding import batch_sharding, batch_shards
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
    question, answer = as_text(record["question"]), as_text(record["answer"])
    by_question[question][answer] += 1
    overall[answer] += 1
  majority_answer = overall.most_common(1)[0][0]
  majority = text_only = 0
  for i in range(len(test_source)):
    record = test_source[i]
    question, answer = as_text(record["question"]), as_text(record["answer"])
    majority += answer == majority_answer
    guess = by_question[question].most_common(1)[0][0] if question in by_question else (
        majority_answer)
    text_only += answer == guess
  return majority / len(test_source), text_only / len(test_source)


def evaluate(graphdef, params, frozen, layout: ChatLayout, source, *, image_size: int,
             image_norm: str, batch_size: int, max_length: int, limit: int = 0,
             system_prompt: str | None = None, mesh: Mesh | None = None,
             on_result: Callable[[int, dict, bool], None] | None = None,
             progress: bool = True, resize_first: bool = False) -> dict:
  """{question type: (correct, total)} over `source` (a tfds easy_vqa split).

  With a mesh, each batch is split over its data x fsdp axes (padded to a multiple of them).
  on_result(i, record, correct) is called per scored example (predictions files)."""
  shards = batch_shards(mesh)
  rows_per_batch = -(-batch_size // shards) * shards
  # With a mesh the result is replicated: every host reads all of it.
  jit_options = {} if mesh is None else {"out_shardings": NamedSharding(mesh, P())}

  @functools.partial(jax.jit, static_argnames="answer_slots", **jit_options)
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
  for start in tqdm(range(0, n, batch_size), desc="eval easy_vqa", unit="batch", leave=False,
                    disable=not progress):
    records = [source[i] for i in range(start, min(start + batch_size, n))]
    rows, images = [], []
    for record in records:
      item = easy_vqa_input(record)
      conversation = with_system(item.conversation, system_prompt)
      rows.append(merge_row([example_fields(layout.conversation(conversation))],
                            max_length, layout.num_image_tokens))
      images.append(preprocess(item.images[0], image_size, image_norm,
                               resize_first=resize_first))
    pad = rows_per_batch - len(rows)   # a full batch keeps one compiled shape
    rows += [rows[-1]] * pad
    images += [images[-1]] * pad
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch["images"] = np.stack(images)[:, None]
    batch["image_valid"] = np.ones((rows_per_batch, 1), bool)
    slots = 1 << int(np.max(np.sum(batch["loss_mask"] > 0, axis=1))).bit_length()
    if mesh is None:
      correct = correct_rows(params, frozen, batch, slots)
    else:
      with jax.set_mesh(mesh):
        correct = correct_rows(params, frozen, shard_batch(batch, mesh), slots)
    for i, (record, ok) in enumerate(zip(records, np.asarray(correct)), start=start):
      kind = as_text(record["question_type"])
      tally[kind][0] += int(ok)
      tally[kind][1] += 1
      if on_result is not None:
        on_result(i, record, bool(ok))
  return dict(tally)


def report(tally: dict, majority: float, text_only: float) -> Report:
  correct = sum(c for c, _ in tally.values())
  total = sum(t for _, t in tally.values())
  return Report(accuracy=correct / max(total, 1),
                per_type={k: c / t for k, (c, t) in tally.items()},
                majority=majority, text_only=text_only, n=total)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """A global batch (the same numpy arrays on every host) -> arrays split over data x fsdp; each
  host places only the rows of its own devices."""
  return {k: jax.make_array_from_callback(v.shape, batch_sharding(mesh, v.ndim),
                                          lambda index, v=v: v[index])
          for k, v in batch.items()}


def evaluate_config(config, graphdef, params, frozen, *, mesh: Mesh | None = None,
                    on_result: Callable[[int, dict, bool], None] | None = None,
                    progress: bool = True) -> Report:
  """The test-split report of an easy_vqa run config (eval.limit, eval.batch_size, the template,
  tokenizer, system prompt and mask mode of the run): what train.py prints at the end of a run
  and eval.py prints for its checkpoint."""
  import tensorflow_datasets as tfds

  import mma_jax.data  # noqa: F401  registers the builders
  from mma_jax.data.tokenizer import config_layout
  from mma_jax.train.loop import image_tokens

  data, vision = config.data, config.model.vision
  source = lambda split: tfds.data_source("easy_vqa", split=split, data_dir=data.data_dir or None)
  layout = config_layout(config, image_tokens(config))
  tally = evaluate(graphdef, params, frozen, layout, source(data.eval_split),
                   image_size=data.image_size or vision.image_size,
                   image_norm=vision.family if data.image_norm == "auto" else data.image_norm,
                   batch_size=config.eval.batch_size, max_length=data.max_length,
                   limit=config.eval.limit, system_prompt=data.system_prompt, mesh=mesh,
                   on_result=on_result, progress=progress,
                   resize_first=resizes_first(data.flavour, inference=True))
  majority, text_only = baselines(source(data.train_split), source(data.eval_split))
  return report(tally, majority, text_only)
