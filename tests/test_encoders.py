"""The encoder bundle's latent normalisation: shift/scale of the image latent, text_scale."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo, laion
from data_pipelines import demo_data
from unidiffuser_jax import encoders as encoders_lib
from unidiffuser_jax.models import pixel_ae, vae


def _demo_images(n=64, size=16):
  rng = np.random.default_rng(0)
  imgs = []
  for _ in range(n):
    a = demo_data.sample_attrs(rng)
    imgs.append(demo_data.render(a["colour"], a["shape"], a["position"], size, rng))
  return jnp.asarray(np.stack(imgs), jnp.float32) / 127.5 - 1.0


def test_fixed_shift_and_scale_normalise_and_decode_back():
  cfg = demo.get_config().encoders
  assert cfg.fit_latent_stats > 0   # the demo measures them on its data (latent_stats.py)
  cfg.autoencoder.update(scale=3.0, shift=0.67)   # the fixed path (fit_latent_stats=0)
  enc = encoders_lib.build(cfg)
  x = _demo_images()
  params = {"autoencoder": {}}   # the pixel AE has no parameters
  z = enc.latent_from_moments(enc.image_moments(params, x), jax.random.key(0))
  np.testing.assert_allclose(np.asarray(z), (np.asarray(x).reshape(z.shape[0], 8, 2, 8, 2, 3)
                                             .transpose(0, 1, 3, 2, 4, 5).reshape(z.shape)
                                             - 0.67) * 3.0, atol=5e-2)  # posterior noise x 3
  back = enc.decode_latent(params, z)
  # The pixel AE's posterior std is exp(-6) ~ 2.5e-3 pixel units.
  np.testing.assert_allclose(np.asarray(back), np.asarray(x), atol=2e-2)


def test_text_scale_is_undone_before_the_caption_decoder():
  cfg = demo.get_config().encoders
  cfg.text_scale = 2.5
  enc = encoders_lib.build(cfg)
  t = jax.random.normal(jax.random.key(1), (2, 12, 16))
  np.testing.assert_allclose(np.asarray(enc.caption_prefix(t * 2.5)), np.asarray(t), rtol=1e-6)


def test_released_model_config_uses_the_plain_sd_scaling():
  enc_cfg = laion.get_config("v1").encoders
  assert enc_cfg.autoencoder.scale == 0.18215
  assert enc_cfg.autoencoder.shift == 0.0 and enc_cfg.text_scale == 1.0
  assert enc_cfg.fit_latent_stats == 0   # the published constants, not fitted


def test_pixel_autoencoder_is_a_parameter_free_module_with_the_vae_interface():
  ae = pixel_ae.PixelAutoencoder(factor=2)
  x = _demo_images(n=2)
  assert ae.init(jax.random.key(0), x) == {}
  moments = ae.apply({}, x, method="encode")
  assert moments.shape == (2, 8, 8, 24) and moments.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(moments[..., 12:]), pixel_ae.LOGVAR)
  np.testing.assert_array_equal(np.asarray(ae.apply({}, moments[..., :12], method="decode")),
                                np.asarray(x))
  for name in ("encode", "decode", "in_channels", "latent_channels", "downsample_factor"):
    assert hasattr(vae.AutoencoderKL, name) and hasattr(pixel_ae.PixelAutoencoder, name), name
  with pytest.raises(ValueError, match="12 channels"):
    ae.apply({}, moments, method="decode")


def test_autoencoder_factor_must_match_the_module():
  cfg = demo.get_config().encoders
  cfg.autoencoder.kind = "vae"   # 2 levels of (8, 8) channels downsample by 2, not 4
  cfg.autoencoder.update(factor=4, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)
  with pytest.raises(ValueError, match="factor=4 but the vae autoencoder downsamples by 2"):
    encoders_lib.build(cfg)
