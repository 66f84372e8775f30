"""Vocabulary sizes and the caption decoder's <|EOS|> id come from the tokenizers, for every
config; weights with another vocabulary stop with one clear line."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
import tokenizers as hf_tokenizers
import transformers

from configs import demo, laion
from data_pipelines import demo_data, transforms
from unidiffuser_jax import vocab
from unidiffuser_jax.models import captioner as captioner_lib
from unidiffuser_jax.errors import ConfigError


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory):
  return demo_data.build_tokenizer(str(tmp_path_factory.mktemp("vocab") / "tok"))


def test_no_config_sets_the_vocabulary():
  for c in (demo.get_config(), laion.get_config()):
    assert "vocab_size" not in c.encoders.clip_text and "vocab_size" not in c.encoders.captioner
    assert "eos_id" not in c.encoders.captioner


def test_derived_from_the_data_tokenizer(word_tok):
  tok = transforms.load_tokenizer(word_tok)
  c = vocab.derive(demo.get_config("tiny"))
  c.data.update(source="shards", tokenizer=word_tok)
  vocab.derive(c)
  assert c.encoders.clip_text.vocab_size == c.encoders.captioner.vocab_size == len(tok) != 64
  assert c.encoders.captioner.eos_id == tok.convert_tokens_to_ids("<|EOS|>")


def test_synthetic_data_without_a_tokenizer():
  c = vocab.derive(demo.get_config("tiny"))
  c.data.synthetic_vocab_size = 50
  vocab.derive(c)
  assert (c.encoders.clip_text.vocab_size, c.encoders.captioner.eos_id) == (50, 49)


def test_caption_tokenizer_without_eos_is_refused(tmp_path, word_tok):
  model = hf_tokenizers.models.WordLevel({"[UNK]": 0, "a": 1, "cat": 2}, unk_token="[UNK]")
  plain = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tokenizers.Tokenizer(model),
                                               unk_token="[UNK]")
  plain.save_pretrained(str(tmp_path / "plain"))
  c = vocab.derive(demo.get_config("tiny"))
  c.data.update(source="shards", tokenizer=word_tok)
  c.captioner.tokenizer = str(tmp_path / "plain")
  with pytest.raises(ConfigError, match=r"config.captioner.tokenizer=.*plain has no <\|EOS\|>"):
    vocab.derive(c)
  c.data.tokenizer = ""
  with pytest.raises(ConfigError, match="config.data.tokenizer is empty"):
    vocab.derive(c)


@pytest.mark.slow
def test_weights_with_another_vocabulary_are_refused(tmp_path, word_tok):
  n = len(transforms.load_tokenizer(word_tok))
  c = vocab.derive(demo.get_config("tiny"))   # synthetic: 64 tokens
  cap = captioner_lib.CaptionDecoder(**c.encoders.captioner)
  params = nn.unbox(cap.init(jax.random.key(0), jnp.zeros((1, 6, 8)),
                             jnp.zeros((1, 2), jnp.int32))["params"])
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "cap", jax.device_get(params))
  c.encoders.weights.captioner = str(tmp_path / "cap")
  vocab.derive(c)   # the same 64 tokens: fine
  c.data.update(source="shards", tokenizer=word_tok)
  with pytest.raises(ConfigError) as e:
    vocab.derive(c)
  msg = str(e.value)
  assert "\n" not in msg and f"has a 64-token vocabulary but its tokenizer has {n}" in msg
  assert "config.encoders.weights.captioner=" in msg
  c.encoders.weights.captioner = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match="does not exist"):
    vocab.derive(c)
  assert os.path.isdir(tmp_path / "cap")
