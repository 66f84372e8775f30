"""What tests/test_sample_multiprocess.py runs in each process (and in one): kept apart from the
test module so that the worker processes import no test-only references."""
import os

import numpy as np

from configs import demo
from unidiffuser_jax import evaluate, sample, vocab

PROMPTS = ("a red circle on the left", "a blue square at the top", "a green triangle")


def tiny_config(tokenizer: str, checkpoint: str):
  """conftest's tiny_sampler config (its tokenizer and checkpoint), 8 samples per batch."""
  config = vocab.derive(demo.get_config("tiny"))
  config.data.tokenizer = tokenizer
  vocab.derive(config)
  config.sample.update(steps=3, order=2, guidance_scale=3.0, max_caption_tokens=5, num_beams=2,
                       checkpoint=checkpoint, batch_size=8)
  config.mesh = dict(data=8, fsdp=1, tensor=1, num_devices=0)
  return config


def run_tasks(config, image_dir: str, clip_dir: str, workdir: str) -> dict:
  """t2i over 10 prompts (two batches of 8, the second padded) and i2t over 3 images; then
  evaluate.run's CLIP scores of both tasks over config.sample's prompts and those images."""
  prompts = [PROMPTS[i % 3] + f" {i}" for i in range(10)]
  config = config.copy_and_resolve_references()   # one sampler config: compiled once
  config.sample.update(prompts=tuple(prompts), images=(image_dir,))
  config.eval.update(source="", tasks=("t2i", "i2t"), metrics=("clip_score",), clip=clip_dir,
                     num=10, feature_batch_size=8, save_samples=0)
  sampler = sample.load_sampler(config, config.sample.checkpoint)
  t2i = sample.generate("t2i", {"prompts": prompts}, 10, config, progress=False, **sampler)
  images = sorted(os.path.join(image_dir, f) for f in os.listdir(image_dir))
  host = {"images": images, "image_names": [os.path.basename(i) for i in images]}
  i2t = sample.generate("i2t", host, len(images), config, progress=False, **sampler)
  rows = evaluate.run(config, workdir)["rows"]
  return dict(pixels=np.stack([r["pixels"] for r in t2i]),
              t2i_index=[r["index"] for r in t2i],
              captions=[r["caption"] for r in i2t], i2t_images=[r["image"] for r in i2t],
              clip_scores={r["task"]: r["clip_score"] for r in rows})
