"""Record filters from img2dataset metadata, and the list of skip reasons.

Every record of a shard is either yielded or counted under exactly one reason
of SKIP_REASONS (the first that applies, in the order checked by
records.RecordProcessor). Metadata fields that are absent never filter: a
shard without `punsafe` passes the unsafe filter.
"""
from __future__ import annotations

from typing import Any

# Order matters: batches carry `skipped` int32 [len(SKIP_REASONS)] in this order.
SKIP_REASONS = (
    # Shard level (from shards.py).
    'bad_shard',        # shard cannot be opened or is not a tar (1 per shard)
    'truncated_shard',  # record at a truncation / corrupt tar header
    # Record contents.
    'no_image',         # no .jpg/.jpeg/.png/.webp member
    'empty_image',      # 0 bytes or a 0-size image
    'corrupt_image',    # cannot be decoded (bad or truncated bytes)
    'image_too_large',  # header says more than max_image_pixels (bomb guard)
    'no_caption',       # .txt missing, empty or blank
    'bad_utf8',         # .txt (or .json) not valid UTF-8
    'bad_metadata',     # .json present but not a JSON object
    # Quality filters (config.data).
    'small_image',      # original short side < min_side
    'aspect_ratio',     # long/short side > max_aspect
    'watermark',        # pwatermark > max_watermark
    'unsafe',           # punsafe > max_unsafe
    'aesthetic',        # aesthetic < min_aesthetic
    'caption_short',    # cleaned caption shorter than min_caption_chars
    'caption_long',     # cleaned caption longer than max_caption_chars
)
REASON_INDEX = {r: i for i, r in enumerate(SKIP_REASONS)}


def _num(meta: dict[str, Any], *names):
  """First numeric value among `names` in meta, else None."""
  for n in names:
    v = meta.get(n)
    if isinstance(v, bool):
      continue
    if isinstance(v, (int, float)):
      return float(v)
  return None


def original_size(meta: dict[str, Any]):
  """(width, height) of the original image from img2dataset metadata, or None.

  img2dataset stores the resized size in width/height and the source size in
  original_width/original_height when it resized; we prefer the latter.
  """
  w = _num(meta, 'original_width', 'width', 'WIDTH')
  h = _num(meta, 'original_height', 'height', 'HEIGHT')
  if w is None or h is None:
    return None
  return w, h


def size_reason(w: float, h: float, cfg) -> str | None:
  short, long = min(w, h), max(w, h)
  if cfg.min_side and short < cfg.min_side:
    return 'small_image'
  if cfg.max_aspect and short > 0 and long / short > cfg.max_aspect:
    return 'aspect_ratio'
  return None


def metadata_reason(meta: dict[str, Any], cfg) -> str | None:
  """The first quality filter the metadata fails, or None.

  Thresholds set to None disable a filter.
  """
  size = original_size(meta)
  if size is not None:
    r = size_reason(size[0], size[1], cfg)
    if r:
      return r
  v = _num(meta, 'pwatermark', 'pwatermark_score')
  if cfg.max_watermark is not None and v is not None and v > cfg.max_watermark:
    return 'watermark'
  v = _num(meta, 'punsafe', 'punsafe_score')
  if cfg.max_unsafe is not None and v is not None and v > cfg.max_unsafe:
    return 'unsafe'
  v = _num(meta, 'aesthetic', 'AESTHETIC_SCORE', 'aesthetic_score')
  if cfg.min_aesthetic is not None and v is not None and v < cfg.min_aesthetic:
    return 'aesthetic'
  return None


def caption_reason(caption: str, cfg) -> str | None:
  n = len(caption)
  if cfg.min_caption_chars and n < cfg.min_caption_chars:
    return 'caption_short'
  if cfg.max_caption_chars and n > cfg.max_caption_chars:
    return 'caption_long'
  return None
