"""Whisper's languages: the ISO-639-1 codes faster-whisper speaks and reports, and the lower-case English names
OpenAI's verbose_json carries in ``language`` ("german" for de)."""

from __future__ import annotations

_NAMES = """
af afrikaans, am amharic, ar arabic, as assamese, az azerbaijani, ba bashkir, be belarusian, bg bulgarian,
bn bengali, bo tibetan, br breton, bs bosnian, ca catalan, cs czech, cy welsh, da danish, de german, el greek,
en english, es spanish, et estonian, eu basque, fa persian, fi finnish, fo faroese, fr french, gl galician,
gu gujarati, ha hausa, haw hawaiian, he hebrew, hi hindi, hr croatian, ht haitian creole, hu hungarian,
hy armenian, id indonesian, is icelandic, it italian, ja japanese, jw javanese, ka georgian, kk kazakh, km khmer,
kn kannada, ko korean, la latin, lb luxembourgish, ln lingala, lo lao, lt lithuanian, lv latvian, mg malagasy,
mi maori, mk macedonian, ml malayalam, mn mongolian, mr marathi, ms malay, mt maltese, my myanmar, ne nepali,
nl dutch, nn nynorsk, no norwegian, oc occitan, pa punjabi, pl polish, ps pashto, pt portuguese, ro romanian,
ru russian, sa sanskrit, sd sindhi, si sinhala, sk slovak, sl slovenian, sn shona, so somali, sq albanian,
sr serbian, su sundanese, sv swedish, sw swahili, ta tamil, te telugu, tg tajik, th thai, tk turkmen, tl tagalog,
tr turkish, tt tatar, uk ukrainian, ur urdu, uz uzbek, vi vietnamese, yi yiddish, yo yoruba, yue cantonese,
zh chinese
"""
LANGUAGE_NAMES: dict[str, str] = dict(
    entry.strip().split(" ", 1) for entry in _NAMES.replace("\n", " ").split(",") if entry.strip())
"""Whisper's 100 language codes and OpenAI's names for them."""
LANGUAGE_CODES: dict[str, str] = {name: code for code, name in LANGUAGE_NAMES.items()}
ENGLISH_ONLY = frozenset({"en"})
"""faster-whisper's ``supported_languages`` of the English-only ``*.en`` models: they cannot translate either."""


def languageName(code: str) -> str:
    """OpenAI's name for a whisper language code ("de" -> "german"); an unknown code stays as it is."""
    return LANGUAGE_NAMES.get(code, code)


def languageCode(value: str) -> str:
    """The ISO-639-1 code a client meant: "de", "DE", "de-DE", "de_AT" and "german" all give "de"."""
    value = value.strip().lower()
    if value in LANGUAGE_CODES:
        return LANGUAGE_CODES[value]
    return value.replace("_", "-").split("-", 1)[0] if value[:3].rstrip("-_") in LANGUAGE_NAMES else value
