"""Arabic text normalisation for training, inference and scoring: `normalize_arabic` (what the model is trained on
and asked to speak), `normalize_for_scoring` (what CER/WER compare) and `split_sentences` (long texts).

Pure functions; imports only the standard library and num2words. Every rule, its order and the reason for it:
docs/arabic.md.
"""

from __future__ import annotations

import re
import string
import unicodedata

from num2words import num2words

__all__ = [
    "arabic_digits_to_ascii",
    "fold_arabic_letters",
    "has_arabic_letters",
    "normalize_arabic",
    "normalize_for_scoring",
    "spell_out_numbers",
    "strip_arabic_diacritics",
]

# ------------------------------------------------------------------------------------------ character classes

# Not pronounced and not visible; see step 0 of docs/arabic.md.
_INVISIBLE = frozenset(
    [chr(c) for c in range(0x200B, 0x2010)]  # ZWSP, ZWNJ, ZWJ, LRM, RLM
    + [chr(c) for c in range(0x202A, 0x202F)]  # LRE, RLE, PDF, LRO, RLO
    + [chr(c) for c in range(0x2060, 0x2065)]  # word joiner, invisible operators
    + [chr(c) for c in range(0x2066, 0x206A)]  # LRI, RLI, FSI, PDI
    + ["\u061c", "\ufeff", "\u00ad"]  # Arabic letter mark, BOM / ZWNBSP, soft hyphen
)
_INVISIBLE_RE = re.compile("[" + "".join(sorted(_INVISIBLE)) + "]")

_PRESENTATION_RE = re.compile("[\ufb50-\ufdff\ufe70-\ufeff]")

_TATWEEL = "\u0640"


def _combining_marks(*ranges: tuple[int, int]) -> frozenset[str]:
    """The nonspacing marks (category Mn) in the inclusive code point ranges: skips letters and symbols there."""
    return frozenset(
        chr(c) for first, last in ranges for c in range(first, last + 1) if unicodedata.category(chr(c)) == "Mn"
    )


# Vowel and reading marks; U+0653-U+0655 (maddah, hamza above/below) are deliberately absent: they belong to
# the letter. See step 3 of docs/arabic.md.
_DIACRITICS = _combining_marks(
    (0x0610, 0x061A),  # honorific signs and small fatha/damma/kasra
    (0x064B, 0x0652),  # tanween, fatha, damma, kasra, shadda, sukun
    (0x0656, 0x065F),  # subscript alef, inverted damma and other extended vowel marks
    (0x0670, 0x0670),  # superscript (dagger) alef
    (0x06D6, 0x06ED),  # Quranic annotation marks (the Mn ones; U+06DD, U+06DE, U+06E5, U+06E6, U+06E9 are not)
)
_DIACRITICS_RE = re.compile("[" + "".join(sorted(_DIACRITICS)) + "]")

_HAMZA_MARKS_RE = re.compile("[\u0653\u0654\u0655]")

_FOLD = str.maketrans(
    {
        "\u0623": "\u0627",  # أ -> ا
        "\u0625": "\u0627",  # إ -> ا
        "\u0622": "\u0627",  # آ -> ا
        "\u0671": "\u0627",  # ٱ (alef wasla) -> ا
        "\u0649": "\u064a",  # ى (alef maksura) -> ي
        "\u0629": "\u0647",  # ة -> ه
        "\u0624": "\u0648",  # ؤ -> و
        "\u0626": "\u064a",  # ئ -> ي
        "\u06cc": "\u064a",  # ی (Farsi yeh, from Persian keyboards) -> ي
        "\u06a9": "\u0643",  # ک (keheh, from Persian keyboards) -> ك
    }
)

_DIGITS = str.maketrans(
    {**{chr(0x0660 + d): str(d) for d in range(10)}, **{chr(0x06F0 + d): str(d) for d in range(10)}}
)
_DECIMAL_SEPARATOR_RE = re.compile("(?<=[0-9])\u066b(?=[0-9])")  # ٫
_THOUSANDS_SEPARATOR_RE = re.compile("(?<=[0-9])\u066c(?=[0-9])")  # ٬

# An ASCII-digit number: grouped integer ("1,500"; the first group does not start with 0) or a plain run, an
# optional fraction after ".", an optional percent sign. Digits are unified to ASCII before this runs.
_NUMBER_RE = re.compile(
    r"(?P<int>[1-9][0-9]{0,2}(?:,[0-9]{3})+(?![0-9])|[0-9]+)"
    r"(?:\.(?P<frac>[0-9]+))?"
    r"(?P<pct>\s*[%\u066a])?"
)
_POINT_WORD = "فاصلة"
_PERCENT_WORDS = "بالمائة"

_TO_ARABIC_PUNCTUATION = {",": "\u060c", ";": "\u061b", "?": "\u061f"}  # ، ؛ ؟

# No space before these; "." and "," only when they do not start a number (".5").
_SPACE_BEFORE_PUNCT_RE = re.compile(r" +(?=[\u060c\u061b\u061f!:;?]|[.,](?![0-9]))")

_ASCII_PUNCTUATION = frozenset(string.punctuation)

# ------------------------------------------------------------------------------------------ public helpers


def has_arabic_letters(text: str) -> bool:
    """True if the text holds at least one Arabic letter (U+0621..U+064A, U+0671..U+06D3 letters).

    Diacritics, tatweel (U+0640, inside the first range but not a letter), Arabic digits and Arabic punctuation do
    not count. Presentation-form letters (e.g. the lam-alef ligature U+FEFB) count: they are mapped to the standard
    letters first.
    """
    return any(_is_arabic_letter(ch) for ch in _map_presentation_forms(text))


def strip_arabic_diacritics(text: str) -> str:
    """``text`` without Arabic diacritics: harakat, tanween, shadda, sukun (U+064B-U+0652), superscript alef
    (U+0670), the small honorific and vowel signs (U+0610-U+061A), the extended vowel marks (U+0656-U+065F) and
    the combining Quranic marks (U+06D6-U+06ED).

    Maddah and hamza above/below (U+0653-U+0655) are kept: they are part of the letter, not a vowel sign. Nothing
    else changes.
    """
    return _DIACRITICS_RE.sub("", text)


def fold_arabic_letters(text: str) -> str:
    """``text`` with letter variants that writers and ASR use interchangeably folded to one letter.

    أ إ آ ٱ -> ا, ى -> ي, ة -> ه, ؤ -> و, ئ -> ي, plus ی -> ي and ک -> ك. The text is NFC-composed first, so a
    letter written as alef + combining hamza folds like أ, and combining maddah/hamza left over afterwards (on
    letters with no precomposed form) are removed. This loses information (ة vs ه, the glottal stop of أ), which
    is why training text does not fold by default.
    """
    return _HAMZA_MARKS_RE.sub("", unicodedata.normalize("NFC", text).translate(_FOLD))


def arabic_digits_to_ascii(text: str) -> str:
    """``text`` with Eastern Arabic (٠-٩) and Persian/Urdu (۰-۹) digits as ASCII 0-9.

    The Arabic decimal separator ٫ between two digits becomes "."; the Arabic thousands separator ٬ between two
    digits is removed ("١٬٠٠٠" -> "1000"). Elsewhere those two signs are left as they are.
    """
    text = text.translate(_DIGITS)
    text = _DECIMAL_SEPARATOR_RE.sub(".", text)
    return _THOUSANDS_SEPARATOR_RE.sub("", text)


def spell_out_numbers(text: str) -> str:
    """``text`` with every number written as Arabic words, using ``num2words(n, lang="ar")``.

    Digits are unified first (:func:`arabic_digits_to_ascii`), so "٢٥" and "25" give the same words. Integers
    (also "1,500"-style grouped), decimals ("3.5" -> "ثلاثة فاصلة خمسة"), leading-zero runs (digit by digit) and a
    trailing percent sign ("50%" -> "خمسون بالمائة") are handled as docs/arabic.md (step 6) describes. A word
    that touches a letter is separated from it by one space. A number that cannot be spelled (too large for
    num2words or for int()) is left exactly as written; this function does not raise on any input.
    """
    text = arabic_digits_to_ascii(text)

    def replace(match: re.Match[str]) -> str:
        words = _spell_number(match["int"].replace(",", ""), match["frac"])
        if words is None:
            return match[0]
        if match["pct"]:
            words = f"{words} {_PERCENT_WORDS}"
        start, end = match.start(), match.end()
        if start > 0 and text[start - 1].isalnum():
            words = " " + words
        if end < len(text) and text[end].isalnum():
            words += " "
        return words

    return _NUMBER_RE.sub(replace, text)


def normalize_arabic(
    text: str,
    *,
    strip_diacritics: bool = False,
    fold_letters: bool = False,
    numbers_to_words: bool = True,
    diacritize: str = "none",
) -> str:
    """Normalise training/inference text.

    Runs steps 0-8 of docs/arabic.md: invisible characters out, presentation forms to letters and NFC,
    tatweel out, diacritics kept (or stripped with ``strip_diacritics``), letters folded only with
    ``fold_letters``, digits unified to ASCII, numbers spelled as Arabic words with ``numbers_to_words``,
    ",;?" turned into "،؛؟" where they belong to Arabic words, whitespace collapsed. Idempotent.
    ``diacritize='auto'`` adds tashkeel to undiacritised words after the numbers are spelled out
    (`higgs_lora.text.diacritize`, optional package).
    """
    text = _letters_only_pass(text)
    if strip_diacritics:
        text = strip_arabic_diacritics(text)
        # Removing a mark can bring a hamza/maddah next to its letter; compose it now, not on a second run.
        text = unicodedata.normalize("NFC", text)
    if fold_letters:
        text = fold_arabic_letters(text)
    text = arabic_digits_to_ascii(text)
    if numbers_to_words:
        text = spell_out_numbers(text)
        # num2words writes tanween ("مليوناً") and hamza/ta-marbuta letters ("أربعة", "ثلاثة"): treat its words
        # like input words, or a second run would still change them.
        if strip_diacritics:
            text = strip_arabic_diacritics(text)
        if fold_letters:
            text = fold_arabic_letters(text)
    if diacritize != "none":
        from higgs_lora.text.diacritize import diacritize as add_diacritics

        text = _letters_only_pass(add_diacritics(text, diacritize))
    text = _arabic_punctuation(text)
    return _collapse_whitespace(text)


def normalize_for_scoring(text: str) -> str:
    """What CER/WER scoring compares: diacritics stripped, alef/hamza/yaa/ta-marbuta folded, punctuation removed
    (Arabic and Latin), digits unified to ASCII (NOT spelled out as words), whitespace collapsed, Latin lowercased.

    In detail: invisible characters removed, presentation forms mapped, NFC, tatweel removed,
    :func:`strip_arabic_diacritics`, :func:`fold_arabic_letters`, :func:`arabic_digits_to_ascii`; then every
    punctuation character (ASCII punctuation and symbols, any Unicode punctuation: ، ؛ ؟ « » ٪ “ ” ...) becomes a
    space, so "كتب،قرأ" still counts as two words; lowercase; whitespace runs -> one space, ends stripped.
    Numbers are left as digits: spelling them would make a digit/word mismatch between ASR output and reference
    cost many characters, and both sides are compared after this same function.
    """
    text = _letters_only_pass(text)
    text = strip_arabic_diacritics(text)
    text = fold_arabic_letters(text)
    text = arabic_digits_to_ascii(text)
    text = "".join(" " if _is_punctuation(ch) else ch for ch in text)
    return " ".join(text.lower().split())


# ------------------------------------------------------------------------------------------ internals


def _is_arabic_letter(ch: str) -> bool:
    code = ord(ch)
    in_range = 0x0621 <= code <= 0x064A or 0x0671 <= code <= 0x06D3
    return in_range and unicodedata.category(ch) == "Lo"  # "Lo" drops tatweel (Lm) in the first range


def _is_ascii_digit(ch: str) -> bool:
    return "0" <= ch <= "9"


def _is_punctuation(ch: str) -> bool:
    return ch in _ASCII_PUNCTUATION or unicodedata.category(ch).startswith("P")


def _map_presentation_forms(text: str) -> str:
    """Presentation forms (U+FB50-U+FDFF, U+FE70-U+FEFF) replaced by their NFKC mapping, nothing else touched."""

    def mapped(match: re.Match[str]) -> str:
        out = unicodedata.normalize("NFKC", match[0])
        # An isolated presentation diacritic maps to space + mark (U+FE76 -> " َ"); the space is an artefact.
        if out.startswith(" ") and len(out) > 1 and all(unicodedata.combining(c) for c in out[1:]):
            out = out[1:]
        return out

    return _PRESENTATION_RE.sub(mapped, text)


def _letters_only_pass(text: str) -> str:
    """Steps 0-2: invisible characters out, presentation forms mapped, tatweel out, NFC."""
    text = _INVISIBLE_RE.sub("", text)
    text = _map_presentation_forms(text)
    text = text.replace(_TATWEEL, "")
    # NFC last: removing tatweel can put a combining hamza/maddah right after its alef/waw/yaa.
    return unicodedata.normalize("NFC", text)


def _digit_words() -> dict[str, str]:
    return {str(d): num2words(d, lang="ar") for d in range(10)}


_DIGIT_WORDS = _digit_words()


def _spell_run(digits: str) -> str | None:
    """Words for one ASCII digit run, or None when it cannot be spelled."""
    if len(digits) > 1 and digits.startswith("0"):
        # Leading zeros are said ("صفر خمسة"); int() would drop them, so read the run digit by digit.
        return " ".join(_DIGIT_WORDS[d] for d in digits)
    try:
        number = int(digits)
    except ValueError:  # longer than Python's int/str conversion limit (sys.get_int_max_str_digits)
        return None
    try:
        words = num2words(number, lang="ar")
    except OverflowError:  # num2words "ar" stops below 10**51
        return None
    # num2words 0.5.14 ends some numbers on a construct-state dual (200 -> "مئتا", 2000 -> "ألفا", 2*10**6 ->
    # "مليونا"); spoken alone they are "مئتان", "ألفان", "مليونان". Only those duals end its output in "ا".
    if words.endswith("\u0627"):
        words += "\u0646"
    return words


def _spell_number(integer: str, fraction: str | None) -> str | None:
    whole = _spell_run(integer)
    if whole is None or fraction is None:
        return whole
    after_point = _spell_run(fraction)
    if after_point is None:
        return None
    return f"{whole} {_POINT_WORD} {after_point}"


def _arabic_punctuation(text: str) -> str:
    """Step 7: "," ";" "?" -> "،" "؛" "؟" where the nearest letter before them (at the start: after) is Arabic."""
    if not any(ch in _TO_ARABIC_PUNCTUATION for ch in text) or not has_arabic_letters(text):
        return text
    first_letter_arabic = next((_is_arabic_letter(ch) for ch in text if ch.isalpha()), False)
    out = []
    last_letter_arabic: bool | None = None  # None until a letter has been seen
    for i, ch in enumerate(text):
        if ch.isalpha():
            last_letter_arabic = _is_arabic_letter(ch)
        elif ch in _TO_ARABIC_PUNCTUATION:
            between_digits = (
                ch == "," and 0 < i < len(text) - 1 and _is_ascii_digit(text[i - 1]) and _is_ascii_digit(text[i + 1])
            )
            arabic = first_letter_arabic if last_letter_arabic is None else last_letter_arabic
            if arabic and not between_digits:
                ch = _TO_ARABIC_PUNCTUATION[ch]
        out.append(ch)
    return "".join(out)


def _collapse_whitespace(text: str) -> str:
    """Step 8: whitespace runs -> one space, no space before punctuation, ends stripped."""
    text = " ".join(text.split())
    return _SPACE_BEFORE_PUNCT_RE.sub("", text)


SENTENCE_END = re.compile(r"(?<=[.!?؟!،؛;\n])\s*|\n+")
"""Where long text may be cut for generation: after . ! ? ؟ ، ؛ ; and at newlines."""


def split_sentences(text: str, max_chars: int = 200) -> list[str]:
    """Pieces of `text` for generation one after another, each at most `max_chars` characters where possible.

    The model speaks a piece of up to ~20 s well; a whole paragraph in one go drifts or stops early. Cuts fall at
    sentence ends and clause marks (. ، ؛ ؟ ! and newlines); consecutive short sentences are packed together up to
    `max_chars`, so a comma does not make a one-word piece. A single sentence longer than `max_chars` is cut at the
    last space before the limit (never inside a word).
    """
    sentences = [s.strip() for s in SENTENCE_END.split(text) if s and s.strip()]
    pieces: list[str] = []
    for sentence in sentences:
        while len(sentence) > max_chars:
            cut = sentence.rfind(" ", 0, max_chars + 1)
            cut = cut if cut > 0 else max_chars
            head, sentence = sentence[:cut].strip(), sentence[cut:].strip()
            _pack(pieces, head, max_chars)
        if sentence:
            _pack(pieces, sentence, max_chars)
    return pieces


def _pack(pieces: list[str], sentence: str, max_chars: int) -> None:
    if pieces and len(pieces[-1]) + 1 + len(sentence) <= max_chars:
        pieces[-1] = f"{pieces[-1]} {sentence}"
    else:
        pieces.append(sentence)
