"""CLIP score: our towers + clip_score.py vs torchmetrics' CLIPScore on a tiny random CLIPModel."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from torchmetrics.functional.multimodal.clip_score import _clip_score_update
from torchmetrics.multimodal.clip_score import CLIPScore

from unidiffuser_jax import clip_score
from unidiffuser_jax.models import clip
from unidiffuser_jax.weights import clip as clip_weights
from unidiffuser_jax.weights.convert import WeightMismatchError
from tests.refs import clip as clip_ref

VOCAB, EOS, PAD, BOS, LEN, SIZE = 99, 98, 1, 0, 12, 24


def _clip_model(eos_token_id=EOS):
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=LEN,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=eos_token_id),
      vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, image_size=SIZE, patch_size=8),
      projection_dim=16)
  return clip_ref.randomise(transformers.CLIPModel(cfg), 3)


class _Features(torch.nn.Module):
  """transformers 5's get_*_features return an output object; torchmetrics 1.9 expects the
  projected tensor (transformers 4's return value), so hand it `.pooler_output`."""

  def __init__(self, model):
    super().__init__()
    self.model, self.config = model, model.config

  def get_image_features(self, pixel_values):
    return self.model.get_image_features(pixel_values=pixel_values).pooler_output

  def get_text_features(self, input_ids, attention_mask):
    return self.model.get_text_features(input_ids=input_ids,
                                        attention_mask=attention_mask).pooler_output


class _Processor:
  """Stands in for CLIPProcessor: captions are space-separated token ids; images arrive
  already preprocessed (CLIP preprocessing parity is tests/test_clip.py's)."""

  def __call__(self, images=None, text=None, return_tensors="pt", padding=True):
    if images is not None:
      return {"pixel_values": torch.stack(images)}
    rows = [[BOS] + [int(t) for t in s.split()] + [EOS] for s in text]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def _data(seed, n):
  rng = np.random.default_rng(seed)
  pixels = rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)
  texts = [" ".join(str(t) for t in rng.integers(3, EOS, rng.integers(1, LEN - 1)))
           for _ in range(n)]
  return pixels, texts


def _ours(ref, pixels, texts):
  """Image and text embeddings from our towers loaded from `ref`'s state dict."""
  cfg = ref.config.to_dict()
  tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
  vis = clip.CLIPVisionEncoder(**clip_weights.vision_config_from_json(cfg))
  txt = clip.CLIPTextEncoder(**clip_weights.text_config_from_json(cfg))
  head = clip.CLIPTextProjection(**clip_weights.text_projection_config_from_json(cfg))
  vparams = clip_weights.clip_vision_params_from_tensors(vis, tensors)
  tparams = clip_weights.clip_text_params_from_tensors(txt, tensors)
  hparams = clip_weights.clip_text_projection_params_from_tensors(head, txt.width, tensors)
  img = vis.apply({"params": vparams}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  # Our text path pads to a fixed length with PAD (no attention mask: the causal mask
  # already keeps padding after the end token out of the pooled state).
  tokens = np.full((len(texts), LEN), PAD, np.int32)
  for i, s in enumerate(texts):
    row = [BOS] + [int(t) for t in s.split()] + [EOS]
    tokens[i, :len(row)] = row
  hidden = txt.apply({"params": tparams}, jnp.asarray(tokens))
  emb = head.apply({"params": hparams}, hidden, jnp.asarray(tokens))
  return np.asarray(img), np.asarray(emb)


def test_pair_scores_and_metric_match_torchmetrics():
  ref = _clip_model()
  pixels, texts = _data(0, 12)
  with torch.no_grad():
    want_pairs, n = _clip_score_update(torch.from_numpy(pixels), texts, _Features(ref),
                                       _Processor())
    metric = CLIPScore(model_name_or_path=lambda: (_Features(ref), _Processor()))
    metric.update(torch.from_numpy(pixels[:5]), texts[:5])
    metric.update(torch.from_numpy(pixels[5:]), texts[5:])
    want_metric = float(metric.compute())
  img, txt = _ours(ref, pixels, texts)
  got_pairs = clip_score.pair_scores(img, txt)
  err = np.abs(got_pairs - want_pairs.numpy()).max()
  print(f"per-pair CLIP score max |diff| {err:.3g}; scores {np.round(got_pairs, 2)}")
  assert n == 12 and err <= 1e-4
  assert (got_pairs < 0).any() and (got_pairs > 0).any()  # both signs: clamping matters
  stats = clip_score.ClipScoreStats().add(img[:7], txt[:7]).merge(
      clip_score.ClipScoreStats().add(img[7:], txt[7:]))
  print(f"CLIPScore ours {stats.compute()} torchmetrics {want_metric}")
  assert abs(stats.compute() - want_metric) <= 1e-4
  mean = float(np.mean(got_pairs))
  assert abs(stats.compute() - max(mean, 0.0)) < 1e-9  # merged sums vs one mean: rounding
  assert abs(stats.compute(clamp_each=True) - np.mean(np.maximum(got_pairs, 0))) < 1e-9


def test_legacy_eos_token_id_2_pools_at_largest_id():
  """Old CLIP configs say eos_token_id=2; transformers then pools at argmax(ids)."""
  ref = _clip_model(eos_token_id=2)
  pixels, texts = _data(1, 4)
  with torch.no_grad():
    want = torch.nn.functional.normalize(
        _Features(ref).get_text_features(**_Processor()(text=texts)), dim=-1).numpy()
  _, got = _ours(ref, pixels, texts)
  got = got / np.linalg.norm(got, axis=-1, keepdims=True)
  assert np.abs(got - want).max() <= 1e-5


def test_bad_inputs():
  with pytest.raises(ValueError, match="one shape"):
    clip_score.pair_scores(np.ones((2, 4)), np.ones((3, 4)))
  with pytest.raises(ValueError, match="no pairs"):
    clip_score.ClipScoreStats().compute()
  head = clip.CLIPTextProjection(proj_dim=16)
  with pytest.raises(WeightMismatchError, match="text_projection.weight"):
    clip_weights.clip_text_projection_params_from_tensors(
        head, 32, {"text_projection.weight": np.zeros((16, 31), np.float32)})

# Compared against an independent reference (PyTorch / numpy re-derivation): `-m "not parity"` skips.
pytestmark = pytest.mark.parity
