"""Where a decoder layer's attention goes: the image onto the question (MMA) and the answer onto
the image.

    python -m mma_jax.visualize --checkpoint DIR --image PATH --question TEXT --output out.png
        [--layer K] [--head H|mean] [--answer TEXT] [--max-new-tokens N] [--mask MODE]
        [section.key=value ...]

DIR is a training run (runs/<name>/, its newest readable checkpoint) or a converted checkpoint
(config.yaml + params/), loaded as eval.py loads it. The prompt is laid out as the model is asked:
the template's system block, a user turn `<image>\\n{question}`, the assistant header; then the
answer -- `--answer` (tokenized alone and appended) or else the model's greedy answer from
mma_jax.generate (the ids it produced, without the stop token). On that sequence decoder layer K
(default: the last; negative counts from the end) gives its softmax attention probabilities
(DecoderLLM.attention_probs: the dense mask of attention/mask.py under the checkpoint's mask mode,
or --mask), averaged over heads unless --head names one. Let A be those [L, L] probabilities
(rows: queries), I the T image tokens, Q the tokens after the image through the assistant role
token (the question with its end-of-turn and header tokens: everything MMA opens to the image)
and R the answer tokens:

  image_to_question_mass = mean over i in I of sum over q in Q of A[i, q]
      panel (a): a [words, T] heatmap, cell (w, i) = A[i, tokens of word w] / T, so each row sums
      to its word's mass (printed) and the rows together to image_to_question_mass; 0 under
      `causal`, where an image never sees what follows it
  answer_to_image_mass = mean over r in R of sum over i in I of A[r, i]
      panel (b): the mean answer row over the image tokens, drawn on the image on its patch grid
      when the connector keeps one row per patch (mlp), as bars over the latents otherwise
      (perceiver); it sums to answer_to_image_mass. Each answer token's own mass is printed too.

Prints `key=value` lines, the masses included, and `wrote PATH` last. Exit 2, with one line on
stderr: a missing or unreadable image or checkpoint, a layer or head out of range, a bad option.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import sys

import numpy as np

EXIT_USAGE = 2
PREVIEW_CHARS = 60       # of the answer, in the figure's title


class VisualizeError(ValueError):
  """A request this checkpoint cannot serve (layer or head out of range, not multimodal, ...)."""


# ------------------------------------------------------------------------------------ the numbers
@dataclasses.dataclass
class Maps:
  """The arrays the figure is drawn from, and the token spans they were read at."""
  layer: int
  head: str                        # "mean" or a head index
  mask: str
  answer: str
  image_span: tuple[int, int]      # [start, end) of the image tokens
  question_span: tuple[int, int]   # [image end, assistant header end)
  answer_span: tuple[int, int]     # [start, end) of the answer tokens
  words: list[str]                 # labels of the rows of image_to_words
  word_spans: list[tuple[int, int]]
  image_to_words: np.ndarray       # [W, T]: A[image token i, word w] / T
  answer_tokens: list[str]
  answer_rows: np.ndarray          # [R, T]: A[answer token r, image token i]
  grid: tuple[int, int] | None     # the image tokens' patch grid (mlp connector), else None

  @property
  def word_masses(self) -> np.ndarray:
    return self.image_to_words.sum(axis=1)

  @property
  def image_to_question_mass(self) -> float:
    return float(self.image_to_words.sum())

  @property
  def answer_token_masses(self) -> np.ndarray:
    return self.answer_rows.sum(axis=1)

  @property
  def answer_to_image(self) -> np.ndarray:
    """[T] the mean answer row: what panel (b) draws; sums to answer_to_image_mass."""
    return self.answer_rows.mean(axis=0)

  @property
  def answer_to_image_mass(self) -> float:
    return float(self.answer_to_image.sum())

  def answer_map(self) -> np.ndarray:
    """answer_to_image on the patch grid [rows, cols], or one strip [1, T] without a grid."""
    return self.answer_to_image.reshape(self.grid or (1, -1))

  def lines(self) -> list[str]:
    out = [f"answer={self.answer!r}",
           f"layer={self.layer} head={self.head} mask={self.mask} "
           f"image_tokens={self.image_span[1] - self.image_span[0]} "
           f"question_tokens={self.question_span[1] - self.question_span[0]} "
           f"answer_tokens={self.answer_span[1] - self.answer_span[0]}",
           f"image_to_question_mass={self.image_to_question_mass:.6f}"]
    out += [f"image_to_word_mass[{k}]={m:.6f} word={w!r}"
            for k, (w, m) in enumerate(zip(self.words, self.word_masses))]
    out.append(f"answer_to_image_mass={self.answer_to_image_mass:.6f}")
    out += [f"answer_token_image_mass[{k}]={m:.6f} token={t!r}"
            for k, (t, m) in enumerate(zip(self.answer_tokens, self.answer_token_masses))]
    return out


def select_head(probs: np.ndarray, head: str) -> np.ndarray:
  """[H, L, L] -> [L, L]: the mean over heads, or head `head`."""
  if head == "mean":
    return probs.mean(axis=0)
  index = int(head)
  if not 0 <= index < probs.shape[0]:
    raise VisualizeError(f"--head {head} is out of range: the layer has {probs.shape[0]} heads "
                         f"(0..{probs.shape[0] - 1}) or 'mean'")
  return probs[index]


def attention_maps(attention: np.ndarray, image_span, question_span, answer_span, word_spans
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Per-head-selected probabilities [L, L] -> (image_to_words [W, T], answer_rows [R, T]); see
  the module docstring. word_spans: absolute token spans covering question_span in order."""
  (i0, i1), (q0, q1), (r0, r1) = image_span, question_span, answer_span
  if not (i1 <= q0 <= q1 <= r0 < r1 <= attention.shape[0]):
    raise ValueError(f"spans out of order: image {image_span}, question {question_span}, "
                     f"answer {answer_span} in {attention.shape[0]} tokens")
  if word_spans[0][0] != q0 or word_spans[-1][1] != q1 or any(
      a[1] != b[0] for a, b in zip(word_spans, word_spans[1:])):
    raise ValueError(f"word spans {word_spans} do not tile the question {question_span}")
  image_rows = attention[i0:i1]                                          # [T, L]
  per_word = np.stack([image_rows[:, a:b].sum(axis=1) for a, b in word_spans])   # [W, T]
  return per_word / (i1 - i0), attention[r0:r1, i0:i1]


def group_words(ids, tokenizer, special_ids) -> list[tuple[int, int, str]]:
  """Token ids -> (start, end, label) words: a word starts at a special token, after one, at a
  token that starts with whitespace and after a whitespace-only token (`?` stays with its word)."""
  words: list[list] = []
  prev_breaks = True
  for k, token_id in enumerate(int(i) for i in ids):
    special = token_id in special_ids
    text = tokenizer.decode([token_id]) if not special else tokenizer.convert_ids_to_tokens(
        token_id)
    piece = tokenizer.convert_ids_to_tokens(token_id) or ""
    starts = special or prev_breaks or text[:1].isspace() or piece[:1] in ("\u2581", "\u0120")
    if starts or not words:
      words.append([k, k + 1, text])
    else:
      words[-1][1], words[-1][2] = k + 1, words[-1][2] + text
    prev_breaks = special or not text.strip()
  blank = str.maketrans({"\n": "\u21b5", " ": "\u00b7", "\t": "\u2192", "\r": ""})
  return [(a, b, label.strip() or label.translate(blank) or "\u00b7") for a, b, label in words]


# ------------------------------------------------------------------------------------ the model
def image_grid(config, num_tokens: int) -> tuple[int, int] | None:
  """The patch grid of the image tokens when each one is a patch (mlp connector, no CLS row)."""
  m = config.model
  side = m.vision.image_size // m.vision.patch_size
  if m.connector.type == "mlp" and num_tokens == side * side:
    return (side, side)
  return None


def compute(loaded, pixels: np.ndarray, question: str, *, answer: str | None, layer: int | None,
            head: str, max_new_tokens: int | None = None) -> Maps:
  """The maps for one image (uint8 [S, S, 3] at the tower's size) and question on a loaded model
  (mma_jax.evaluate.loading.LoadedModel)."""
  import jax
  from flax import nnx

  from mma_jax.data.images import normalize
  from mma_jax.data.tokenizer import config_layout
  from mma_jax.generate import PROMPT_FIELDS, Generator, SamplingConfig
  from mma_jax.layout import Conversation
  from mma_jax.sharding import batch_sharding, batch_shards
  from mma_jax.templates import IMAGE_TOKEN
  from mma_jax.train.loop import image_tokens

  config = loaded.config
  if config.model.kind != "mllm":
    raise VisualizeError(f"checkpoint '{loaded.path}' is not a multimodal model "
                         f"(model.kind={config.model.kind})")
  num_layers = config.model.llm.num_layers
  k = num_layers - 1 if layer is None else layer if layer >= 0 else num_layers + layer
  if not 0 <= k < num_layers:
    raise VisualizeError(f"--layer {layer} is out of range: the decoder has {num_layers} layers "
                         f"(0..{num_layers - 1}, or negative from the end)")
  if head != "mean" and not 0 <= int(head) < config.model.llm.num_heads:
    raise VisualizeError(f"--head {head} is out of range: the decoder has "
                         f"{config.model.llm.num_heads} heads (0..{config.model.llm.num_heads - 1})"
                         " or 'mean'")
  if not question.strip() or IMAGE_TOKEN in question:
    raise VisualizeError(f"--question must be non-empty text without {IMAGE_TOKEN}")

  data, vision = config.data, config.model.vision
  image_norm = vision.family if data.image_norm == "auto" else data.image_norm
  layout = config_layout(config, image_tokens(config))
  tokenizer = layout.tokenizer
  conversation = Conversation([("user", f"{IMAGE_TOKEN}\n{question}")], 1, data.system_prompt)
  prompt = layout.conversation(conversation, generation_prompt=True)
  images = normalize(pixels, image_norm)[None]                            # [1, S, S, 3]
  model = loaded.model

  if answer is None:
    generator = Generator(model, layout, tokenizer, image_size=pixels.shape[0],
                          image_norm=image_norm, mesh=loaded.mesh)
    limit = max_new_tokens or config.eval.max_new_tokens
    generation = generator.generate_examples([prompt], [images],
                                             SamplingConfig(max_new_tokens=limit))[0]
    answer_ids, answer = generation.token_ids, generation.text
    if not answer_ids:
      raise VisualizeError("the model's greedy answer is empty (it stopped at once); "
                           "pass one with --answer")
  else:
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not answer.strip() or not answer_ids:
      raise VisualizeError("--answer is empty")

  # The prompt laid out alone, then the answer as plain causal text at the following positions.
  n, r = prompt.length, len(answer_ids)
  row = {name: getattr(prompt, name) for name in PROMPT_FIELDS}
  extend = {"tokens": np.asarray(answer_ids, np.int32),
            "positions": np.arange(n, n + r, dtype=np.int32),
            "segment_ids": np.ones(r, np.int32), "window_lo": np.zeros(r, np.int32),
            "window_hi": np.zeros(r, np.int32), "image_token_index": np.full(r, -1, np.int32)}
  row = {name: np.concatenate([v, extend[name]]) for name, v in row.items()}
  shards = batch_shards(loaded.mesh)
  batch = {name: np.repeat(v[None], shards, axis=0) for name, v in row.items()}
  batch["images"] = np.repeat(images[None], shards, axis=0)                # [B, 1, S, S, 3]
  batch = {name: jax.device_put(v, batch_sharding(loaded.mesh, v.ndim))
           for name, v in batch.items()}

  graphdef, state = nnx.split(model)
  probs_fn = jax.jit(lambda state, batch: nnx.merge(graphdef, state).attention_probs(
      k, **batch)[0])
  with jax.set_mesh(loaded.mesh):
    probs = np.asarray(jax.device_get(probs_fn(state, batch)), np.float32)   # [H, L, L]
  attention = select_head(probs, head)

  (i0, i1), = prompt.image_spans.tolist()
  header_end = int(prompt.header_ends[0])
  special_ids = set(tokenizer.all_special_ids) | set(
      tokenizer.convert_tokens_to_ids(list(layout.template.special_tokens)))
  words = group_words(row["tokens"][i1:header_end], tokenizer, special_ids)
  word_spans = [(i1 + a, i1 + b) for a, b, _ in words]
  image_to_words, answer_rows = attention_maps(attention, (i0, i1), (i1, header_end),
                                               (n, n + r), word_spans)
  return Maps(layer=k, head=head, mask=config.attention.mask, answer=answer,
              image_span=(i0, i1), question_span=(i1, header_end), answer_span=(n, n + r),
              words=[w for _, _, w in words], word_spans=word_spans,
              image_to_words=image_to_words,
              answer_tokens=[tokenizer.decode([int(t)]) for t in answer_ids],
              answer_rows=answer_rows, grid=image_grid(config, i1 - i0))


# ---------------------------------------------------------------------------------- the figure
def draw(maps: Maps, pixels: np.ndarray, path: str | pathlib.Path) -> pathlib.Path:
  """Writes the two-panel PNG from `maps` alone (and the image, uint8 [S, S, 3])."""
  import matplotlib
  matplotlib.use("Agg")   # files only, no display
  import matplotlib.pyplot as plt

  words, heat = maps.words, maps.image_to_words
  tokens = heat.shape[1]
  height = max(4.5, 0.28 * len(words) + 2.5)
  fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(14, height), dpi=110,
                                   gridspec_kw={"width_ratios": (1.35, 1)})
  head = "mean over heads" if maps.head == "mean" else f"head {maps.head}"

  # (a) image tokens -> the question's words.
  image = ax_a.imshow(heat, aspect="auto", cmap="viridis", interpolation="nearest")
  ax_a.set_yticks(range(len(words)), words, fontsize=8)
  ax_a.set_xlabel("image token" + (" (patches in row-major order)" if maps.grid else " (latent)"))
  masses = ax_a.twinx()
  masses.set_ylim(ax_a.get_ylim())
  masses.set_yticks(range(len(words)), [f"{m:.4f}" for m in maps.word_masses], fontsize=7)
  masses.set_ylabel("word mass (row sum)", fontsize=8)
  fig.colorbar(image, ax=masses, fraction=0.04, pad=0.12,
               label=f"attention ÷ {tokens} image tokens")
  ax_a.set_title(f"(a) image → question, layer {maps.layer}, {head}, mask {maps.mask}\n"
                 f"image_to_question_mass = {maps.image_to_question_mass:.4f}", fontsize=9)

  # (b) answer tokens -> the image.
  answer = maps.answer if len(maps.answer) <= PREVIEW_CHARS else (
      maps.answer[:PREVIEW_CHARS] + "…")
  title = (f"(b) answer → image ({len(maps.answer_tokens)} answer tokens): "
           f"answer_to_image_mass = {maps.answer_to_image_mass:.4f}\nanswer: {answer!r}")
  size = pixels.shape[0]
  if maps.grid:
    ax_b.imshow(pixels)
    overlay = ax_b.imshow(maps.answer_map(), cmap="inferno", alpha=0.55, interpolation="nearest",
                          extent=(-0.5, size - 0.5, size - 0.5, -0.5))
    fig.colorbar(overlay, ax=ax_b, fraction=0.046, pad=0.04, label="attention (mean answer row)")
    ax_b.set_axis_off()
  else:
    strip = maps.answer_to_image
    ax_b.bar(np.arange(len(strip)), strip, color="tab:orange")
    ax_b.set_xlabel("image token (perceiver latent; no patch grid)")
    ax_b.set_ylabel("attention (mean answer row)")
    inset = ax_b.inset_axes((0.72, 0.68, 0.27, 0.3))
    inset.imshow(pixels)
    inset.set_axis_off()
  ax_b.set_title(title, fontsize=9)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------- CLI
def head_arg(value: str) -> str:
  if value == "mean" or value.isdigit():
    return value
  raise argparse.ArgumentTypeError(f"expected a head index or 'mean', got {value!r}")


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m mma_jax.visualize", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True,
                      help="a run directory (runs/<name>/) or a converted checkpoint directory")
  parser.add_argument("--image", required=True, help="the image file")
  parser.add_argument("--question", required=True)
  parser.add_argument("--output", required=True, help="the PNG to write")
  parser.add_argument("--layer", type=int, help="decoder layer (default: the last; -1 = last)")
  parser.add_argument("--head", type=head_arg, default="mean", help="a head index, or mean")
  parser.add_argument("--answer", help="the answer to look at (default: the greedy answer)")
  parser.add_argument("--max-new-tokens", type=int, help="for the greedy answer "
                      "(default eval.max_new_tokens)")
  parser.add_argument("--mask", help="attention mask mode (attention.mask): causal, mma, ...")
  parser.add_argument("overrides", nargs="*", help="section.key=value on the checkpoint's config")
  return parser.parse_args(argv)


def run(args) -> tuple[Maps, list[str]]:
  """Does what the CLI does for parsed `args`: (the maps drawn, the lines printed)."""
  from mma_jax.data.images import decode_rgb, resize_rgb, resizes_first
  from mma_jax.evaluate.loading import load_for_eval

  decode_rgb(args.image, name="--image")              # a bad image fails before the model loads
  overrides = ([f"attention.mask={args.mask}"] if args.mask else []) + list(args.overrides)
  loaded = load_for_eval(args.checkpoint, overrides)
  config = loaded.config
  if config.model.kind != "mllm":
    raise VisualizeError(f"checkpoint '{loaded.path}' is not a multimodal model "
                         f"(model.kind={config.model.kind})")
  size = config.data.image_size or config.model.vision.image_size
  pixels = resize_rgb(args.image, size, name="--image",
                      resize_first=resizes_first(config.data.flavour, inference=True))
  maps = compute(loaded, pixels, args.question, answer=args.answer, layer=args.layer,
                 head=args.head, max_new_tokens=args.max_new_tokens)
  path = draw(maps, pixels, args.output)
  return maps, maps.lines() + [f"wrote {path}"]


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S")
  logging.getLogger("absl").setLevel(logging.WARNING)
  from mma_jax.config import ConfigError
  from mma_jax.convert.safetensors_io import CheckpointError
  from mma_jax.data.images import ImageError
  from mma_jax.evaluate.loading import CheckpointNotFound
  from mma_jax.layout import ConversationError
  from mma_jax.train.loop import TrainingError

  try:
    _, lines = run(args)
  except (FileNotFoundError, ImageError, CheckpointNotFound, CheckpointError, ConfigError,
          ConversationError, TrainingError, VisualizeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  for line in lines:
    print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
