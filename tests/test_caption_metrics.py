"""BLEU-1..4 and CIDEr-D vs pycocoevalcap's Bleu and Cider scorers (pure Python, no Java)."""
import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from unidiffuser_jax import caption_metrics

VOCAB = ("a man dog cat on the red bike street sitting with two of in is near "
         "small big white riding grass").split()


def _corpus(seed, n_images=240):
  """Random captions from a small vocabulary (many shared n-grams), 1-6 references each;
  candidates are noisy copies of a reference or random, lengths 0-14 (0 and 1 included)."""
  rng = np.random.default_rng(seed)
  cands, refs = {}, {}
  for i in range(n_images):
    rs = [" ".join(rng.choice(VOCAB, rng.integers(1, 13))) for _ in range(rng.integers(1, 7))]
    if rng.random() < 0.6:
      words = rs[0].split()
      words = [w if rng.random() < 0.8 else str(rng.choice(VOCAB)) for w in words]
      words = words[:rng.integers(1, len(words) + 1)] + list(rng.choice(VOCAB, rng.integers(0, 3)))
    else:
      words = list(rng.choice(VOCAB, rng.integers(0, 15)))
    cands[f"img{i}"], refs[f"img{i}"] = " ".join(words), rs
  cands["img0"], cands["img1"] = "", "dog"  # empty and one-word candidates
  return cands, refs


@pytest.mark.parametrize("seed", [0, 1])
def test_bleu_matches_pycocoevalcap(seed):
  cands, refs = _corpus(seed)
  want, _ = Bleu(4).compute_score(refs, {k: [v] for k, v in cands.items()}, verbose=0)
  got = caption_metrics.bleu(cands, refs)
  print(f"BLEU ours {got} pycocoevalcap {want}")
  assert 0.05 < got[3] < got[0] < 1  # a non-trivial corpus
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=0)


def test_bleu_brevity_penalty_and_closest_length():
  # Candidate of 3 words, references of 2 and 5 words: closest is 2 (no penalty); with
  # references of 4 and 5, closest is 4 and the penalty applies.
  refs1 = {"a": ["a man", "a man on a bike"]}
  refs2 = {"a": ["a man on it", "a man on a bike"]}
  cand = {"a": "a man on"}
  for refs in (refs1, refs2):
    want, _ = Bleu(4).compute_score(refs, {k: [v] for k, v in cand.items()}, verbose=0)
    np.testing.assert_allclose(caption_metrics.bleu(cand, refs), want, rtol=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_cider_d_matches_pycocoevalcap(seed):
  cands, refs = _corpus(seed)
  want, want_each = Cider().compute_score(refs, {k: [v] for k, v in cands.items()})
  got, got_each = caption_metrics.cider_d(cands, refs)
  print(f"CIDEr-D ours {got!r} pycocoevalcap {want!r}")
  assert got > 0.1
  assert abs(got - want) <= 1e-9 * abs(want)
  # pycocoevalcap's per-image scores follow its (sorted) key order
  np.testing.assert_allclose([got_each[k] for k in refs], want_each, rtol=1e-9, atol=1e-12)


def test_identical_candidate_gets_high_cider_and_bleu_one():
  refs = {f"i{j}": [f"a {w} on the street", f"the {w} is small"] for j, w in enumerate(VOCAB)}
  cands = {k: v[0] for k, v in refs.items()}
  assert caption_metrics.bleu(cands, refs) == pytest.approx([1.0] * 4, abs=1e-9)
  got, _ = caption_metrics.cider_d(cands, refs)
  want, _ = Cider().compute_score(refs, {k: [v] for k, v in cands.items()})
  assert got == pytest.approx(want, rel=1e-9) and got > 1


def test_simple_tokenize_and_errors():
  assert caption_metrics.simple_tokenize("A Dog, sitting on the GRASS.") == \
      "a dog sitting on the grass"
  assert caption_metrics.simple_tokenize("  (two)  cats -- `here`! ") == "two cats here"
  with pytest.raises(ValueError, match="same ids"):
    caption_metrics.bleu({"a": "x"}, {"b": ["x"]})
  with pytest.raises(ValueError, match="non-empty list"):
    caption_metrics.cider_d({"a": "x"}, {"a": "x"})
  with pytest.raises(ValueError, match="one string"):
    caption_metrics.bleu({"a": ["x"]}, {"a": ["x"]})

# Compared against an independent reference (PyTorch / numpy re-derivation): `-m "not parity"` skips.
pytestmark = pytest.mark.parity
