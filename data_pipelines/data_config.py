"""The data config's fields and their defaults (`config.data`, an ml_collections ConfigDict).

  shards             str: shard tars: comma list of files, directories (all
                     *.tar), globs, '{00000..00099}' ranges; any epath path
                     (local, gs://).
  features           str | None: precomputed ArrayRecord feature shards (same
                     syntax, directories mean *.array_record); used by
                     features.make_feature_iterator.
  resolution         int: image side after centre square crop + LANCZOS (256).
  clip_resolution    int: CLIP image input side (224).
  tokenizer          str: tokenizer directory or a hub id in the local cache
                     (transforms.load_tokenizer); '' = no tokens (batches then
                     carry `caption` strings instead).
  max_length         int: token ids padded/truncated to this length (77).
  shuffle_buffer     int: window-shuffle window in records (0/1 = off).
  interleave_cycle   int: shards read concurrently per host (or per worker).
  num_workers        int: grain worker processes (0 = in-process).
  prefetch           int: batches buffered ahead (per worker with workers).
  data_type          int: value of the `data_type` field (0 web, 1 clean).
  drop_remainder     bool: drop the last partial batch of a finite run.
  with_text          bool: also return `key` and `caption` string arrays.
  min_side           int: minimum original short side (0 = off).
  max_aspect         float | None: maximum long/short side ratio.
  max_watermark      float | None: maximum pwatermark.
  max_unsafe         float | None: maximum punsafe.
  min_aesthetic      float | None: minimum aesthetic score.
  min_caption_chars  int: minimum cleaned caption length.
  max_caption_chars  int | None: maximum cleaned caption length.
  max_image_pixels   int: header pixel limit checked before decoding.
"""
import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.shards = ''
  c.features = ml_collections.FieldReference(None, field_type=str)
  c.resolution = 256
  c.clip_resolution = 224
  c.tokenizer = ''
  c.max_length = 77
  c.shuffle_buffer = 1000
  c.interleave_cycle = 4
  c.num_workers = 0
  c.prefetch = 2
  c.data_type = 0
  c.drop_remainder = True
  c.with_text = False
  c.min_side = 0
  c.max_aspect = ml_collections.FieldReference(None, field_type=float)
  c.max_watermark = ml_collections.FieldReference(None, field_type=float)
  c.max_unsafe = ml_collections.FieldReference(None, field_type=float)
  c.min_aesthetic = ml_collections.FieldReference(None, field_type=float)
  c.min_caption_chars = 1
  c.max_caption_chars = ml_collections.FieldReference(None, field_type=int)
  c.max_image_pixels = 64_000_000
  return c


def with_defaults(data_cfg) -> ml_collections.ConfigDict:
  """data_cfg completed with default_data_config() for fields it lacks.

  Configs may carry extra fields (source, demo, ...); they are kept.
  """
  merged = default_data_config().to_dict()
  merged.update(data_cfg.to_dict() if hasattr(data_cfg, 'to_dict')
                else dict(data_cfg))
  return ml_collections.ConfigDict(merged)
