"""Generation: the cached path equals re-running the whole model, MMA prefill is really MMA,
transformers' LLaVA greedy generate, sampling and stopping, sharded = single device, option
log-probabilities. Tiny random models with the bundled GPT-2 BPE (vocabulary ~50k)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_models import save_tiny_llava
from mma_jax import generate as generate_module
from mma_jax.config import (Config, ConnectorConfig, LLMConfig, MeshConfig, ModelConfig,
                            VisionConfig)
from mma_jax.convert import operations
from mma_jax.convert.llava import LLAVA
from mma_jax.convert.store import load_model
from mma_jax.convert.transfer import build_with_params
from mma_jax.data.images import preprocess
from mma_jax.data.packing import example_fields
from mma_jax.data.tokenizer import load_tokenizer
from mma_jax.generate import (Generator, SamplingConfig, default_stop_token_ids, left_pad,
                              template_stop_tokens)
from mma_jax.layout import ChatLayout, Conversation
from mma_jax.models import build_model
from mma_jax.sharding import make_mesh
from mma_jax.templates import get_template, official_aki

N = 3            # image tokens per image (perceiver latents)
SIZE = 16        # image size
STEPS = 6        # new tokens in the greedy comparisons


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer("gpt2", "phi3")[0]


def tiny_model(vocab: int, *, vision=True, seed=0):
  llm = LLMConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2)
  if not vision:
    return sharpen(build_model(Config(model=ModelConfig(llm=llm)), nnx.Rngs(seed)))
  config = ModelConfig(
      llm=llm,
      vision=VisionConfig(hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                          image_size=SIZE, patch_size=8),
      connector=ConnectorConfig(type="perceiver", num_latents=N, depth=1, num_heads=2,
                                head_dim=8))
  return sharpen(build_model(Config(model=config), nnx.Rngs(seed)))


def sharpen(model, factor=8.0):
  """Larger query/key weights: at the default init attention is nearly uniform, so RoPE positions
  (and thus a wrong position in decoding) would hardly change the tokens."""
  llm = model.llm if hasattr(model, "llm") else model
  for projection in (llm.layers.attn.q, llm.layers.attn.k):
    projection.kernel[...] = projection.kernel[...] * factor
  return model


@pytest.fixture(scope="module")
def mllm(tok):
  return tiny_model(len(tok))


@pytest.fixture(scope="module")
def mllm_reference(mllm):
  return FullForward(mllm)


@pytest.fixture(scope="module")
def mma_run(tok, mllm):
  """The single-device MMA generator on the tiny MLLM and its greedy generations."""
  gen = generator(mllm, tok, "mma")
  conversations, images = conversations_and_images()
  return gen, gen.generate(conversations, images, SamplingConfig(max_new_tokens=STEPS))


def conversations_and_images():
  """Prompts of different lengths (9 to ~25 tokens): one image, one image mid-question, none."""
  rng = np.random.default_rng(0)
  image = lambda: rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  conversations = [
      Conversation([("user", "<image>\nWhat shape is this?")], 1, ""),
      Conversation([("user", "Is the <image> red or is it a blue thing in the picture?")], 1, ""),
      Conversation([("user", "hello")], 0, ""),
  ]
  return conversations, [[image()], [image()], []]


def generator(model, tok, mode="mma", **kw):
  layout = ChatLayout("phi3", tok, N, mode)
  return Generator(model, layout, tok, image_size=SIZE, image_norm="siglip", length_multiple=16,
                   **kw)


# ------------------------------------------------------------------------ the uncached reference
class FullForward:
  """Greedy decoding by re-running the whole model on prompt + generated tokens at every step
  (no cache): the sequence is right-padded to a fixed length, so it compiles once."""

  def __init__(self, model, length=64):
    graphdef, state = nnx.split(model)
    self.state, self.length = state, length

    @jax.jit
    def last_logits(state, batch, at):
      model = nnx.merge(graphdef, state)
      return model.logits(model.hidden(**batch)[0, at])

    self.last_logits = last_logits

  def logits(self, fields, generated, pixels):
    """Next-token logits after the prompt `fields` (laid out alone) and `generated` ids: the new
    tokens are plain causal text (no window), at the following positions."""
    extra = len(generated)
    n = len(fields["tokens"]) + extra
    pad = lambda v, fill=0: np.concatenate([v, np.full(self.length - len(v), fill, np.int32)])
    zeros = np.zeros(extra, np.int32)
    batch = {
        "tokens": pad(np.concatenate([fields["tokens"], np.asarray(generated, np.int32)])),
        "positions": pad(np.arange(n, dtype=np.int32)),
        "segment_ids": pad(np.ones(n, np.int32)),
        "window_lo": pad(np.concatenate([fields["window_lo"], zeros])),
        "window_hi": pad(np.concatenate([fields["window_hi"], zeros])),
        "image_token_index": pad(np.concatenate([fields["image_token_index"], zeros - 1]), -1),
    }
    batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}
    batch["images"] = jnp.asarray(pixels)[None]
    return np.asarray(self.last_logits(self.state, batch, n - 1))

  def greedy(self, fields, pixels, steps):
    ids, first = [], None
    for _ in range(steps):
      logits = self.logits(fields, ids, pixels)
      first = logits if first is None else first
      ids.append(int(np.argmax(logits)))
    return ids, first


def pixels_of(images):
  if not images:
    return np.zeros((0, SIZE, SIZE, 3), np.float32)
  return np.stack([preprocess(x, SIZE, "siglip") for x in images])


def assert_matches_reference(generation, reference, stop_ids):
  ids = generation.token_ids
  assert ids == reference[:len(ids)]
  if generation.finish_reason == "stop":
    assert reference[len(ids)] in stop_ids
  else:
    assert len(ids) == len(reference)


# ---------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", ["mma", "causal"])
def test_cached_generation_equals_full_forward_greedy(tok, request, mode):
  """A batch of prompts of different lengths (left-padded together) decodes with the cache
  exactly as the whole model re-run on each prompt alone; and the prefill really uses the
  mode's windows: its logits match this mode's full forward, and the other mode differs.
  (mma runs unrolled layers, causal scanned ones.)"""
  conversations, images = conversations_and_images()
  if mode == "mma":
    gen, out = request.getfixturevalue("mma_run")
    reference = request.getfixturevalue("mllm_reference")
  else:   # the same parameters run through lax.scan over the stacked layers
    model = nnx.clone(request.getfixturevalue("mllm"))
    model.llm.scan_layers = True
    gen, reference = generator(model, tok, mode), FullForward(model)
    out = gen.generate(conversations, images, SamplingConfig(max_new_tokens=STEPS))
  prefill = gen.prefill_logits(conversations, images)
  other = ChatLayout("phi3", tok, N, "causal" if mode == "mma" else "mma")
  for b, (conversation, pics) in enumerate(zip(conversations, images)):
    fields = example_fields(gen.layout.conversation(conversation, generation_prompt=True))
    assert out[b].prompt_length == len(fields["tokens"])
    ids, first = reference.greedy(fields, pixels_of(pics), STEPS)
    assert_matches_reference(out[b], ids, gen.stop_token_ids)
    np.testing.assert_allclose(prefill[b], first, atol=1e-5, rtol=0)
    if pics:   # with an image, MMA and causal prefills must differ (well beyond that tolerance)
      other_fields = example_fields(other.conversation(conversation, generation_prompt=True))
      assert np.abs(reference.logits(other_fields, [], pixels_of(pics)) - first).max() > 2e-4


def test_prefill_and_decode_steps_equal_the_full_forward_hidden_states(tok, mllm):
  """The model API itself: prefill of a left-padded MMA prompt and two decode steps give the
  hidden states (image rows included) of one full forward over prompt + tokens; the cache marks
  the padding invalid."""
  conversations, images = conversations_and_images()
  layout = ChatLayout("phi3", tok, N, "mma")
  fields = example_fields(layout.conversation(conversations[1], generation_prompt=True))
  n, pad, new = len(fields["tokens"]), 7, np.array([11, 12], np.int32)
  prompt = {k: jnp.asarray(v)[None] for k, v in left_pad(fields, n + pad).items()}
  pixels = jnp.asarray(pixels_of(images[1]))[None]
  full = {k: np.concatenate([fields[k], np.zeros(2, np.int32)])[None]
          for k in generate_module.PROMPT_FIELDS}
  full["tokens"][0, n:] = new
  full["positions"] = np.arange(n + 2)[None]
  full["segment_ids"][0, n:] = 1
  full["image_token_index"][0, n:] = -1
  graphdef, state = nnx.split(mllm)

  @jax.jit
  def run(state, prompt, full, pixels):
    model = nnx.merge(graphdef, state)
    h0, cache = model.prefill(**prompt, images=pixels, cache_length=n + pad + 2)
    h1, cache = model.decode_step(tokens=jnp.asarray(new[None, :1]),
                                  positions=jnp.asarray([[n]]), cache=cache)
    h2, cache = model.decode_step(tokens=jnp.asarray(new[None, 1:]),
                                  positions=jnp.asarray([[n + 1]]), cache=cache)
    cached = jnp.concatenate([h0[0, pad:], h1[0], h2[0]])
    return cached, model.hidden(**full, images=pixels)[0], cache

  cached, expected, cache = run(state, prompt, full, pixels)
  np.testing.assert_allclose(cached, expected, atol=2e-5, rtol=0)
  assert int(cache["index"]) == n + pad + 2 and bool(cache["valid"][0, pad:].all())
  assert not bool(cache["valid"][0, :pad].any())


def test_llava_greedy_equals_transformers_generate(tmp_path, tok):
  """A converted tiny LLaVA (causal) against LlavaForConditionalGeneration.generate on the same
  ids and pixels: two prompts of different lengths batched here, one at a time there."""
  hf = save_tiny_llava(tmp_path / "hf")
  operations.import_checkpoint(LLAVA, tmp_path / "hf", tmp_path / "ckpt")
  config, params = load_model(tmp_path / "ckpt")
  model = build_with_params(lambda: build_model(config, nnx.Rngs(0)), params)
  rows, image_id = config.model.vision.num_features, config.model.origin.image_token_id
  # The ids are built directly; the layout only brings its (here out-of-vocabulary) stop tokens.
  layout = ChatLayout("phi3", tok, rows, "causal")
  gen = Generator(model, layout, tok, image_size=28, image_norm="clip", length_multiple=16)
  rng = np.random.default_rng(0)
  examples, pixels = [], []
  for length in (rows + 5, rows + 12):
    tokens = rng.integers(3, image_id, length).astype(np.int32)
    tokens[0], tokens[1:rows + 1] = 1, image_id
    index = np.full(length, -1, np.int32)
    index[1:rows + 1] = np.arange(rows)
    examples.append({"tokens": tokens, "positions": np.arange(length, dtype=np.int32),
                     "segment_ids": np.ones(length, np.int32),
                     "window_lo": np.zeros(length, np.int32),
                     "window_hi": np.zeros(length, np.int32), "image_token_index": index})
    pixels.append(rng.standard_normal((1, 28, 28, 3)).astype(np.float32))
  steps = 8
  out = gen.generate_examples(examples, pixels, SamplingConfig(max_new_tokens=steps))
  eos = hf.generation_config.eos_token_id
  assert set(np.atleast_1d(eos).tolist()) <= set(gen.stop_token_ids)
  for example, pics, generation in zip(examples, pixels, out):
    with torch.no_grad():
      result = hf.generate(input_ids=torch.from_numpy(example["tokens"][None]).long(),
                           pixel_values=torch.from_numpy(pics).permute(0, 3, 1, 2),
                           max_new_tokens=steps, do_sample=False)
    expected = result[0, len(example["tokens"]):].tolist()
    stopped = [i for i, t in enumerate(expected) if t in gen.stop_token_ids]
    if stopped:
      assert generation.finish_reason == "stop" and generation.token_ids == expected[:stopped[0]]
    else:
      assert generation.finish_reason == "length" and generation.token_ids == expected


@pytest.fixture(scope="module")
def text_gen(tok):
  """A text-only tiny LLM (the generator serves DecoderLLM too) and its greedy baseline."""
  gen = generator(tiny_model(len(tok), vision=False, seed=1), tok)
  conversations = [Conversation([("user", "Name a colour.")], 0, ""),
                   Conversation([("user", "Say something long about shapes and circles.")], 0, "")]
  greedy = gen.generate(conversations, [[], []], SamplingConfig(max_new_tokens=8))
  return gen, conversations, greedy


def test_sampling_settings(text_gen):
  gen, conversations, greedy = text_gen
  run = lambda **kw: [g.token_ids for g in gen.generate(
      conversations, [[], []], SamplingConfig(max_new_tokens=8, **kw))]
  greedy_ids = [g.token_ids for g in greedy]
  assert all(len(ids) == 8 for ids in greedy_ids)
  assert run(temperature=1.0, top_k=1) == greedy_ids
  assert run(temperature=1.0, top_p=1e-6) == greedy_ids
  sampled = run(temperature=1.0, seed=3)
  assert run(temperature=1.0, seed=3) == sampled          # a seed reproduces
  assert run(temperature=1.0, seed=4) != sampled           # another seed does not
  assert sampled != greedy_ids


def test_top_k_and_top_p_keep_exactly_the_best_tokens(text_gen):
  """First tokens of 32 copies of one prompt: all among the k best (top_k) or the smallest set
  reaching top_p; and not all the same (it does sample)."""
  gen, conversations, _ = text_gen
  logits = gen.prefill_logits(conversations[:1], [[]])[0].astype(np.float64)
  order = np.argsort(-logits)
  probs = np.exp(logits[order] - logits.max())
  cumulative = np.cumsum(probs / probs.sum())
  top_p = float((cumulative[2] + cumulative[3]) / 2)   # reaches it with the 4 best tokens
  for settings, allowed in ((dict(top_k=3), order[:3]), (dict(top_p=top_p), order[:4])):
    out = gen.generate(conversations[:1] * 32, [[]] * 32,
                       SamplingConfig(max_new_tokens=1, temperature=1.0, **settings))
    first = {g.token_ids[0] for g in out if g.token_ids}
    assert first <= set(allowed.tolist()) and len(first) >= 2, (settings, first)


def test_phi3_stops_where_phi35_does_in_both_flavours():
  # generation_config.json of Phi-3.5-mini: eos_token_id [32007, 32001, 32000]; the official AKI
  # generate passes no other (not <|endofchunk|>, the official caption end)
  for template in (get_template("phi3"), official_aki("phi3", "<s>", "<|endoftext|>")):
    assert template_stop_tokens(template) == ("<|assistant|>", "<|end|>", "<|endoftext|>")
  assert template_stop_tokens(get_template("llama3")) == ("<|eot_id|>", "<|end_of_text|>")


def test_stops_and_lengths(text_gen, monkeypatch):
  gen, conversations, greedy = text_gen
  # Phi-3.5's generation_config.json stops on <|end|>, <|assistant|>, <|endoftext|>
  assert default_stop_token_ids(gen.layout) == tuple(
      gen.tokenizer.convert_tokens_to_ids(["<|assistant|>", "<|end|>", "<|endoftext|>"]))
  assert all(g.finish_reason == "length" for g in greedy)
  ids, text = greedy[1].token_ids, greedy[1].text
  assert all(len(g.token_ids) == 8 for g in greedy)     # max_new_tokens
  # a stop token id: excluded from the ids and the text; the other row runs on
  stop_id = ids[3]
  first = ids.index(stop_id)
  out = gen.generate(conversations, [[], []],
                     SamplingConfig(max_new_tokens=8, stop_token_ids=(stop_id,)))
  assert out[1].token_ids == ids[:first] and out[1].finish_reason == "stop"
  assert out[1].text == gen.tokenizer.decode(ids[:first])
  if stop_id not in greedy[0].token_ids:
    assert out[0].token_ids == greedy[0].token_ids and out[0].finish_reason == "length"
  # a stop string: the text is cut before it (checked by the host every 2 steps here)
  monkeypatch.setattr(generate_module, "STRING_CHECK_EVERY", 2)
  stop = text[len(gen.tokenizer.decode(ids[:2])):][:3]
  assert stop.strip() and text.find(stop) > 0
  out = gen.generate(conversations, [[], []],
                     SamplingConfig(max_new_tokens=8, stop_strings=(stop, "never there")))
  assert out[1].text == text[:text.find(stop)] and out[1].finish_reason == "stop"
  assert out[1].token_ids == ids[:len(out[1].token_ids)] and len(out[1].token_ids) <= 3
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen.generate(conversations, [[], []], SamplingConfig(max_new_tokens=0))


@pytest.mark.parametrize("shape", [(2, 4, 1), (2, 2, 2)])
def test_sharded_greedy_equals_single_device(tok, mllm, mma_run, shape):
  """Batch over (data, fsdp) (3 prompts padded to 4 or 8 rows), parameters and cache sharded
  by the rules table (kv heads over tensor in the second mesh): the same generations."""
  conversations, images = conversations_and_images()
  single = mma_run[1]
  gen = generator(mllm, tok, mesh=make_mesh(MeshConfig(*shape)))
  embedding = gen._state["llm"]["embed"]["embedding"][...]
  assert not embedding.sharding.is_fully_replicated          # the parameters are sharded
  sharded = gen.generate(conversations, images, SamplingConfig(max_new_tokens=STEPS))
  assert sharded == single


def test_option_logprobs_equal_a_hand_computation(tok, mllm, mllm_reference):
  gen = generator(mllm, tok)
  conversations, images = conversations_and_images()
  # Two turns: the first answer is part of the prompt, never of the score.
  conversations[2] = Conversation([("user", "<image> What is it?"), ("assistant", "a circle"),
                                   ("user", "Colour?")], 1, "")
  images[2] = images[0]
  options = [["circle", "a blue square"], ["red", "blue", "it is green"], ["green", "red"]]
  scores = gen.option_logprobs(conversations, images, options)
  reference = mllm_reference
  for conversation, pics, opts, got in zip(conversations, images, options, scores):
    assert len(got) == len(opts)
    prompt = gen.layout.conversation(conversation, generation_prompt=True).length
    for option, (score, count) in zip(opts, got):
      answered = Conversation(list(conversation.turns) + [("assistant", option)],
                              conversation.num_images, conversation.system)
      fields = example_fields(gen.layout.conversation(answered))
      # the option's tokens: after the prompt, before the one end-of-answer token
      option_ids = fields["tokens"][prompt:-1].tolist()
      assert gen.tokenizer.decode(option_ids) == option
      assert count == len(option_ids)
      prompt_fields = {k: v[:prompt] for k, v in fields.items()}
      expected = 0.0
      for k, token in enumerate(option_ids):
        logits = reference.logits(prompt_fields, option_ids[:k], pixels_of(pics))
        expected += float(jax.nn.log_softmax(logits)[token])
      assert abs(score - expected) <= 1e-4, (option, score, expected)
  assert scores[1][0] != scores[1][1]
