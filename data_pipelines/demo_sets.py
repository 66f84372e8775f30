"""The generated demo data sets by name (config.demo.set): each module writes its shards
and word-level tokenizer (build_demo) and judges samples (score_t2i, score_i2t,
parse_caption), with the same interface.

  shapes  demo_data.py:  "a red circle on the left"   (colour, shape, position)
  glyphs  glyph_data.py: "purple 7, dark backdrop"    (digit, colour, background)
"""
from types import ModuleType

from data_pipelines import demo_data, glyph_data

SETS = {"shapes": demo_data, "glyphs": glyph_data}


def get(name: str) -> ModuleType:
  if name not in SETS:
    raise ValueError(f"config.demo.set={name!r}; use one of {sorted(SETS)} (or '' for your own "
                     f"data in config.data.shards)")
  return SETS[name]
