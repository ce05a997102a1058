"""Arabic text normalisation: every step of normalize_arabic, the scoring form, and their properties.

Expected number words are num2words 0.5.14 ("ar") output, checked by hand, with the final-dual fix
(200 -> "مئتان", not num2words' "مئتا").
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from higgs_lora.text.arabic import (
    arabic_digits_to_ascii,
    fold_arabic_letters,
    has_arabic_letters,
    normalize_arabic,
    normalize_for_scoring,
    spell_out_numbers,
    strip_arabic_diacritics,
)

STRIP = {"strip_diacritics": True}
FOLD = {"fold_letters": True}
DIGITS = {"numbers_to_words": False}
ALL_OFF = {"strip_diacritics": False, "fold_letters": False, "numbers_to_words": False}
SCORING_LIKE = {"strip_diacritics": True, "fold_letters": True}

# (id, input, options, expected)
NORMALIZE_CASES = [
    # empty and whitespace-only
    ("empty", "", {}, ""),
    ("whitespace-only", " \t\n\u00a0\u2003 ", {}, ""),
    ("invisible-only", "\u200b\u200c\ufeff", {}, ""),
    # 1. presentation forms
    ("lam-alef ligature", "\ufefb إله إلا الله", {}, "لا إله إلا الله"),
    ("lam-alef final form", "\ufefc", {}, "لا"),
    ("lam-alef with hamza ligature", "\ufef7", {}, "لأ"),
    ("letter presentation forms", "\ufe8d\ufe91\ufeea", {}, "ابه"),  # isolated alef, initial beh, final heh
    ("alef wasla presentation form", "\ufb50", {}, "ٱ"),
    ("isolated fatha form keeps no space", "ب\ufe76", {}, "بَ"),
    ("isolated fatha form alone", "\ufe76", {}, "َ"),
    ("medial fatha form drops its tatweel", "ب\ufe77", {}, "بَ"),
    ("honorific ligature", "محمد \ufdfa", {}, "محمد صلى الله عليه وسلم"),
    ("presentation forms outside the ranges untouched", "x² ½ …", {}, "x² ½ …"),
    # 1. NFC composition of maddah / hamza marks
    ("alef + maddah composes", "ا\u0653دم", {}, "آدم"),
    ("alef + hamza above composes", "ا\u0654حمد", {}, "أحمد"),
    ("yaa + hamza above composes", "ي\u0654", {}, "ئ"),
    # 2. tatweel
    ("tatweel removed", "كـــتـــاب", {}, "كتاب"),
    ("tatweel between alef and maddah", "اـ\u0653", {}, "آ"),
    # 3. diacritics kept vs stripped
    ("diacritics kept by default", "مُحَمَّدٌ", {}, "مُحَمَّدٌ"),
    ("diacritics stripped", "مُحَمَّدٌ", STRIP, "محمد"),
    ("superscript alef stripped", "هٰذا", STRIP, "هذا"),
    ("sukun and kasra stripped", "بِسْمِ", STRIP, "بسم"),
    ("hamza letters survive stripping", "أَإِآ", STRIP, "أإآ"),
    ("stripping keeps maddah composition", "ا\u064e\u0653", STRIP, "آ"),
    # 4. letter folding, each letter
    ("fold alef hamza above", "أحمد", FOLD, "احمد"),
    ("fold alef hamza below", "إسلام", FOLD, "اسلام"),
    ("fold alef maddah", "آدم", FOLD, "ادم"),
    ("fold alef wasla", "ٱلله", FOLD, "الله"),
    ("fold alef maksura", "إلى", FOLD, "الي"),
    ("fold ta marbuta", "مدرسة", FOLD, "مدرسه"),
    ("fold waw hamza", "مسؤول", FOLD, "مسوول"),
    ("fold yaa hamza", "قارئ", FOLD, "قاري"),
    ("no folding by default", "أحمد إلى مدرسة", {}, "أحمد إلى مدرسة"),
    ("fold and strip together", "مَدْرَسَةٌ", SCORING_LIKE, "مدرسه"),
    # 5. digits
    ("eastern digits to ascii", "٠١٢٣٤٥٦٧٨٩", DIGITS, "0123456789"),
    ("persian digits to ascii", "۰۱۲۳۴۵۶۷۸۹", DIGITS, "0123456789"),
    ("arabic decimal separator", "٣٫٥", DIGITS, "3.5"),
    ("arabic thousands separator", "١٬٠٠٠٬٠٠٠", DIGITS, "1000000"),
    # 6. numbers to words
    ("ascii 25", "25", {}, "خمسة و عشرون"),
    ("eastern 25", "٢٥", {}, "خمسة و عشرون"),
    ("persian 25", "۲۵", {}, "خمسة و عشرون"),
    ("zero", "0", {}, "صفر"),
    ("eleven", "11", {}, "أحد عشر"),
    ("year", "عام 2024", {}, "عام ألفان و أربعة و عشرون"),
    ("final dual 200 fixed", "200", {}, "مئتان"),
    ("final dual 2000 fixed", "٢٠٠٠", {}, "ألفان"),
    ("construct dual before noun untouched", "200000", {}, "مئتا ألف"),
    ("grouped thousands", "1,500 شخص", {}, "ألف و خمسمائة شخص"),
    ("arabic thousands separator spelled", "١٬٠٠٠", {}, "ألف"),
    ("decimal", "3.5", {}, "ثلاثة فاصلة خمسة"),
    ("arabic decimal", "٣٫٢٥", {}, "ثلاثة فاصلة خمسة و عشرون"),
    ("decimal with leading zero", "3.05", {}, "ثلاثة فاصلة صفر خمسة"),
    ("leading zeros read digit by digit", "007", {}, "صفر صفر سبعة"),
    ("percent", "50%", {}, "خمسون بالمائة"),
    ("arabic percent with space", "٥٠ ٪", {}, "خمسون بالمائة"),
    ("percent kept without spelling", "50%", DIGITS, "50%"),
    ("number glued to arabic word", "3كتب", {}, "ثلاثة كتب"),
    ("number inside latin text", "mp3 player", {}, "mp ثلاثة player"),
    ("minus sign not read", "-5", {}, "-خمسة"),
    ("two millions", "2000000 و 1000000", {}, "مليونان و مليون"),
    (
        "tanween from num2words kept",
        "123456789",
        {},
        "مائة و ثلاثة و عشرون مليوناً و أربعمائة و ستة و خمسون ألفاً و سبعمائة و تسعة و ثمانون",
    ),
    (
        "num2words tanween stripped",
        "123456789",
        STRIP,
        "مائة و ثلاثة و عشرون مليونا و أربعمائة و ستة و خمسون ألفا و سبعمائة و تسعة و ثمانون",
    ),
    ("num2words words folded", "3 4", FOLD, "ثلاثه اربعه"),
    ("too large for num2words left as digits", "1" + "0" * 60, {}, "1" + "0" * 60),
    ("longer than int() accepts left as digits", "9" * 5000, {}, "9" * 5000),
    # 7. punctuation
    ("arabic comma and question mark", "مرحبا, كيف حالك?", {}, "مرحبا، كيف حالك؟"),
    ("arabic semicolon", "قال; ثم ذهب", {}, "قال؛ ثم ذهب"),
    ("period and exclamation kept", "مرحبا. أهلا!", {}, "مرحبا. أهلا!"),
    ("pure latin untouched", "Hello, world; how are you?", {}, "Hello, world; how are you?"),
    ("mixed: marks follow the script before them", "مرحبا, hello, world?", {}, "مرحبا، hello, world?"),
    ("mixed: latin then arabic", "hello; مرحبا?", {}, "hello; مرحبا؟"),
    ("comma in spelled list", "1, 2, 3 كتب", {}, "واحد، اثنان، ثلاثة كتب"),
    ("comma between digits kept", "الأرقام 1,2", DIGITS, "الأرقام 1,2"),
    ("leading mark takes the first letter's script", "?ماذا", {}, "؟ماذا"),
    # 8. whitespace and invisible characters
    ("whitespace collapsed", "  مرحبا \t\n  بك  ", {}, "مرحبا بك"),
    ("unicode spaces", "مرحبا\u00a0\u2009بك\u3000", {}, "مرحبا بك"),
    ("zero-width chars removed", "مر\u200cحبا\u200d \u200fبك\u200e\u061c\ufeff", {}, "مرحبا بك"),
    ("zero-width inside a number", "2\u200b5", {}, "خمسة و عشرون"),
    ("no space before arabic punctuation", "مرحبا ، كيف حالك ؟", {}, "مرحبا، كيف حالك؟"),
    ("no space before latin punctuation", "Hello , world !", {}, "Hello, world!"),
    ("space kept before a leading-point number", "القيمة .5", DIGITS, "القيمة .5"),
    # everything at once
    (
        "full sentence",
        "\ufeffقـــرأتُ ٣ كتب\u200c  في عام ٢٠٢٤ , هل قرأت ?",
        {},
        "قرأتُ ثلاثة كتب في عام ألفان و أربعة و عشرون، هل قرأت؟",
    ),
    (
        "full sentence, scoring-like options",
        "\ufeffقـــرأتُ ٣ كتب\u200c  في عام ٢٠٢٤ , هل قرأت ?",
        SCORING_LIKE,
        "قرات ثلاثه كتب في عام الفان و اربعه و عشرون، هل قرات؟",
    ),
    ("all off keeps digits", "في ٢٠٢٤", ALL_OFF, "في 2024"),
]

SCORING_CASES = [
    ("empty", "", ""),
    ("whitespace only", " \n\t ", ""),
    ("diacritics and folding", "أَحْمَدُ إِلَى المَدْرَسَةِ", "احمد الي المدرسه"),
    ("arabic punctuation removed", "نعم، لا؛ ماذا؟", "نعم لا ماذا"),
    ("guillemets removed", "قال «مرحباً»", "قال مرحبا"),
    ("ascii punctuation and quotes removed", 'He said: "Hi!" (twice)...', "he said hi twice"),
    ("typographic quotes removed", "“quoted” ‘text’", "quoted text"),
    ("punctuation separates words", "كتب،قرأ", "كتب قرا"),
    ("latin lowercased", "Hello WORLD", "hello world"),
    ("digits unified, not spelled", "٢٥ و ۲۵ و 25", "25 و 25 و 25"),
    ("thousands separator", "١٬٠٠٠", "1000"),
    ("decimal separator becomes a space", "٣٫٥", "3 5"),
    ("tatweel and presentation forms", "\ufefbـــ", "لا"),
    ("zero-width removed", "مر\u200cحبا\u200f", "مرحبا"),
    ("percent removed", "٥٠٪", "50"),
    ("hamza mark with no precomposed letter removed", "ه\u0654", "ه"),
]


@pytest.mark.parametrize(
    ("text", "options", "expected"), [c[1:] for c in NORMALIZE_CASES], ids=[c[0] for c in NORMALIZE_CASES]
)
def test_normalize_arabic(text, options, expected):
    assert normalize_arabic(text, **options) == expected


def test_table_is_big_enough():
    assert len(NORMALIZE_CASES) >= 40
    assert len(SCORING_CASES) >= 10


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in SCORING_CASES], ids=[c[0] for c in SCORING_CASES])
def test_normalize_for_scoring(text, expected):
    assert normalize_for_scoring(text) == expected


OPTION_SETS = [
    {"strip_diacritics": s, "fold_letters": f, "numbers_to_words": n}
    for s in (False, True)
    for f in (False, True)
    for n in (False, True)
]
TABLE_INPUTS = sorted({c[1] for c in NORMALIZE_CASES} | {c[1] for c in SCORING_CASES})


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(k for k, v in o.items() if v) or "none")
def test_normalize_arabic_is_idempotent(options):
    for text in TABLE_INPUTS:
        once = normalize_arabic(text, **options)
        assert normalize_arabic(once, **options) == once, text


def test_scoring_is_unchanged_by_training_normalisation():
    for text in TABLE_INPUTS:
        trained = normalize_arabic(text, numbers_to_words=False)
        assert normalize_for_scoring(text) == normalize_for_scoring(trained), text


def test_scoring_is_idempotent():
    for text in TABLE_INPUTS:
        once = normalize_for_scoring(text)
        assert normalize_for_scoring(once) == once, text


# Random strings drawn from the characters the rules care about: the table cannot think of every combination.
_ALPHABET = list(
    "ابتةىأإآؤئءٱيوهلـ"  # letters and tatweel
    "\u064b\u064c\u064e\u064f\u0650\u0651\u0652\u0670\u0653\u0654\u0655"  # marks
    "٠١٢٥٩۰۲0125٫٬٪%.,;?!:-"  # digits and separators
    " \t\n\u00a0\u200b\u200c\u200f\u061c\ufeff"  # spaces and invisibles
    "abXY«»"
) + ["\ufefb", "\ufe76", "\ufe77", "\ufdfa", "\ufb50"]


@settings(max_examples=300, deadline=None)
@given(
    text=st.lists(st.sampled_from(_ALPHABET), max_size=25).map("".join),
    strip=st.booleans(),
    fold=st.booleans(),
    spell=st.booleans(),
)
def test_properties_on_random_text(text, strip, fold, spell):
    options = {"strip_diacritics": strip, "fold_letters": fold, "numbers_to_words": spell}
    once = normalize_arabic(text, **options)
    assert normalize_arabic(once, **options) == once
    assert normalize_for_scoring(text) == normalize_for_scoring(normalize_arabic(text, numbers_to_words=False))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("مرحبا", True),
        ("hello مرحبا", True),
        ("\ufefb", True),  # presentation-form lam-alef
        ("ء", True),
        ("پ", True),  # U+067E, in the second range
        ("\u064e\u0651\u0652", False),  # only diacritics
        ("ـــ", False),  # only tatweel
        ("١٢٣ ۴۵", False),  # only Arabic/Persian digits
        ("،؛؟٪", False),  # only Arabic punctuation
        ("hello", False),
        ("", False),
    ],
)
def test_has_arabic_letters(text, expected):
    assert has_arabic_letters(text) is expected


def test_helpers():
    assert strip_arabic_diacritics("بِسْمِ اللَّهِ") == "بسم الله"
    assert strip_arabic_diacritics("أ\u0653") == "أ\u0653"  # maddah/hamza marks are not diacritics
    assert fold_arabic_letters("أإآٱىةؤئ") == "اااايهوي"
    assert fold_arabic_letters("ا\u0654") == "ا"  # decomposed hamza folds like أ
    assert arabic_digits_to_ascii("٣٫٥ و ١٬٠٠٠ و ۷") == "3.5 و 1000 و 7"
    assert arabic_digits_to_ascii("٫ ٬") == "٫ ٬"  # separators not between digits stay
    assert spell_out_numbers("٢٥") == spell_out_numbers("25") == "خمسة و عشرون"
    assert spell_out_numbers("no digits") == "no digits"
