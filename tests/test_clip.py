"""Flax CLIP towers vs transformers (tiny random models), loading path, on-device preprocessing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.refs import clip as clip_ref
from data_pipelines import transforms
from unidiffuser_jax.models import clip
from unidiffuser_jax.weights import clip as clip_weights
from unidiffuser_jax.weights.convert import WeightMismatchError, flatten

TOL = 1e-4


def test_text_parity_through_directory_loader(tmp_path):
  ref = clip_ref.text_model()
  ref.save_pretrained(tmp_path / "text")
  tokens = np.random.default_rng(0).integers(0, 99, (3, 12)).astype(np.int64)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(tokens)).last_hidden_state.numpy()
  model, params = clip_weights.load_clip_text(str(tmp_path / "text"))
  assert (model.width, model.num_layers, model.max_positions) == (32, 2, 12)
  got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens, jnp.int32)))
  assert got.shape == (3, 12, 32)
  err = np.abs(got - want).max()
  assert err <= TOL, err
  # The causal mask matters: changing the last token leaves earlier positions unchanged.
  tokens2 = tokens.copy()
  tokens2[:, -1] = (tokens2[:, -1] + 1) % 99
  got2 = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens2, jnp.int32)))
  np.testing.assert_array_equal(got2[:, :-1], got[:, :-1])
  assert np.abs(got2[:, -1] - got[:, -1]).max() > 1e-3


def test_vision_parity_through_directory_loader(tmp_path):
  ref = clip_ref.vision_model()
  ref.save_pretrained(tmp_path / "vision")
  pixels = np.random.default_rng(1).standard_normal((2, 3, 24, 24)).astype(np.float32)
  with torch.no_grad():
    want = ref(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()
  model, params = clip_weights.load_clip_vision(str(tmp_path / "vision"))
  assert (model.image_size, model.patch_size, model.proj_dim) == (24, 8, 20)
  got = np.asarray(jax.jit(model.apply)({"params": params},
                                        jnp.asarray(pixels.transpose(0, 2, 3, 1))))
  assert got.shape == (2, 20)
  assert np.linalg.norm(want, axis=-1).min() > 1.5  # not normalised, and non-trivial
  err = np.abs(got - want).max()
  assert err <= TOL, err


def test_clipmodel_file_in_hub_cache(tmp_path, monkeypatch):
  """A CLIPModel checkpoint (both towers) found through a fake hub cache, .bin preferred last."""
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=12, pad_token_id=1,
                       bos_token_id=0, eos_token_id=2),
      vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=4, image_size=24, patch_size=8),
      projection_dim=16)
  full = clip_ref.randomise(transformers.CLIPModel(cfg), 2)
  snap = tmp_path / "hub" / "models--openai--clip-vit-base-patch32" / "snapshots" / "abc123"
  snap.mkdir(parents=True)
  full.config.to_json_file(str(snap / "config.json"))
  # Only a pytorch_model.bin: read with the safe unpickler.
  torch.save(full.state_dict(), snap / "pytorch_model.bin")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  assert clip_weights.find_model_dir("openai/clip-vit-base-patch32") == str(snap)
  model, params = clip_weights.load_clip_vision("openai/clip-vit-base-patch32")
  assert model.proj_dim == 16  # top-level projection_dim of a CLIPModel config
  pixels = np.random.default_rng(2).standard_normal((1, 3, 24, 24)).astype(np.float32)
  with torch.no_grad():
    want = full.get_image_features(pixel_values=torch.from_numpy(pixels))
    want = getattr(want, "pooler_output", want).numpy()
  got = np.asarray(model.apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1))))
  assert np.abs(got - want).max() <= TOL
  tmodel, tparams = clip_weights.load_clip_text("openai/clip-vit-base-patch32")
  assert tmodel.width == 32 and "token_embedding" in tparams
  # model.safetensors wins over pytorch_model.bin once present.
  (snap / "model.safetensors").write_bytes(b"")
  assert clip_weights._weight_file(str(snap)).endswith("model.safetensors")
  with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
    clip_weights.find_model_dir("openai/not-there")


def test_missing_tensor_is_named():
  ref = clip_ref.text_model()
  # CLIPModel-style names (the hub file of openai/clip-vit-large-patch14).
  tensors = {f"text_model.{k}": v.numpy() for k, v in ref.state_dict().items()}
  del tensors["text_model.encoder.layers.1.mlp.fc2.weight"]
  model = clip.CLIPTextEncoder(vocab_size=99, width=32, num_layers=2, num_heads=4, mlp_dim=40,
                               max_positions=12)
  with pytest.raises(WeightMismatchError,
                     match=r"text_model\.encoder\.layers\.1\.mlp\.fc2\.weight"):
    clip_weights.clip_text_params_from_tensors(model, tensors)


def test_preprocess_on_device_close_to_host():
  """jax bicubic on floats vs PIL bicubic on uint8: differ by ~ the uint8 step."""
  size = 24
  rng = np.random.default_rng(1)
  for h, w in [(48, 72), (61, 37), (24, 24)]:
    # Smooth images (upsampled noise): resampling differences stay small, as on photos.
    small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3)).astype(np.float32)
    img = np.asarray(jax.image.resize(small, (h, w, 3), "linear")).round().astype(np.uint8)
    want = transforms.clip_preprocess_np(img[None], size)  # the host preprocessing
    got = np.asarray(clip.clip_preprocess(jnp.asarray(img[None] / 127.5 - 1.0), size))
    assert got.shape == want.shape
    err = np.abs(got - want)
    # 1/255 / 0.26 = 0.015 is one uint8 step after normalisation.
    assert err.mean() < 0.006, err.mean()
    assert err.max() < 0.03, err.max()


def _check_full_size(model, template, entries, ref, n_params):
  theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()
            if not k.endswith("position_ids")}
  flat = flatten(template)
  assert sum(int(np.prod(x.shape)) for x in flat.values()) == n_params
  names = {e.name for e in entries}
  assert len(names) == len(entries) == len(flat)
  assert names <= set(theirs), sorted(names - set(theirs))[:5]
  for e in entries:
    fake = np.broadcast_to(np.zeros((), np.float32), theirs[e.name])  # no memory
    assert e.to_ours(fake).shape == flat[e.path].shape, e.name


def test_full_size_key_tables():
  """ViT-L/14 text and ViT-B/32 vision towers at full size against CLIPModel's names.

  torch models on the meta device and ShapeDtypeStruct templates: nothing is allocated.
  """
  large = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
               num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408)
  with torch.device("meta"):
    ref_l = transformers.CLIPModel(transformers.CLIPConfig(text_config=large, projection_dim=768))
    ref_b = transformers.CLIPModel(transformers.CLIPConfig(projection_dim=512))
  text = clip.CLIPTextEncoder()  # defaults: ViT-L/14's text tower
  text_cfg = clip_weights.text_config_from_json(ref_l.config.to_dict())
  assert text_cfg == {f: getattr(text, f) for f in text_cfg}
  _check_full_size(text, clip_weights.text_template(text), clip_weights.text_entries(12), ref_l,
                   123_060_480)
  vision = clip.CLIPVisionEncoder()  # defaults: ViT-B/32's vision tower + projection
  vision_cfg = clip_weights.vision_config_from_json(ref_b.config.to_dict())
  assert vision_cfg == {f: getattr(vision, f) for f in vision_cfg}
  _check_full_size(vision, clip_weights.vision_template(vision), clip_weights.vision_entries(12),
                   ref_b, 87_849_216)

# Compared against an independent reference (PyTorch / numpy re-derivation): `-m "not parity"` skips.
pytestmark = pytest.mark.parity
