"""Scores of generated text against references, from the libraries the papers use (not re-implemented here).

* ROUGE-1 / ROUGE-2 / ROUGE-L: `rouge-score` (Google's reference implementation; Porter stemming on), the F-measure,
  in [0, 1]; the split's value is the mean over examples (as the E2E / summarisation papers report it).
* BLEU and chrF: `sacrebleu` (the standard, tokenisation included), 0-100; the split's value is the corpus score,
  the per-example value the sentence score.
* exact_match (math answers, GSM8K): the final number of the generation equals the reference's, in [0, 1].

METEOR is left out: nltk's needs the WordNet corpus, a separate download that does not run offline, and no other
maintained package computes it without one. Every metric here is better when higher (`metrics.higher_is_better`).
"""
from __future__ import annotations

import logging
import re
from decimal import Decimal, InvalidOperation

import numpy as np

from ..metrics import TEXT_METRICS  # data.metrics for free text: ("rouge_l", "rouge1", "rouge2", "bleu", "chrf")

MATH_METRICS = ("exact_match",)  # data.metrics for numeric answers
ROUGE_NAMES = {"rouge1": "rouge1", "rouge2": "rouge2", "rouge_l": "rougeL"}  # ours -> rouge-score's
ANSWER_MARKERS = ("####", "The answer is:", "The answer is", "The final answer is:", "The final answer is")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*-?\d[\d,]*(?:\.\d+)?)?|-?\.\d+")  # 1,000 / -3.5 / .5 / 20/14


def extract_number(text: str) -> Decimal | None:
    """The answer a math text ends on, as an exact number, or None when it has none.

    On the line after the last answer marker when there is one ("#### 42", "The answer is: 42", as GSM8K's
    references and MetaMathQA's responses write it), else in the whole text: the last number, thousands separators dropped
    ("1,000" -> 1000), sign and decimals kept, a fraction "a/b" divided out. A trailing "." or "%" is not part of it.
    """
    tail = text
    for marker in ANSWER_MARKERS:
        at = text.rfind(marker)
        if at >= 0:
            tail = text[at + len(marker):].strip().split("\n", 1)[0]  # the marker's line only
            break
    found = NUMBER.findall(tail) or ([] if tail is text else NUMBER.findall(text))
    if not found:
        return None
    return _to_decimal(found[-1])


def _to_decimal(token: str) -> Decimal | None:
    token = token.replace(",", "").replace(" ", "")
    try:
        if "/" in token:
            numerator, denominator = (Decimal(part) for part in token.split("/"))
            return None if denominator == 0 else numerator / denominator
        return Decimal(token)
    except InvalidOperation:
        return None


def exact_match(prediction: str, reference: str) -> bool:
    """Both texts end on the same number (`extract_number`); a prediction without a number is wrong."""
    predicted, expected = extract_number(prediction), extract_number(reference)
    return predicted is not None and expected is not None and predicted == expected


def _drop_default_tokenizer_notice(record: logging.LogRecord) -> bool:
    """A logging filter: False for rouge-score's "Using default tokenizer." (logged through absl at every scorer
    built), True for everything else."""
    return record.getMessage() != "Using default tokenizer."


def per_example_scores(predictions: list[str], references: list[str], metrics: tuple[str, ...]) -> list[dict[str, float]]:
    """One {metric: value} per example (sentence BLEU / chrF, ROUGE F-measures, exact match as 0 / 1)."""
    rows: list[dict[str, float]] = [{} for _ in predictions]
    rouge = [m for m in metrics if m in ROUGE_NAMES]
    if rouge:
        from rouge_score import rouge_scorer

        absl_logger = logging.getLogger("absl")
        if _drop_default_tokenizer_notice not in absl_logger.filters:
            absl_logger.addFilter(_drop_default_tokenizer_notice)
        scorer = rouge_scorer.RougeScorer([ROUGE_NAMES[m] for m in rouge], use_stemmer=True)
        for row, prediction, reference in zip(rows, predictions, references):
            scores = scorer.score(reference, prediction)  # (target, prediction)
            row.update({m: float(scores[ROUGE_NAMES[m]].fmeasure) for m in rouge})
    if "bleu" in metrics or "chrf" in metrics:
        import sacrebleu

        for row, prediction, reference in zip(rows, predictions, references):
            if "bleu" in metrics:
                row["bleu"] = float(sacrebleu.sentence_bleu(prediction, [reference]).score)
            if "chrf" in metrics:
                row["chrf"] = float(sacrebleu.sentence_chrf(prediction, [reference]).score)
    if "exact_match" in metrics:
        for row, prediction, reference in zip(rows, predictions, references):
            row["exact_match"] = float(exact_match(prediction, reference))
    return rows


def corpus_scores(predictions: list[str], references: list[str], rows: list[dict[str, float]],
                  metrics: tuple[str, ...]) -> dict[str, float]:
    """The split's value of each metric: corpus BLEU / chrF (sacrebleu), the mean of the per-example rows else."""
    out = {}
    for metric in metrics:
        if metric in ("bleu", "chrf"):
            import sacrebleu

            score = sacrebleu.corpus_bleu if metric == "bleu" else sacrebleu.corpus_chrf
            out[metric] = float(score(predictions, [references]).score)
        else:
            out[metric] = float(np.mean([row[metric] for row in rows]))
    return out
