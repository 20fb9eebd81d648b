"""Metrics of generated text (BLEU, chrF, ROUGE-L, BLEURT) and token-level perplexity.

The paper scores translation with BLEURT and summarisation with ROUGE-L, on greedy outputs; BLEU
and chrF come along for translation because they need no model. BLEU and chrF are corpus-level
sacreBLEU scores (0-100); ROUGE-L is rouge-score's F-measure averaged over examples (0-1).
sacrebleu and rouge-score are imported when first used; BLEURT needs its own package (which
brings TensorFlow) and a checkpoint, and is reported as skipped, with the reason, when either is
missing: an evaluation never fails for want of it.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Sequence

import numpy as np

TRANSLATION, SUMMARIZATION = "translation", "summarization"
TASK_KINDS = (TRANSLATION, SUMMARIZATION)

BLEURT_HELP = ("BLEURT needs `pip install git+https://github.com/google-research/bleurt` and a "
               "checkpoint: config.evaluation.bleurt_checkpoint")

# Han and kana carry no spaces between words: ROUGE and BLEU count them one character at a time.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


class BleurtUnavailable(RuntimeError):
    """BLEURT cannot be computed here (package or checkpoint missing)."""


def _check(predictions: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"metrics: {len(predictions)} predictions but {len(references)} "
                         "references")
    if not predictions:
        raise ValueError("metrics: no predictions to score")
    for name, texts in (("predictions", predictions), ("references", references)):
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"metrics: {name}[{bad}] is {type(texts[bad]).__name__}, not str")
    return predictions, references


def _languages(language: str | Sequence[str] | None, count: int) -> list[str | None]:
    if language is None or isinstance(language, str):
        return [language] * count
    language = list(language)
    if len(language) != count:
        raise ValueError(f"metrics: {len(language)} languages for {count} examples")
    return language


def bleu(predictions: Sequence[str], references: Sequence[str],
         language: str | Sequence[str] | None = None) -> float:
    """Corpus BLEU (sacreBLEU, one reference per example). Tokenised with sacreBLEU's 'zh'
    tokeniser when any target is Chinese ('zh'; it leaves other scripts to '13a'), else '13a'."""
    import sacrebleu

    predictions, references = _check(predictions, references)
    chinese = any((lang or "").lower().startswith("zh")
                  for lang in _languages(language, len(predictions)))
    return float(sacrebleu.corpus_bleu(predictions, [references],
                                       tokenize="zh" if chinese else "13a").score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacreBLEU defaults: character 6-grams, beta 2)."""
    import sacrebleu

    predictions, references = _check(predictions, references)
    return float(sacrebleu.corpus_chrf(predictions, [references]).score)


class _UnicodeTokenizer:
    """Lower-cased words of any script, Han and kana one character each; no stemming.

    rouge-score's own tokeniser keeps only [a-z0-9], which cuts 'Straße' into 'stra' and 'e'
    and leaves Chinese with no tokens at all.
    """

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())


@functools.lru_cache(maxsize=None)
def _rouge_scorer(english: bool):
    from rouge_score import rouge_scorer

    if english:
        return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeTokenizer())


def rouge_l(predictions: Sequence[str], references: Sequence[str],
            language: str | Sequence[str] | None = None) -> float:
    """ROUGE-L F-measure averaged over examples, in [0, 1].

    language: one code for all examples or one per example. English ('en') uses rouge-score's
    tokeniser with Porter stemming, as CNN/DailyMail results are usually reported; any other
    language (or None) uses a Unicode tokeniser without stemming.
    """
    predictions, references = _check(predictions, references)
    scores = []
    for prediction, reference, lang in zip(predictions, references,
                                           _languages(language, len(predictions))):
        english = (lang or "").lower().startswith("en")
        scores.append(_rouge_scorer(english).score(reference, prediction)["rougeL"].fmeasure)
    return float(np.mean(scores))


@functools.lru_cache(maxsize=2)
def _bleurt_scorer(checkpoint: str):
    try:
        from bleurt import score as bleurt_score
    except ImportError as error:
        raise BleurtUnavailable(f"{BLEURT_HELP} (the bleurt package is not installed)") from error
    return bleurt_score.BleurtScorer(checkpoint)


def bleurt(predictions: Sequence[str], references: Sequence[str],
           checkpoint: str | None) -> float:
    """Mean BLEURT score with the checkpoint at `checkpoint` (a directory, local or remote).

    Raises BleurtUnavailable (saying what to install or set) when the package or the checkpoint
    is missing.
    """
    predictions, references = _check(predictions, references)
    if not checkpoint:
        raise BleurtUnavailable(f"{BLEURT_HELP} (no checkpoint given)")
    if "://" not in checkpoint and not os.path.isdir(checkpoint):
        raise BleurtUnavailable(f"{BLEURT_HELP} (config.evaluation.bleurt_checkpoint={checkpoint!r} "
                                "is not a directory)")
    scores = _bleurt_scorer(checkpoint).score(references=references, candidates=predictions)
    return float(np.mean(scores))


def generation_metrics(task_kind: str, predictions: Sequence[str], references: Sequence[str],
                       bleurt_checkpoint: str | None = None, *,
                       language: str | Sequence[str] | None = None) -> dict:
    """The metrics of a task kind, as {name: float, ..., 'skipped': {name: reason}}.

    'translation': bleu, chrf, and bleurt when `bleurt_checkpoint` and the bleurt package are
    available (otherwise 'skipped' says why). 'summarization': rougeL. `language` is the
    target language code(s) (see `bleu` and `rouge_l`). 'skipped' is always present, empty when
    nothing was skipped.
    """
    kind = {"summarisation": SUMMARIZATION}.get(task_kind, task_kind)
    if kind not in TASK_KINDS:
        raise ValueError(f"generation_metrics: task_kind={task_kind!r}; expected one of "
                         f"{list(TASK_KINDS)}")
    predictions, references = _check(predictions, references)
    if kind == SUMMARIZATION:
        return {"rougeL": rouge_l(predictions, references, language), "skipped": {}}
    result = {"bleu": bleu(predictions, references, language),
              "chrf": chrf(predictions, references), "skipped": {}}
    try:
        result["bleurt"] = bleurt(predictions, references, bleurt_checkpoint)
    except BleurtUnavailable as error:
        result["skipped"]["bleurt"] = str(error)
    except Exception as error:  # noqa: BLE001 - a broken optional metric must not end the run.
        result["skipped"]["bleurt"] = f"BLEURT failed: {type(error).__name__}: {error}"
    return result


def perplexity(total_nll: float, num_tokens: float) -> float:
    """exp(total_nll / num_tokens): token-level perplexity from summed NLL in nats."""
    if not num_tokens > 0:
        raise ValueError(f"perplexity: num_tokens must be positive, got {num_tokens!r}")
    return math.exp(float(total_nll) / float(num_tokens))


def token_perplexity(logits, targets, weights) -> float:
    """Perplexity of `targets` [B, L] under `logits` [B, L, V], over tokens where `weights` is
    nonzero (e.g. decoder_loss_weights: target tokens only)."""
    from ul2_lm.losses import weighted_cross_entropy

    nll, _, count = weighted_cross_entropy(logits, targets, weights)
    return perplexity(float(nll), float(count))
