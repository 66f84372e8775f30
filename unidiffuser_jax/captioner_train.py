"""Stage 1: train the caption decoder to reconstruct captions from CLIP text features.

  tokens --(frozen CLIP text encoder)--> hidden [B, L, W]
         --encode_prefix--> text latent [B, L, 64] --decode_prefix--> GPT-2 prefix
         --GPT-2, teacher forced--> caption tokens + <|EOS|>

The paper fine-tunes GPT-2 and the prefix layers this way (AdamW 2e-5, batch 768)
before freezing them for the U-ViT. It runs through the same loop, mesh,
checkpoints and metrics as the U-ViT (train.run_loop); only the Task differs.
Needed for new data or other languages: point config.data at the shards and
config.captioner.tokenizer at the caption tokenizer (GPT-2's, plus <|EOS|>).
"""
import jax
import numpy as np

from data_pipelines import transforms
from unidiffuser_jax import encoders as encoders_lib, input_pipeline, rng, sharding, train
from unidiffuser_jax.models import captioner as captioner_lib


def caption_tokens(tokenizer, captions, max_len: int, eos_id: int):
  """Host side: caption strings -> (ids int32 [B, max_len] ending in <|EOS|>, mask float32).

  Text is truncated to leave room for the EOS; positions after it are padded
  with 0 and masked out of the loss.
  """
  ids = np.zeros((len(captions), max_len), np.int32)
  mask = np.zeros((len(captions), max_len), np.float32)
  for i, text in enumerate(captions):
    text = text.decode() if isinstance(text, bytes) else str(text)
    toks = tokenizer(text, add_special_tokens=False)["input_ids"][: max_len - 1] + [eos_id]
    ids[i, : len(toks)] = toks
    mask[i, : len(toks)] = 1.0
  return ids, mask


def captioner_task(encoders, config, tokenizer) -> train.Task:
  cap = encoders.captioner
  seed = int(config.seed)
  max_len = int(config.captioner.max_caption_tokens)

  def init_params():
    latent = np.zeros((1, encoders.text_length, cap.prefix_hidden_dim), np.float32)
    params = cap.init(rng.key_for(seed, 0, "init/captioner"), latent,
                      np.zeros((1, 2), np.int32))["params"]
    return params

  def loss(params, frozen, batch, key):
    del key  # teacher forcing is deterministic
    hidden = encoders.text_hidden(frozen, batch["tokens"])
    logits = cap.apply({"params": params}, hidden, batch["caption_tokens"],
                       method=captioner_lib.CaptionDecoder.reconstruct)
    ce = captioner_lib.caption_loss(logits, batch["caption_tokens"], batch["caption_mask"])
    correct = (logits.argmax(-1) == batch["caption_tokens"]) * batch["caption_mask"]
    return ce, {"token_accuracy": correct.sum() / batch["caption_mask"].sum()}

  def prepare_batch(batch):
    captions = batch.pop("caption")
    batch.pop("key", None)
    batch["caption_tokens"], batch["caption_mask"] = caption_tokens(
        tokenizer, list(captions), max_len, cap.eos_id)
    return {k: batch[k] for k in ("tokens", "caption_tokens", "caption_mask", "skipped")
            if k in batch}

  return train.Task("captioner", init_params, loss, prepare_batch)


def train_captioner(config, workdir: str, *, data_iterator=None) -> dict:
  """Runs stage 1 into `workdir` (its own checkpoints; resumable like the U-ViT)."""
  train_cfg = config.captioner.train
  mesh = sharding.make_mesh(config.mesh)
  train.check_config(config, train_cfg, mesh)
  encoders = encoders_lib.build(config.encoders)
  # Only the CLIP text encoder is an input here; the captioner itself is trained.
  weights = dict(config.encoders.weights, captioner="")
  frozen, frozen_shardings = encoders.load_params(weights, mesh, int(config.seed),
                                                  config.sharding.rules)
  tokenizer = transforms.load_tokenizer(config.captioner.tokenizer or config.data.tokenizer)
  if data_iterator is None:
    data_cfg = config.data.copy_and_resolve_references()
    data_cfg.unlock()
    data_cfg.with_text = True
    cfg = config.copy_and_resolve_references()
    cfg.unlock()
    cfg.data = data_cfg
    data_iterator = input_pipeline.make_train_iterator(cfg, train_cfg, jax.process_index(),
                                                       jax.process_count())
  task = captioner_task(encoders, config, tokenizer)
  # init_from: fine-tune imported weights (e.g. hub GPT-2 via --mode=import).
  built = train.build_task(config, train_cfg, task, mesh, frozen, frozen_shardings)
  return train.run_loop(config, train_cfg, built, workdir, data_iterator,
                        init_from=train_cfg.init_from)

