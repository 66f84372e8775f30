"""The generated demo data sets by name (config.demo.set), and their scoring.

Each set module has the same interface: build_demo (shards + word-level tokenizer),
ATTRIBUTES and CHANCE, judge_image (attributes off the pixels) and parse_caption (off a
caption). score_t2i / score_i2t here turn those into per-attribute accuracy.

  shapes  demo_data.py:  "a red circle on the left"   (colour, shape, position)
  glyphs  glyph_data.py: "purple 7, dark backdrop"    (digit, colour, background)
  handwriting  handwriting_data.py: "a handwritten seven"  (digit; real scans, scikit-learn's)
"""
from types import ModuleType
from typing import Any, Sequence

from data_pipelines import demo_data, glyph_data, handwriting_data

SETS = {"shapes": demo_data, "glyphs": glyph_data, "handwriting": handwriting_data}


def get(name: str) -> ModuleType:
  if name not in SETS:
    raise ValueError(f"config.demo.set={name!r}; use one of {sorted(SETS)} (or '' for your own "
                     f"data in config.data.shards)")
  return SETS[name]


def accuracy(demo_set: ModuleType, pred: Sequence[dict], truth: Sequence[dict]) -> dict[str, Any]:
  """Per-attribute and all-attributes accuracy of `pred` against `truth` (a None prediction
  never counts as right), with the set's chance levels."""
  if len(pred) != len(truth):
    raise ValueError(f"{len(pred)} predictions vs {len(truth)} truths")
  attributes = demo_set.ATTRIBUTES
  right = lambda p, t, a: p.get(a) is not None and p.get(a) == t.get(a)
  n = max(1, len(pred))
  out: dict[str, Any] = {a: sum(right(p, t, a) for p, t in zip(pred, truth)) / n
                         for a in attributes}
  out["all"] = sum(all(right(p, t, a) for a in attributes) for p, t in zip(pred, truth)) / n
  out["n"] = len(pred)
  out["chance"] = dict(demo_set.CHANCE)
  return out


def score_t2i(demo_set: ModuleType, images, prompts: Sequence[str]) -> dict[str, Any]:
  """Text-to-image: each image (uint8 [H, W, 3]) judged against the attributes its prompt names."""
  return accuracy(demo_set, [demo_set.judge_image(im) for im in images],
                  [demo_set.parse_caption(p) for p in prompts])


def score_i2t(demo_set: ModuleType, captions: Sequence[str], truth: Sequence[dict]
              ) -> dict[str, Any]:
  """Image-to-text: the attribute words of each caption against its input image's attributes."""
  return accuracy(demo_set, [demo_set.parse_caption(c) for c in captions], truth)
