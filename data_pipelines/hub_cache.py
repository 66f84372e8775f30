"""Where a Hugging Face hub repo's files lie in the local hub cache; never downloads.

The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`;
a repo `org/name` lives in `models--org--name/snapshots/<revision>/`. Tokenizers
(transforms.load_tokenizer) and released weights (unidiffuser_jax.weights,
weight_jobs) are all found through `snapshot_dirs`.
"""
import glob
import os

# Hub ids that moved: the cache may hold the repo under either name.
_MOVED = {'gpt2': ('openai-community/gpt2',)}


def cache_dir() -> str:
  if os.environ.get('HF_HUB_CACHE'):
    return os.environ['HF_HUB_CACHE']
  if os.environ.get('HF_HOME'):
    return os.path.join(os.environ['HF_HOME'], 'hub')
  return os.path.join(os.path.expanduser('~'), '.cache', 'huggingface', 'hub')


def repo_dir(repo_id: str) -> str:
  """The cache folder of `repo_id` (it may not exist)."""
  return os.path.join(cache_dir(), 'models--' + repo_id.replace('/', '--'))


def snapshot_dirs(repo_id: str) -> list[str]:
  """The snapshot folders of `repo_id` in the local cache, best first.

  The snapshot that refs/main names comes first, then the others in sorted
  order; a repo that moved is also looked for under its new id. Empty when
  the cache holds nothing for it.
  """
  out = []
  for rid in (repo_id,) + _MOVED.get(repo_id, ()):
    repo = repo_dir(rid)
    ref = os.path.join(repo, 'refs', 'main')
    if os.path.isfile(ref):
      with open(ref) as f:
        out.append(os.path.join(repo, 'snapshots', f.read().strip()))
    out += sorted(glob.glob(os.path.join(repo, 'snapshots', '*')))
  return [d for i, d in enumerate(out) if os.path.isdir(d) and d not in out[:i]]
