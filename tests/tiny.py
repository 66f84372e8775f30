"""A tiny version of the demo config that compiles fast, shared by the tests."""
from configs import demo
from unidiffuser_jax import vocab


def tiny_config(**train_overrides):
  c = demo.get_config()
  c.runbook = ""
  c.data.source = "synthetic"
  c.encoders.fit_latent_stats = 0   # fixed latent scale: tests that fit it say so
  c.data.resolution = 16
  c.data.clip_resolution = 16
  c.data.max_length = 6
  c.encoders.autoencoder.factor = 2   # 8x8x12 latent, 16 patches of 48 values
  c.encoders.clip_image.patch_size = 8
  c.encoders.clip_image.width = 32
  c.encoders.clip_image.mlp_dim = 64
  c.encoders.clip_image.num_layers = 1
  c.encoders.clip_text.width = 32
  c.encoders.clip_text.mlp_dim = 64
  c.encoders.clip_text.num_layers = 1
  c.encoders.captioner.update(prefix_inner_dim=32, prefix_hidden_dim=8, n_embd=32, n_layer=1,
                              n_positions=16)
  c.model.update(width=32, depth=2, num_heads=4, mlp_dim=64)
  c.train.update(steps=6, batch_size=8, warmup_steps=2, lr=1e-3, log_every=1, checkpoint_every=3,
                 ema_decay=0.9)
  c.train.update(train_overrides)
  return vocab.derive(c)   # synthetic tokens: data.synthetic_vocab_size, <|EOS|> its last id
