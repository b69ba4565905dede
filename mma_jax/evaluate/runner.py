"""Runs a benchmark on a loaded model and returns its report and per-question predictions.

- easy_vqa: mma_jax.evaluate.easy_vqa, unchanged (teacher-forced exact match with the run's
  eval settings), so the numbers are the ones training printed for the same checkpoint.
- VLMEvalKit TSV files: each question becomes a one-turn conversation (prompts.py), is answered
  by greedy generation (mma_jax.generate) and scored by scoring.py; multiple-choice questions
  can instead be answered by the option the model finds most likely (mode "loglik": the
  log-likelihood of each option's text as the answer, or of its letter; summed over the option's
  tokens, or averaged over them to be fair to long options). With an output directory the
  predictions are appended to predictions.jsonl batch by batch, and a re-run answers only the
  batches not yet there (predictions.PredictionLog): the same batches as one uninterrupted run,
  so the same answers.
  A question that cannot be asked (its conversation does not lay out, its image does not decode,
  its prompt and answer would not fit the model's positions) is skipped like a malformed row.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterator

from tqdm import tqdm

from mma_jax.data.images import ImageError, resize_rgb, resizes_first
from mma_jax.evaluate import prompts, scoring
from mma_jax.evaluate.loading import LoadedModel
from mma_jax.evaluate.predictions import PredictionLog
from mma_jax.evaluate.report import build_report
from mma_jax.evaluate.tables import accuracy, grouped
from mma_jax.evaluate.tsv import Benchmark, Question, Skipped
from mma_jax.layout import Conversation, ConversationError
from mma_jax.sharding import batch_shards

logger = logging.getLogger(__name__)

MODES = ("generate", "loglik")
LOGLIK_CHOICES = ("text", "letter")


class EvalError(ValueError):
  """A benchmark this checkpoint cannot be evaluated on (user error)."""


class SkipQuestion(ValueError):
  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass
class Prepared:
  question: Question
  conversation: object
  images: list                     # uint8 [S, S, 3] each, resized for the tower


def settings_of(loaded: LoadedModel, mode: str) -> dict:
  c = loaded.config
  return {"mode": mode, "batch_size": c.eval.batch_size, "limit": c.eval.limit,
          "max_new_tokens": c.eval.max_new_tokens, "prompts": c.eval.prompts,
          "mask": c.attention.mask,
          "template": c.data.template, "tokenizer": c.data.tokenizer,
          "system_prompt": c.data.system_prompt,
          "mesh": {axis: int(size) for axis, size in loaded.mesh.shape.items()}}


# --------------------------------------------------------------------------------------- easy_vqa
def run_easy_vqa(loaded: LoadedModel, progress: bool = True) -> tuple[dict, list[dict], list[str]]:
  """(report, predictions, the lines train.py prints)."""
  from mma_jax.data.builder_utils import prepare_packaged
  from mma_jax.data.pipeline import as_text
  from mma_jax.evaluate import easy_vqa

  config = loaded.config
  prepare_packaged("easy_vqa", config.data.data_dir)
  predictions = []

  def keep(i, record, correct):
    predictions.append({"index": i, "question": as_text(record["question"]),
                        "question_type": as_text(record["question_type"]),
                        "generation": None, "extracted": None,
                        "answer": as_text(record["answer"]), "correct": correct})

  result = easy_vqa.evaluate_config(config, loaded.graphdef, loaded.params, loaded.frozen,
                                    mesh=loaded.mesh, on_result=keep, progress=progress)
  per_type = grouped(predictions, "question_type",
                     lambda rows: accuracy(r["correct"] for r in rows))
  metrics = {"overall": {"accuracy": result.accuracy, "majority": result.majority,
                         "text_only": result.text_only, "n": result.n},
             "question_type": {t: per_type[t] for t in easy_vqa.TYPES if t in per_type}}
  report = build_report(
      benchmark="easy_vqa", source=f"tfds easy_vqa split {config.data.eval_split!r}",
      task="vqa", scoring="easy_vqa", metrics=metrics, n_scored=result.n, skipped=[],
      checkpoint=loaded.describe(),
      settings=settings_of(loaded, "teacher_forced") | {"data_dir": config.data.data_dir})
  return report, predictions, result.lines()


# -------------------------------------------------------------------------------------------- TSV
def first_rows(benchmark: Benchmark, limit: int) -> tuple[list[Question], list[Skipped]]:
  """The questions and skipped rows among the first `limit` data rows (0: all)."""
  if not limit:
    return list(benchmark.questions), list(benchmark.skipped)
  rows = sorted([q.row for q in benchmark.questions] + [s.row for s in benchmark.skipped])
  last = rows[min(limit, len(rows)) - 1] if rows else 0
  return ([q for q in benchmark.questions if q.row <= last],
          [s for s in benchmark.skipped if s.row <= last])


class TsvRun:
  """One TSV benchmark on one model: prepares, batches, asks and scores."""

  def __init__(self, loaded: LoadedModel, benchmark: Benchmark, mode: str = "generate",
               generator=None, *, loglik_choices: str = "text", length_normalized: bool = False):
    """generator: a mma_jax.generate.Generator for the loaded model (default: built here);
    loglik_choices: rank the options' texts or their letters; length_normalized: by the mean
    log-probability per token instead of the sum."""
    from mma_jax.data.tokenizer import config_layout
    from mma_jax.train.loop import image_tokens

    config = loaded.config
    if config.model.kind != "mllm":
      raise EvalError(f"checkpoint '{loaded.path}' is not a multimodal model "
                      f"(model.kind={config.model.kind}); image benchmarks need one")
    if mode not in MODES:
      raise EvalError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if mode == "loglik" and benchmark.task != "multiple_choice":
      raise EvalError(f"--mode loglik ranks options: {benchmark.name} is a {benchmark.task} "
                      "benchmark, not multiple choice")
    if loglik_choices not in LOGLIK_CHOICES:
      raise EvalError(f"unknown loglik choices {loglik_choices!r}; choose one of: "
                      f"{', '.join(LOGLIK_CHOICES)}")
    self.loaded, self.benchmark, self.mode = loaded, benchmark, mode
    self.loglik_choices, self.length_normalized = loglik_choices, length_normalized
    data, vision = config.data, config.model.vision
    self.image_size = data.image_size or vision.image_size
    image_norm = vision.family if data.image_norm == "auto" else data.image_norm
    self.resize_first = resizes_first(data.flavour, inference=True)
    self.layout = config_layout(config, image_tokens(config))
    tokenizer = self.layout.tokenizer
    if generator is None:
      from mma_jax.generate import Generator
      generator = Generator(loaded.model, self.layout, tokenizer, image_size=self.image_size,
                            image_norm=image_norm, mesh=loaded.mesh,
                            resize_first=self.resize_first)
    self.generator = generator
    shards = batch_shards(loaded.mesh)
    # Full batches, split evenly over data x fsdp: one compiled shape, no idle device.
    self.rows_per_batch = -(-config.eval.batch_size // shards) * shards
    self.max_positions = config.model.llm.max_position_embeddings

  def sampling(self):
    from mma_jax.generate import SamplingConfig
    # Greedy (DESIGN.md §7); the generator stops at the template's end tokens and the model's EOS.
    return SamplingConfig(max_new_tokens=self.loaded.config.eval.max_new_tokens, temperature=0.0)

  # -------------------------------------------------------------------------------- preparing
  def prepare(self, question: Question) -> Prepared:
    config = self.loaded.config
    conversation = prompts.conversation(question, self.benchmark.task, config.data.system_prompt,
                                        config.data.flavour, benchmark=self.benchmark.name,
                                        style=config.eval.prompts)
    example = self.layout.conversation(conversation, generation_prompt=True)
    if self.mode == "generate":
      need = example.length + config.eval.max_new_tokens
    else:   # the prompt answered by its longest option
      need = max(self.layout.conversation(Conversation(
          [*conversation.turns, ("assistant", choice)], conversation.num_images,
          conversation.system)).length for choice in self._choices(question))
    if need > self.max_positions:
      raise SkipQuestion("too_long", f"the prompt has {example.length} tokens; with the "
                              f"answer it needs {need} positions, the model has "
                              f"{self.max_positions}")
    label = f"{self.benchmark.path} index {question.index}"
    images = [resize_rgb(image, self.image_size, name=label, resize_first=self.resize_first)
              for image in question.images]
    return Prepared(question, conversation, images)

  def batches(self, questions: list[Question], skipped: list[Skipped],
              progress: tqdm | None) -> Iterator[list[Prepared]]:
    """Batches of prepared questions; the ones that fail are added to `skipped`."""
    batch = []
    for question in questions:
      try:
        batch.append(self.prepare(question))
      except (ConversationError, ImageError, SkipQuestion) as e:
        reason = e.reason
        logger.warning("%s: skipping row index %s (%s): %s", self.benchmark.path,
                       question.index, reason, e)
        skipped.append(Skipped(question.index, question.row, reason, str(e)))
        if progress is not None:
          progress.update(1)
      if len(batch) == self.rows_per_batch:
        yield batch
        batch = []
    if batch:
      yield batch

  # ---------------------------------------------------------------------------------- asking
  def answer(self, batch: list[Prepared]) -> list[dict]:
    pad = self.rows_per_batch - len(batch)
    conversations = [p.conversation for p in batch] + [batch[-1].conversation] * pad
    images = [p.images for p in batch] + [batch[-1].images] * pad
    if self.mode == "loglik":
      choices = [self._choices(p.question) for p in batch]
      choices += [choices[-1]] * pad
      scored = self.generator.option_logprobs(conversations, images, choices)
      return [self._loglik_row(p, s) for p, s in zip(batch, scored)]
    generations = self.generator.generate(conversations, images, self.sampling())
    return [self._generated_row(p, g) for p, g in zip(batch, generations)]

  def _generated_row(self, prepared: Prepared, generation) -> dict:
    # The text unstripped, as VLMEvalKit keeps a prediction; scoring.score_rows scores it.
    return scoring.question_row(prepared.question) | {
        "generation": generation.text, "finish_reason": generation.finish_reason}

  def _choices(self, question: Question) -> list[str]:
    """What loglik scores as the answer, per option: its text or its letter."""
    if self.loglik_choices == "letter":
      return list(question.options)
    return [str(text) for text in question.options.values()]

  def _loglik_row(self, prepared: Prepared, scored: list[tuple[float, int]]) -> dict:
    """scored: per option, (summed log-probability, tokens), as Generator.option_logprobs."""
    question = prepared.question
    letters = list(question.options)
    logprobs = {letter: float(s) for letter, (s, _) in zip(letters, scored)}
    tokens = {letter: int(n) for letter, (_, n) in zip(letters, scored)}
    ranked = ({l: logprobs[l] / max(tokens[l], 1) for l in letters} if self.length_normalized
              else logprobs)
    extracted = max(letters, key=ranked.get)
    return scoring.question_row(question) | {
        "generation": None, "option_logprobs": logprobs, "option_tokens": tokens,
        "extracted": extracted}

  # ------------------------------------------------------------------------------------ all
  def settings(self) -> dict:
    extra = ({"loglik_choices": self.loglik_choices, "length_normalized": self.length_normalized}
             if self.mode == "loglik" else {})
    return settings_of(self.loaded, self.mode) | extra

  def identity(self) -> dict:
    """What must not change between an interrupted eval and its re-run."""
    path = self.benchmark.path
    return {"benchmark": str(path), "benchmark_bytes": path.stat().st_size if path.is_file()
            else None, "checkpoint": self.loaded.describe(), "settings": self.settings()}

  def run(self, progress: bool = True, log: PredictionLog | None = None
          ) -> tuple[dict, list[dict]]:
    """(report, predictions) over the first eval.limit rows; with a log, batches it already holds
    are read back instead of answered, and new ones are appended to it."""
    questions, skipped = first_rows(self.benchmark, self.loaded.config.eval.limit)
    done = log.done if log is not None else {}
    bar = tqdm(total=len(questions), desc=f"eval {self.benchmark.name}", unit="question",
               disable=not progress)
    if done:
      logger.info("%s: %d predictions already in %s", self.benchmark.name, len(done), log.path)
    predictions = []
    for batch in self.batches(questions, skipped, bar):
      if all(p.question.index in done for p in batch):
        rows = [done[p.question.index] for p in batch]
      else:
        rows = self.answer(batch)
        if log is not None:
          log.append(rows)
      predictions += rows
      bar.update(len(batch))
    bar.close()
    skipped.sort(key=lambda s: s.row)
    return scoring.scored_report(self.benchmark, scoring.with_predictions(predictions), skipped,
                                 checkpoint=self.loaded.describe(), settings=self.settings())
