"""Host input pipelines: webdataset tar shards or precomputed features -> batches.

A leaf package: it imports nothing from unidiffuser_jax (tests/test_layering.py).
Modules: shards (tar reading), transforms (images, the host CLIP preprocessing,
captions, tokens, the tokenizer loader), hub_cache (the local Hugging Face cache),
filters (metadata filters, SKIP_REASONS), records (entries -> examples),
iterators (grain datasets -> per-host batches), features (precomputed feature
shards), synthetic (random batches), make_shards, make_tokenizer and check
(command-line tools), demo_sets with demo_data and glyph_data (offline demo sets
and their judges). The readers take config.data as given: configs/common.py's
data() declares and documents its keys.
"""
