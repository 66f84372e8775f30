"""Pieces every runbook shares: sharding rules, optimiser recipe, checkpoint cadence."""
import ml_collections as mc

# Logical axis -> mesh axis. FSDP splits the model width; tensor parallelism
# splits heads and MLP hidden units. Everything else is replicated.
SHARDING_RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("io", None),
    ("norm", None),
    ("pos", None),
    ("layers", None),
    # Activations (models/uvit.constrain_activation): batch over the data-parallel axes.
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
)


def sharding() -> mc.ConfigDict:
  return mc.ConfigDict({"rules": [list(r) for r in SHARDING_RULES]})


def train(**overrides) -> mc.ConfigDict:
  """The paper's recipe: AdamW 2e-4, wd 0.03, betas (0.9, 0.9), warm-up then constant, EMA 0.9999."""
  cfg = mc.ConfigDict(dict(
      steps=1000, batch_size=8, grad_accum=1,
      lr=2e-4, warmup_steps=5000, weight_decay=0.03, betas=(0.9, 0.9), grad_clip_norm=1.0,
      ema_decay=0.9999,
      clean_prob=0.0,  # fraction of samples with one modality clean (objective.py); paper: 0
      loss_weight="eps",  # "eps" (paper) or "v": per-timestep loss weight (objective.py)
      min_snr_gamma=0.0,  # loss weight min(SNR, gamma) / SNR per part (objective.py); paper: 0
      log_every=50, checkpoint_every=1000, keep_checkpoints=3,
      eval_every=0,  # steps between a runbook's evaluations (the demo's judge); 0 = none
      init_from="",  # fine-tune: params dir from --mode=import, or a workdir (its EMA)
  ))
  cfg.update(overrides)
  return cfg
