"""Answer normalisation of the official VQA evaluation, quirks included.

Written from the behaviour of `vqaEval.py` (GT-Vision-Lab/VQA @ a013f00) and of mmf's
`EvalAIAnswerProcessor`, as documented in research/eval.md §2.1. The quirks are deliberate: scores must
match the official code, not its documentation.
"""

from __future__ import annotations

import re

# Number words up to ten only ("eleven" stays a word).
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# The 21 characters of the official list, in its order. Not in it: . ' : $ % & # * ~ |
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

# A digit,digit anywhere in the text switches every punctuation character to "delete" (100,978 -> 100978).
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern `(?!<=\d)(\.)(?!\d)` has a typo (a lookahead for the literal "<="), so it deletes every
# period that is not followed by a digit: "2." -> "2" but "2.5" stays.
_PERIOD = re.compile(r"\.(?!\d)")
# `periodStrip.sub("", text, re.UNICODE)` passes re.UNICODE (32) as `count`: at most 32 periods are removed.
_PERIOD_COUNT = int(re.UNICODE)

# Apostrophe-less spellings -> apostrophe forms, exactly as in the official table (120 entries). Keys with
# capitals (Im, Ive, Id've, I'dve) can never match because words are lowercased first; `somebody'd` maps
# the "wrong" way round. Both are kept because the official code has them.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def clean_whitespace(text: str) -> str:
    """Step applied to every answer in every mode: newlines and tabs become spaces, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def strip_punctuation(text: str) -> str:
    """The official `processPunctuation`.

    Whether a character is deleted or replaced by a space is decided on the *original* text: deleted if it
    is next to a space there, or if the text contains digit,digit anywhere.
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def normalize_words(text: str) -> str:
    """The official `processDigitArticle`: lowercase, number words -> digits, drop articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Full VQAv2 normalisation (punctuation, then numbers/articles/contractions)."""
    return normalize_words(strip_punctuation(text))


def evalai_normalize(text: str) -> str:
    """mmf's `EvalAIAnswerProcessor()(text)`, used by TextVQA.

    It first lowercases, deletes every ',' and '?', and splits "'s" off ("man's" -> "man 's"), so "red,white"
    becomes "redwhite" here but "red white" under `normalize_answer`.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_answer(clean_whitespace(text))
