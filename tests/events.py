"""TensorBoard scalars a run wrote, for tests: {tag: [(step, value), ...]}."""
import glob
import os

import tensorflow as tf


def scalars(workdir) -> dict:
  out = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        out.setdefault(v.tag, []).append(
            (event.step, float(tf.make_ndarray(v.tensor)) if v.HasField("tensor")
             else v.simple_value))
  return out
