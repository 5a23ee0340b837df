"""Word error rate of a transcript against its reference text (used by the speech-to-text tests and benchmark)."""

from __future__ import annotations

import re
import unicodedata

NON_WORD_RE = re.compile(r"[^\w' ]+|_")
"""Anything but letters (any script, with their accents, umlauts and ß), digits, apostrophes and spaces."""
APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'", "`": "'"})


def normalisedWords(text: str) -> list[str]:
    """Lower-case words without punctuation; hyphenated words count as separate words. Letters keep their
    diacritics ("für" is not "fur", "Straße" is not "Strasse"): a lost umlaut is a word error."""
    text = unicodedata.normalize("NFC", text).translate(APOSTROPHES).lower().replace("-", " ")
    return NON_WORD_RE.sub(" ", text).split()


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
