"""Host input pipelines: webdataset tar shards or precomputed features -> batches.

Modules: shards (tar reading), transforms (images, CLIP input, captions,
tokens), filters (metadata filters, SKIP_REASONS), pipeline (grain iterators,
feature shards, default_data_config), make_shards and check (command-line
tools), demo_data (offline demo set and its judge).
"""
