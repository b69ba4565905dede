"""Generation speed: time to first token and decode tokens/s, ours vs transformers LLaVA generate.

Both sides run the same model: a random LlavaForConditionalGeneration (Llama decoder, CLIP tower,
MLP projector) built by transformers from a config (offline), saved with save_pretrained, imported
by our converter (the `python -m mma_jax.convert import --format llava` operation,
convert.operations.import_checkpoint) and loaded from the converted checkpoint:
  ours          mma_jax.generate.Generator.generate_examples: one jitted prefill (vision tower,
                projector, the whole prompt) then the jitted decode loop over the static KV cache
  transformers  LlavaForConditionalGeneration.generate (its default attention, DynamicCache)
Greedy; every row is [bos][image rows][text]; the same ids and pixel values on both sides, all
rows of a batch the same length (no padding on either side: ours uses length_multiple 1). Both
sides generate exactly --new-tokens tokens: the model has no eos id (text_config.eos_token_id =
None), transformers gets min_new_tokens = max_new_tokens, ours no stop ids. The greedy tokens of
every row must agree (printed as the check; the script exits 1 otherwise).

  TTFT          the median time of a call with max_new_tokens=1 (prefill + first token, inputs on
                the host before, token ids on the host after)
  total         the median time of a call with max_new_tokens=N
  decode tok/s  (N - 1) * batch / (total - TTFT): the tokens after the first, per second
Per batch size, warm-up first: ours one call of each kind (the XLA compile of both programs,
reported as compile_s = the first calls' time over the warm medians), transformers one call with
max_new_tokens=2 (prefill and a cached decode step; no compile, and a full-length warm-up call
would add minutes at the default size); then --repeats rounds of the four calls (the order
rotates per round); medians. The token check uses the last round's outputs. Progress goes to
stderr. float32 on CPU; torch.set_num_threads(cores)
(--torch-threads to change it), XLA uses all cores by default.

  python bench/generate.py [--size tiny|small] [--new-tokens N] [--batch-sizes 1 8]
                           [--repeats R] [--torch-threads T]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from mma_jax.convert import operations  # noqa: E402
from mma_jax.convert.llava import LLAVA  # noqa: E402
from mma_jax.convert.store import load_model  # noqa: E402
from mma_jax.convert.transfer import build_with_params  # noqa: E402
from mma_jax.data.tokenizer import load_tokenizer  # noqa: E402
from mma_jax.generate import Generator, SamplingConfig  # noqa: E402
from mma_jax.layout import ChatLayout  # noqa: E402
from mma_jax.models import build_model  # noqa: E402
from run_header import run_header  # noqa: E402  (bench/, the script's folder)

SIZES = {
    # (Llama text config, CLIP vision config, text tokens per prompt)
    "tiny": (dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8), 16),
    "small": (dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                   num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12),
              dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                   num_attention_heads=6, image_size=224, patch_size=16), 64),
}
BOS = 1


def llava_config(size: str) -> transformers.LlavaConfig:
  text, vision, _ = SIZES[size]
  vocab = text["vocab_size"]
  return transformers.LlavaConfig(
      text_config=transformers.LlamaConfig(**text, max_position_embeddings=2048,
                                           bos_token_id=BOS, eos_token_id=None, pad_token_id=0),
      vision_config=transformers.CLIPVisionConfig(**vision),
      image_token_index=vocab - 1)


def prompts(config: transformers.LlavaConfig, rows: int, text_tokens: int, batch: int,
            seed: int = 0):
  """(ids [B, L] int32 with the image rows expanded, pixels [B, H, W, 3] float32)."""
  rng = np.random.default_rng(seed)
  image_id = config.image_token_index
  length = 1 + rows + text_tokens
  ids = rng.integers(3, image_id, size=(batch, length)).astype(np.int32)
  ids[:, 0], ids[:, 1:rows + 1] = BOS, image_id
  size = config.vision_config.image_size
  pixels = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  return ids, pixels


def our_examples(ids: np.ndarray, rows: int) -> list[dict]:
  """The prompt fields of each row (causal: no windows; image rows at 1..rows)."""
  length = ids.shape[1]
  index = np.full(length, -1, np.int32)
  index[1:rows + 1] = np.arange(rows)
  zeros = np.zeros(length, np.int32)
  return [{"tokens": row, "positions": np.arange(length, dtype=np.int32),
           "segment_ids": np.ones(length, np.int32), "window_lo": zeros, "window_hi": zeros,
           "image_token_index": index} for row in ids]


def progress(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def first_difference(a: np.ndarray, b: np.ndarray) -> str:
  rows, cols = np.nonzero(a != b)
  return f"row {rows[0]} token {cols[0]}" if rows.size else "none"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="small")
  parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (>= 2)")
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--repeats", type=int, default=3, help="timed rounds per batch size")
  parser.add_argument("--torch-threads", type=int, default=None,
                      help="torch.set_num_threads (default: the core count)")
  args = parser.parse_args(argv)
  if args.new_tokens < 2 or args.repeats < 1:
    parser.error("--new-tokens must be >= 2 (decode tokens/s needs tokens after the first) "
                 "and --repeats >= 1")
  n = args.new_tokens
  cores = len(os.sched_getaffinity(0))
  torch_threads = args.torch_threads or cores
  torch.set_num_threads(torch_threads)
  header = run_header("generate.py", argv)
  load_start = os.getloadavg()[0]

  # The same model on both sides: transformers' random init, saved, imported by our converter.
  torch.manual_seed(0)
  hf = transformers.LlavaForConditionalGeneration(llava_config(args.size)).eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(pathlib.Path(tmp) / "hf")
    operations.import_checkpoint(LLAVA, pathlib.Path(tmp) / "hf", pathlib.Path(tmp) / "ckpt")
    config, params = load_model(pathlib.Path(tmp) / "ckpt")
  ours_total = sum(int(np.prod(v.shape)) for v in params.values())
  model = build_with_params(lambda: build_model(config, nnx.Rngs(0)), params)
  del params
  rows = config.model.vision.num_features
  tok = load_tokenizer("gpt2", "phi3")[0]    # only for the Generator's text; ids are built here
  gen = Generator(model, ChatLayout("phi3", tok, rows, "causal"), tok,
                  image_size=config.model.vision.image_size, image_norm="clip",
                  length_multiple=1)
  gen.stop_token_ids = ()                    # exactly N tokens: no stop ids at all
  hf_total = sum(p.numel() for p in hf.parameters())
  progress(f"models ready: transformers built, saved, imported and loaded as ours ({rows} image "
           f"rows)")

  text_tokens = SIZES[args.size][2]
  ids, pixels = prompts(hf.config, rows, text_tokens, max(args.batch_sizes))
  prompt_length = ids.shape[1]

  def ours(batch: int, new: int) -> np.ndarray:
    out = gen.generate_examples(our_examples(ids[:batch], rows),
                                [p[None] for p in pixels[:batch]],
                                SamplingConfig(max_new_tokens=new))
    assert all(g.finish_reason == "length" and len(g.token_ids) == new for g in out)
    return np.array([g.token_ids for g in out])

  def theirs(batch: int, new: int) -> np.ndarray:
    input_ids = torch.from_numpy(ids[:batch]).long()
    with torch.inference_mode():
      out = hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                        pixel_values=torch.from_numpy(pixels[:batch]).permute(0, 3, 1, 2),
                        max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert out.shape == (batch, prompt_length + new), out.shape
    return out[:, prompt_length:].numpy()

  impls = {"ours": ours, "transformers": theirs}
  results, checks, ok = {}, [], True
  for batch in args.batch_sizes:
    calls = [(impl, new) for impl in impls for new in (1, n)]
    first, times, tokens = {}, {c: [] for c in calls}, {}
    for new in (1, n):                                   # warm-up: ours compiles
      start = time.perf_counter()
      ours(batch, new)
      first["ours", new] = time.perf_counter() - start
    theirs(batch, 2)
    progress(f"batch {batch}: warm-up done, ours compile+run "
             f"{first['ours', 1]:.1f} s + {first['ours', n]:.1f} s")
    for rep in range(args.repeats):
      for impl, new in calls[rep % 4:] + calls[:rep % 4]:
        start = time.perf_counter()
        tokens[impl, new] = impls[impl](batch, new)
        times[impl, new].append(time.perf_counter() - start)
      progress(f"batch {batch}: round {rep + 1}/{args.repeats} " + ", ".join(
          f"{impl} {new} tok {times[impl, new][-1]:.2f} s" for impl, new in calls))
    for impl in impls:
      ttft, total = (float(np.median(times[impl, k])) for k in (1, n))
      compile_s = (sum(first[impl, k] - float(np.median(times[impl, k])) for k in (1, n))
                   if impl == "ours" else float("nan"))
      results[impl, batch] = (ttft, total, (n - 1) * batch / (total - ttft), compile_s)
    same = (np.array_equal(tokens["ours", n], tokens["transformers", n])
            and np.array_equal(tokens["ours", 1], tokens["transformers", 1]))
    ok &= same
    checks.append(f"batch {batch} ok" if same else f"batch {batch} MISMATCH (first at "
                  f"{first_difference(tokens['ours', n], tokens['transformers', n])})")

  text, vision = hf.config.text_config, hf.config.vision_config
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
              if line.startswith("model name")), platform.processor() or "unknown CPU")
  load = f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
  print(header)
  print(f"# machine: {cpu}, {cores} cores, 1-min load average {load}; jax {jax.__version__} "
        f"({jax.default_backend()}, XLA default threads), torch {torch.__version__} "
        f"(torch.set_num_threads({torch_threads})), transformers {transformers.__version__} "
        f"(attention {hf.config._attn_implementation})")
  print(f"# model ({args.size}): LLaVA, llama decoder E={text.hidden_size} "
        f"layers={text.num_hidden_layers} heads={text.num_attention_heads}/"
        f"{text.num_key_value_heads} mlp={text.intermediate_size} vocab={text.vocab_size}; clip "
        f"E={vision.hidden_size} layers={vision.num_hidden_layers} "
        f"{vision.image_size}px/{vision.patch_size} ({rows} image rows, layer "
        f"{hf.config.vision_feature_layer}); parameters: ours {ours_total:,}, transformers "
        f"{hf_total:,}; float32, random weights (transformers init, seed 0)")
  print(f"# prompt: {prompt_length} tokens per row (bos + {rows} image rows + {text_tokens} "
        f"text), 1 image per row; greedy, exactly {n} new tokens per row (no eos id; transformers "
        f"min_new_tokens={n}, ours no stop ids)")
  print(f"# check: greedy tokens ours == transformers, every row, {n} tokens and the 1-token "
        f"call: {'; '.join(checks)} -> {'ok' if ok else 'MISMATCH'}")
  print(f"# ttft = median time of a max_new_tokens=1 call (prefill + first token); total = of a "
        f"max_new_tokens={n} call; decode tok/s = ({n} - 1) * batch / (total - ttft); medians of "
        f"{args.repeats} alternating rounds after warm-up (ours 1 call of each kind, "
        f"transformers 1 call of 2 tokens); compile_s = ours' first calls over the warm medians "
        f"(XLA compile, excluded from the timings)")
  print(f"{'impl':<14}{'batch':>6}{'ttft_ms':>11}{'total_ms':>11}{'decode_tok/s':>14}"
        f"{'x_tf_decode':>13}{'x_tf_ttft':>11}{'compile_s':>11}")
  for batch in args.batch_sizes:
    base_ttft, _, base_rate, _ = results["transformers", batch]
    for impl in impls:
      ttft, total, rate, compile_s = results[impl, batch]
      compiled = f"{compile_s:.2f}" if impl == "ours" else "-"
      print(f"{impl:<14}{batch:>6}{1e3 * ttft:>11.1f}{1e3 * total:>11.1f}{rate:>14.1f}"
            f"{rate / base_rate:>13.3f}{ttft / base_ttft:>11.3f}{compiled:>11}")
  for batch in args.batch_sizes:
    ttft, _, rate, _ = results["ours", batch]
    base_ttft, _, base_rate, _ = results["transformers", batch]
    ratio = rate / base_rate
    print(f"ratios batch {batch}: ours/transformers decode tok/s = {ratio:.3f}   "
          f"ttft ours/transformers = {ttft / base_ttft:.3f}   "
          f"target decode >= 2x: {'met' if ratio >= 2 else 'not met'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
