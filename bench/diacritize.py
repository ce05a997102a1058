"""Diacritic error rate and speed of the automatic diacritisers on fully diacritised sentences (data.diacritize).

    python bench/diacritize.py                      # text2tashkeel (what data.diacritize=auto uses)
    python bench/diacritize.py --also-arabic-diacritizer /path/with/the/package   # compare a second package

The sample is every transcript of examples/demo_corpus/manifest.jsonl (written for this project) in which at least
90% of the Arabic letters carry a mark, plus the sentences below, typed for this bench from common classical
phrases. Each is stripped of its marks, diacritised, and compared letter by letter: DER = letters whose marks
differ from the reference / Arabic letters (a letter without marks in the reference counts too; the last letter of
a word, the case ending, is also reported apart). Speed: wall seconds per 1,000 input characters, one sentence per
call, after one warm-up call. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from higgs_lora.text.arabic import strip_arabic_diacritics  # noqa: E402

TYPED = [
    "بِسْمِ اللَّهِ الرَّحْمَنِ الرَّحِيمِ",
    "الْحَمْدُ لِلَّهِ رَبِّ الْعَالَمِينَ",
    "الْعِلْمُ نُورٌ وَالْجَهْلُ ظَلَامٌ",
    "ذَهَبَ الْوَلَدُ إِلَى الْمَدْرَسَةِ صَبَاحًا",
    "كَتَبَ الطَّالِبُ الدَّرْسَ فِي دَفْتَرِهِ",
    "إِنَّ مَعَ الْعُسْرِ يُسْرًا",
    "قَرَأْتُ الْكِتَابَ كُلَّهُ فِي يَوْمٍ وَاحِدٍ",
    "الصَّبْرُ مِفْتَاحُ الْفَرَجِ",
    "شَرِبَ الرَّجُلُ الْمَاءَ بَارِدًا",
    "جَلَسَ الْأَطْفَالُ حَوْلَ الْمُعَلِّمِ",
]
MARKS = re.compile("[\u064b-\u0652\u0670]")


def is_letter(ch: str) -> bool:
    return "\u0621" <= ch <= "\u064a"


def letters_with_marks(text: str) -> list[tuple[str, str, bool]]:
    """(letter, its marks sorted, is the last letter of its word) for every Arabic letter of `text`."""
    out: list[list] = []
    for i, ch in enumerate(text):
        if is_letter(ch):
            out.append([ch, "", False])
        elif MARKS.match(ch) and out:
            out[-1][1] += ch
        if out and (i + 1 == len(text) or text[i + 1].isspace()):
            out[-1][2] = True
    return [(letter, "".join(sorted(marks)), last) for letter, marks, last in out]


def fully_diacritised(text: str) -> bool:
    letters = letters_with_marks(text)
    return bool(letters) and sum(1 for _, m, _ in letters if m) >= 0.9 * len(letters)


def sample() -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "examples/demo_corpus/manifest.jsonl").read_text().splitlines()]
    return [r["text"] for r in rows if fully_diacritised(r["text"])] + TYPED


def score(function, sentences: list[str]) -> dict:
    function(strip_arabic_diacritics(sentences[0]))  # warm-up (session build)
    errors = letters = end_errors = ends = characters = skipped = 0
    started = time.perf_counter()
    outputs = []
    for sentence in sentences:
        bare = strip_arabic_diacritics(sentence)
        characters += len(bare)
        outputs.append(function(bare))
    seconds = time.perf_counter() - started
    for sentence, output in zip(sentences, outputs):
        want, got = letters_with_marks(sentence), letters_with_marks(output)
        if [w[0] for w in want] != [g[0] for g in got]:
            skipped += 1  # the letters changed: counted as all wrong
            errors, letters = errors + len(want), letters + len(want)
            continue
        for (_, w, last), (_, g, _) in zip(want, got):
            letters += 1
            errors += w != g
            ends += last
            end_errors += last and w != g
    return {
        "der": errors / letters,
        "der_without_case_endings": (errors - end_errors) / (letters - ends),
        "letters": letters,
        "sentences": len(sentences),
        "letters_changed": skipped,
        "seconds_per_1000_chars": 1000 * seconds / characters,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--also-arabic-diacritizer", metavar="SITE_DIR", help="a directory holding `diacritize`")
    args = parser.parse_args()
    sentences = sample()
    from text2tashkeel import Diacritizer, __version__

    rows = [(f"text2tashkeel {__version__} rawi-ensemble (data.diacritize=auto)", Diacritizer("rawi-ensemble"))]
    if args.also_arabic_diacritizer:
        sys.path.insert(0, args.also_arabic_diacritizer)
        from diacritize.pipeline import Diacritizer as Bilstm  # arabic-diacritizer 1.0.0

        model = Bilstm.from_pretrained()
        rows.append(("arabic-diacritizer 1.0.0 (BiLSTM, torch)", model.diacritize))
    print("| diacritiser | DER | DER without case endings | s / 1,000 chars (CPU) |")
    print("|---|---|---|---|")
    for name, function in rows:
        result = score(function, sentences)
        print(
            f"| {name} | {100 * result['der']:.1f}% | {100 * result['der_without_case_endings']:.1f}% | "
            f"{result['seconds_per_1000_chars']:.3f} |"
        )
    print(f"\n{len(sentences)} sentences, {result['letters']} Arabic letters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
