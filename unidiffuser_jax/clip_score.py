"""CLIP score of image/caption pairs, as torchmetrics' ``CLIPScore`` computes it.

Per pair: ``100 * cos(image_embedding, text_embedding)`` with the (unnormalised)
embeddings of ``CLIPModel.get_image_features`` / ``get_text_features``; here
models/clip.py's ``CLIPVisionEncoder`` (includes ``visual_projection``) and
``CLIPTextEncoder`` + ``CLIPTextProjection``. The reported score is
``max(mean over pairs, 0)``: torchmetrics 1.9 clamps the MEAN at 0, not each
pair (its docstring's ``max(100 * cos, 0)`` notation notwithstanding).
``compute(clamp_each=True)`` instead averages ``max(100 * cos, 0)`` per pair,
the per-sample rule of the CLIPScore paper (there with weight 2.5, not 100).
The two agree whenever every cosine is >= 0, as is usual for real CLIP models.

Cosines are computed on the host in float64 from the float32 embeddings;
``ClipScoreStats`` accumulates (sum, sum of clamped, n) so batches and hosts
combine exactly.

Image preprocessing is the host one, ``data_pipelines.transforms.clip_preprocess_np`` (equal
to transformers' CLIPImageProcessor; torchmetrics runs that processor).
"""
import numpy as np


def pair_scores(image_emb_bd, text_emb_bd) -> np.ndarray:
  """100 * cosine similarity of each (image, text) pair, float64 [B] (not clamped)."""
  a = np.asarray(image_emb_bd, np.float64)
  b = np.asarray(text_emb_bd, np.float64)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"CLIP score needs image and text embeddings of one shape [B, D]; got "
                     f"{a.shape} and {b.shape}")
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return 100.0 * np.sum(a * b, axis=-1)


class ClipScoreStats:
  """Streaming CLIP score: add embedding batches, merge shards, compute the mean."""

  def __init__(self):
    self.n = 0
    self.total = 0.0
    self.total_clamped = 0.0

  def add(self, image_emb_bd, text_emb_bd) -> "ClipScoreStats":
    s = pair_scores(image_emb_bd, text_emb_bd)
    self.n += s.shape[0]
    self.total += float(s.sum())
    self.total_clamped += float(np.maximum(s, 0.0).sum())
    return self

  def merge(self, other: "ClipScoreStats") -> "ClipScoreStats":
    self.n += other.n
    self.total += other.total
    self.total_clamped += other.total_clamped
    return self

  def compute(self, clamp_each: bool = False) -> float:
    """torchmetrics' max(mean, 0); with clamp_each, mean of per-pair max(score, 0)."""
    if self.n == 0:
      raise ValueError("CLIP score: no pairs were added")
    if clamp_each:
      return self.total_clamped / self.n
    return max(self.total / self.n, 0.0)
