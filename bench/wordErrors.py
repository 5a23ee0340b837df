"""Word error rate of a transcript against its reference text (used by the speech-to-text tests and benchmark)."""

from __future__ import annotations

import re

NON_WORD_RE = re.compile(r"[^a-z0-9' ]+")


def normalisedWords(text: str) -> list[str]:
    """Lower-case words without punctuation; hyphenated words count as separate words."""
    return NON_WORD_RE.sub(" ", text.lower().replace("-", " ")).split()


def wordErrorRate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, on lower-case words without punctuation."""
    ref, hyp = normalisedWords(reference), normalisedWords(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, refWord in enumerate(ref, start=1):
        current = [i]
        for j, hypWord in enumerate(hyp, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (refWord != hypWord)))
        previous = current
    return previous[-1] / max(1, len(ref))
