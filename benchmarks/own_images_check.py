"""README's "Your own images on a CPU" recipe, followed on a folder of real scans, and judged.

  python benchmarks/own_images_check.py make --dir=workdirs/own
  # then README's steps 1-4 on workdirs/own, as written (my_images/, my_images.csv, prompts.txt,
  # held_out/), adding --config.sample.num=197 to step 4 so every held-out input is sampled
  python benchmarks/own_images_check.py judge --dir=workdirs/own --workdir=workdirs/mine

`make` writes what a user would have: 1,600 PNG scans of handwritten digits (scikit-learn's
bundled set, dark ink on white, 28 px: larger than the recipe's 16, so the pipeline resizes
them) in my_images/ with captions in five phrasings of our own, not the built-in set's
(my_images.csv), and 197 other scans in held_out/ whose captions are the t2i prompts
(prompts.txt; held_out.csv keeps the truth). `judge` scores step 4's outputs: the t2i images by
the handwriting set's nearest-neighbour judge (data_pipelines/handwriting_data.py; no held-out
scan is among its references), the i2t captions by their digit word. docs/SMALL_DATA.md
("Session 15") records the runs.
"""
import argparse
import csv
import glob
import json
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from data_pipelines import handwriting_data as hw  # noqa: E402

PHRASINGS = ("a picture of a handwritten {d}", "{d}, written by hand", "the number {d}",
             "a scanned digit: {d}", "someone wrote the digit {d}")
N_TRAIN, N_HELDOUT, SIZE = 1600, 197, 28


def _label(name: str) -> str:
  return hw.DIGITS[int(hw._digits()[1][int(name[4:8])])]


def make(out: str) -> None:
  train, heldout = hw.split_indices(N_TRAIN, N_HELDOUT, 0)
  rng = np.random.default_rng(3)
  for sub, idx in (("my_images", train), ("held_out", heldout)):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
    rows = []
    for i in idx:
      name = f"scan{int(i):04d}.png"
      Image.fromarray(hw.render(int(i), SIZE)).save(os.path.join(out, sub, name))
      rows.append((name, PHRASINGS[rng.integers(len(PHRASINGS))].format(d=_label(name))))
    with open(os.path.join(out, f"{sub}.csv"), "w", newline="") as f:
      csv.writer(f).writerows([("file", "caption")] + rows)
    if sub == "held_out":
      with open(os.path.join(out, "prompts.txt"), "w") as f:
        f.write("\n".join(c for _, c in rows) + "\n")
  print(f"{out}: {len(train)} scans in my_images/ (+ my_images.csv), {len(heldout)} in held_out/,"
        f" prompts.txt")


def judge(out: str, workdir: str) -> dict:
  with open(os.path.join(out, "held_out.csv")) as f:
    names = [row[0] for row in list(csv.reader(f))[1:]]
  pngs = sorted(glob.glob(os.path.join(workdir, "samples", "t2i", "0*.png")))
  pred = hw.judge_images([np.asarray(Image.open(p).convert("RGB")) for p in pngs])
  t2i = float(np.mean([p["digit"] == _label(n) for p, n in zip(pred, names)]))
  with open(os.path.join(workdir, "samples", "i2t", "captions.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  i2t = float(np.mean([hw.parse_caption(r["caption"])["digit"] == _label(os.path.basename(r["image"]))
                       for r in recs]))
  print(f"t2i digit {t2i:.3f} ({len(pred)} images), i2t digit {i2t:.3f} ({len(recs)} captions); "
        f"chance 0.10")
  return {"t2i": t2i, "i2t": i2t, "n_t2i": len(pred), "n_i2t": len(recs)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("what", choices=("make", "judge"))
  p.add_argument("--dir", required=True, help="the user's folder: my_images/, held_out/, ...")
  p.add_argument("--workdir", help="judge: the run's workdir (step 4's samples/)")
  a = p.parse_args()
  if a.what == "make":
    make(a.dir)
  elif not a.workdir:
    p.error("judge needs --workdir")
  else:
    judge(a.dir, a.workdir)


if __name__ == "__main__":
  main()
