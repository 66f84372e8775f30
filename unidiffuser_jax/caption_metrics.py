"""Corpus BLEU-1..4 and CIDEr-D for captions, in pure Python, as pycocoevalcap scores them.

Inputs are ``candidates: {id: str}`` and ``references: {id: [str, ...]}`` with
the same ids, every string ALREADY TOKENISED: tokens are what ``str.split()``
gives, exactly as pycocoevalcap's Bleu and Cider scorers treat their input.
The COCO toolkit normally runs its Java PTBTokenizer first (lowercasing,
splitting clitics such as "dog's" -> "dog 's", dropping punctuation tokens);
no Java is used here. ``simple_tokenize`` is a stand-in: lowercase, replace
the punctuation characters that PTBTokenizer drops (. , ? ! : ; - ` ' " and
brackets) by spaces, and collapse whitespace. It matches PTBTokenizer on plain
captions but not on clitics or hyphenated words, so scores on raw text can
differ slightly from numbers computed with the Java tokenizer.

BLEU (``bleu``): pycocoevalcap's ``Bleu(4)``: per candidate, n-gram matches
clipped by the maximum count in any one reference; matches and candidate
n-gram counts are summed over the corpus; BLEU-n is the geometric mean of
the n precisions 1..n (with pycocoevalcap's 1e-15 / 1e-9 guards) times the
brevity penalty ``exp(1 - r / c)`` when the corpus candidate length ``c`` is
below ``r``, the sum over candidates of the "closest" reference length (ties
go to the shorter reference).

CIDEr-D (``cider_d``): pycocoevalcap's ``Cider`` scorer, which is CIDEr-D
(Vedantam et al.'s variant used by the COCO server), not plain CIDEr: n = 1..4
tf-idf vectors with document frequencies over the reference sets of the
evaluated corpus (idf = log(#images) - log(max(1, df))), candidate weights
clipped at the reference's (``min(hyp, ref) * ref``), cosine per n, times the
Gaussian length penalty ``exp(-delta^2 / (2 * 6^2))``, averaged over n and over
references, times 10; the corpus score is the mean over candidates. As in
pycocoevalcap (and the original CIDEr-D code), ``delta`` is the difference of
the BIGRAM counts of candidate and reference (word count - 1 for sentences of
two or more words), not of word counts.
"""
from collections import Counter
from collections.abc import Mapping, Sequence
import math
import re

MAX_N = 4
CIDER_SIGMA = 6.0
_PUNCT = re.compile(r"[.,?!:;\-`'\"()\[\]{}]")


def simple_tokenize(text: str) -> str:
  """Lowercase, punctuation dropped, single spaces (see module docs; not PTBTokenizer)."""
  return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _ngrams(sentence: str, max_n: int = MAX_N) -> tuple[int, Counter]:
  words = sentence.split()
  counts = Counter(tuple(words[i:i + k]) for k in range(1, max_n + 1)
                   for i in range(len(words) - k + 1))
  return len(words), counts


def _check(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> list:
  if set(candidates) != set(references):
    only_c = sorted(set(candidates) - set(references), key=str)[:3]
    only_r = sorted(set(references) - set(candidates), key=str)[:3]
    raise ValueError(f"candidates and references need the same ids (only in candidates: "
                     f"{only_c}, only in references: {only_r})")
  if not candidates:
    raise ValueError("no captions to score")
  for k, refs in references.items():
    if isinstance(refs, str) or len(refs) < 1:
      raise ValueError(f"references[{k!r}] must be a non-empty list of strings")
    if not isinstance(candidates[k], str):
      raise ValueError(f"candidates[{k!r}] must be one string, got {type(candidates[k]).__name__}")
  return list(candidates)


def bleu(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]],
         max_n: int = MAX_N) -> list[float]:
  """Corpus [BLEU-1, ..., BLEU-max_n] (fractions in [0, 1], as pycocoevalcap reports)."""
  ids = _check(candidates, references)
  tiny, small = 1e-15, 1e-9
  cand_len = ref_len = 0
  guess, correct = [0] * max_n, [0] * max_n
  for k in ids:
    c_len, c_counts = _ngrams(candidates[k], max_n)
    max_ref: dict = {}
    ref_lens = []
    for ref in references[k]:
      r_len, r_counts = _ngrams(ref, max_n)
      ref_lens.append(r_len)
      for g, n in r_counts.items():
        max_ref[g] = max(max_ref.get(g, 0), n)
    cand_len += c_len
    ref_len += min((abs(r - c_len), r) for r in ref_lens)[1]
    for n in range(max_n):
      guess[n] += max(0, c_len - n)
    for g, n in c_counts.items():
      correct[len(g) - 1] += min(n, max_ref.get(g, 0))
  scores, product = [], 1.0
  for n in range(max_n):
    product *= (correct[n] + tiny) / (guess[n] + small)
    scores.append(product ** (1.0 / (n + 1)))
  ratio = (cand_len + tiny) / (ref_len + small)
  if ratio < 1:
    scores = [s * math.exp(1 - 1 / ratio) for s in scores]
  return scores


def _tfidf(counts: Counter, doc_freq: Counter, log_num_docs: float, max_n: int):
  """Per-n tf-idf dicts, their norms, and the bigram count (CIDEr-D's 'length')."""
  vecs = [dict() for _ in range(max_n)]
  norms = [0.0] * max_n
  for g, tf in counts.items():
    n = len(g) - 1
    w = tf * (log_num_docs - math.log(max(1.0, doc_freq[g])))
    vecs[n][g] = w
    norms[n] += w * w
  bigrams = sum(tf for g, tf in counts.items() if len(g) == 2)
  return vecs, [math.sqrt(x) for x in norms], bigrams


def cider_d(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]],
            max_n: int = MAX_N, sigma: float = CIDER_SIGMA) -> tuple[float, dict]:
  """(corpus CIDEr-D, {id: per-candidate CIDEr-D}); see module docs for the rules."""
  ids = _check(candidates, references)
  ref_counts = {k: [_ngrams(r, max_n)[1] for r in references[k]] for k in ids}
  doc_freq: Counter = Counter()
  for k in ids:
    doc_freq.update({g for c in ref_counts[k] for g in c})
  log_num_docs = math.log(len(ids))
  per_id = {}
  for k in ids:
    c_vec, c_norm, c_len = _tfidf(_ngrams(candidates[k], max_n)[1], doc_freq, log_num_docs,
                                  max_n)
    total = [0.0] * max_n
    for rc in ref_counts[k]:
      r_vec, r_norm, r_len = _tfidf(rc, doc_freq, log_num_docs, max_n)
      penalty = math.exp(-float(c_len - r_len) ** 2 / (2 * sigma ** 2))
      for n in range(max_n):
        dot = sum(min(w, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0)
                  for g, w in c_vec[n].items())
        if c_norm[n] != 0 and r_norm[n] != 0:
          dot /= c_norm[n] * r_norm[n]
        total[n] += dot * penalty
    per_id[k] = sum(total) / max_n / len(ref_counts[k]) * 10.0
  return sum(per_id.values()) / len(per_id), per_id
