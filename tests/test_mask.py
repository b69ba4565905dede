"""The mask specification (DESIGN.md §1) on hand-worked examples, and dense attention."""
import jax
import jax.numpy as jnp
import numpy as np

from mma_jax.attention.dense import attend_dense, dense_attention
from mma_jax.attention.mask import allowed, materialize

# The 12-token AKI example: one image of 3 tokens inside a single-turn SFT conversation.
#   0 <s>  1 <|user|>  2 img  3 img  4 img  5 "what"  6 "shape"  7 <|assistant|>  8 "\n"
#   9 "circle"  10 <|endoftext|>  11 pad
# img_start=2, img_end=5, asst=7 (the role token), so asst_header_end=8: image rows 2..4 also
# see keys [5, 8) -- the question and the <|assistant|> token, not the newline, not the answer.
SEGMENTS = np.array([[1] * 11 + [0]])
LO = np.array([[0, 0, 5, 5, 5, 0, 0, 0, 0, 0, 0, 0]])
HI = np.array([[0, 0, 8, 8, 8, 0, 0, 0, 0, 0, 0, 0]])
EXPECTED_MMA = np.array([
    # keys 0  1  2  3  4  5  6  7  8  9 10 11
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # 0 <s>
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # 1 <|user|>
    [1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0],  # 2 img: causal + question + <|assistant|>
    [1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0],  # 3 img: still causal among image tokens
    [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # 4 img
    [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # 5 question: plain causal
    [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # 6
    [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # 7 <|assistant|>
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # 8 "\n"
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0],  # 9 answer
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],  # 10 <|endoftext|>
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],  # 11 pad: its own segment, sees only pad keys
], dtype=bool)


def test_twelve_token_mma_example():
  np.testing.assert_array_equal(np.asarray(materialize(SEGMENTS, LO, HI))[0], EXPECTED_MMA)


def test_official_rule_agrees_with_the_example():
  """keep[i, j] = j <= i or (img_start <= i < img_end and img_end <= j <= asst), minus padding."""
  i, j = np.arange(12)[:, None], np.arange(12)[None, :]
  official = (j <= i) | ((2 <= i) & (i < 5) & (5 <= j) & (j <= 7))
  official &= (SEGMENTS[0][:, None] == SEGMENTS[0][None, :])
  np.testing.assert_array_equal(official, EXPECTED_MMA)


def test_causal_when_windows_are_empty():
  seg = np.array([[1, 1, 1, 1]])
  zeros = np.zeros_like(seg)
  np.testing.assert_array_equal(np.asarray(materialize(seg, zeros, zeros))[0],
                                np.tril(np.ones((4, 4), bool)))


def test_packed_segments_never_see_each_other():
  seg = np.array([[1, 1, 1, 2, 2, 0]])
  lo = np.array([[0, 2, 0, 0, 0, 0]])   # row 1 asks for keys [2, 5): only key 2 is its segment
  hi = np.array([[0, 5, 0, 0, 0, 0]])
  expected = np.array([
      [1, 0, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0],
      [1, 1, 1, 0, 0, 0],
      [0, 0, 0, 1, 0, 0],
      [0, 0, 0, 1, 1, 0],
      [0, 0, 0, 0, 0, 1],
  ], dtype=bool)
  np.testing.assert_array_equal(np.asarray(materialize(seg, lo, hi))[0], expected)


def test_allowed_works_on_numpy_scalars_and_arrays():
  assert bool(allowed(3, 5, 1, 1, 4, 6))       # inside the window
  assert not bool(allowed(3, 6, 1, 1, 4, 6))   # hi is exclusive
  assert not bool(allowed(3, 2, 1, 2, 0, 0))   # other segment
  assert allowed(np.arange(3), 1, 1, 1, 0, 0).tolist() == [False, True, True]


def _naive_attention(q, k, v, mask, scale):
  """Loops over heads: GQA by repeating kv heads, as HF's repeat_kv does."""
  h, kv = q.shape[2], k.shape[2]
  k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  s = np.where(mask[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def test_dense_attention_matches_naive_with_gqa_and_scale():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (1, 12, 4, 8))
  k = jax.random.normal(keys[1], (1, 12, 2, 8))
  v = jax.random.normal(keys[2], (1, 12, 2, 8))
  out = attend_dense(q, k, v, SEGMENTS, LO, HI, scale=0.3)
  expected = _naive_attention(*map(np.asarray, (q, k, v)), EXPECTED_MMA[None], 0.3)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)
  # The default scale is 1/sqrt(D).
  np.testing.assert_allclose(np.asarray(attend_dense(q, k, v, SEGMENTS, LO, HI)),
                             _naive_attention(*map(np.asarray, (q, k, v)), EXPECTED_MMA[None],
                                              8 ** -0.5), atol=1e-5, rtol=0)


def test_dense_attention_softmax_is_f32_for_bf16_inputs_and_masked_rows_are_zero():
  q = jnp.ones((1, 2, 1, 4), jnp.bfloat16)
  v = jnp.arange(8, dtype=jnp.bfloat16).reshape(1, 2, 1, 4)
  mask = jnp.array([[[True, False], [False, False]]])
  out = dense_attention(q, q, v, mask)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out[0, 0, 0], np.float32), [0, 1, 2, 3])
  np.testing.assert_array_equal(np.asarray(out[0, 1], np.float32), 0)  # never an average
