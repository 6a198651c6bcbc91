"""Who a caption is about: the person's name as its subject, identity words left to the name, other people.

The recipe trains the name on everything the photos share (face, hair, eyes, age, ethnicity), so the prompt
asks the VLM not to describe them and these functions take out what slips through. Text is expected
already normalised (captioners.caption_text.normalize).
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache

PERSON = (r"(?:woman|man|person|girl|boy|lady|gentleman|guy|individual|subject|female|male|adult|teen|teenager"
          r"|women|men|people|girls|boys|ladies)")
# Nouns a class word may stand for: with class_word "woman", "the lady" is the person, "a man" is not.
CLASS_SYNONYMS = {
    "woman": {"woman", "lady", "female", "girl"}, "man": {"man", "gentleman", "guy", "male", "boy"},
    "girl": {"girl", "woman", "lady"}, "boy": {"boy", "man", "guy"},
}
SUBJECT_ADJECTIVES = r"(?:young|middle-aged|older|smiling|happy|cheerful|confident|beautiful|attractive|handsome)"


# --- the name -------------------------------------------------------------------------------------------


@cache
def name_pattern(name: str) -> re.Pattern:
    """The name as a whole phrase: "Eve" is in "Eve's coat", not in "evening". Written with a capital, it
    matches with that case ("Rose" is not "a rose"); written all lower case, in any case."""
    words = unicodedata.normalize("NFC", name).split()
    flags = 0 if any(c.isupper() for c in name) else re.IGNORECASE
    return re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)", flags)


def name_in(text: str, name: str) -> bool:
    return bool(name.strip()) and bool(name_pattern(name.strip()).search(unicodedata.normalize("NFC", text)))


def subject_phrase(name: str, class_word: str | None) -> str:
    return f"{name}, a {class_word}," if class_word else name


# --- a leading pronoun ----------------------------------------------------------------------------------

LEADING_PRONOUN = re.compile(r"^(she|he|they|her|his|their)\b('s|'re|'ve)?(?:\s+([a-z]+)\b)?", re.IGNORECASE)
THEY_VERBS = {"are": "is", "were": "was", "have": "has", "do": "does", "go": "goes"}
NOT_VERBS = {"both", "all", "each", "also", "too", "together", "two", "three"}


def third_person(verb: str) -> str:
    if verb in THEY_VERBS:
        return THEY_VERBS[verb]
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in set("aeiou"):
        return verb[:-1] + "ies"
    return verb + "s"


def replace_leading_pronoun(text: str, name: str, class_word: str | None = None) -> str | None:
    """"She is wearing ..." -> "Jane Doe is wearing ...", "They sit ..." -> "Jane Doe sits ...",
    "Her hair ..." -> "Jane Doe's hair ..."; None when the caption does not start with a pronoun."""
    m = LEADING_PRONOUN.match(text)
    if not m:
        return None
    pronoun, contraction, verb = m.group(1).lower(), (m.group(2) or "").lower(), (m.group(3) or "")
    subject = subject_phrase(name, class_word)  # "Jane Doe, a woman, walks"
    if pronoun in ("her", "his", "their"):  # at the start of a caption, a possessive
        return f"{name}'s" + text[m.end(1):]
    if pronoun != "they":
        rest = text[m.end(2):] if contraction else text[m.end(1):]
        return subject + {"'s": " is", "'re": " is", "'ve": " has"}.get(contraction, "") + rest
    if contraction:
        return subject + (" is" if contraction == "'re" else " has") + text[m.end(2):]
    if verb in NOT_VERBS or not verb.islower() or verb.endswith("ly"):
        return None  # "They both smile": several people, left for the review to flag
    return f"{subject} {third_person(verb)}" + text[m.end(3):]


# --- the generic subject --------------------------------------------------------------------------------


def subject_pattern(class_word: str | None) -> re.Pattern:
    nouns = PERSON if not class_word else rf"(?:{re.escape(class_word)}|{PERSON})"
    return re.compile(rf"\b(?:a|an|the|this|one)\s+(?:{SUBJECT_ADJECTIVES}\s+)?(?P<noun>{nouns})\b", re.IGNORECASE)


def generic_subject(text: str, class_word: str | None = None) -> re.Match | None:
    """The first "a woman" / "the person" ...; with class_word, the first one that class word stands for."""
    matches = [m for m in subject_pattern(class_word).finditer(text)
               if m.group("noun").lower() not in {"women", "men", "people", "girls", "boys", "ladies"}]
    if class_word:
        wanted = CLASS_SYNONYMS.get(class_word.lower(), {class_word.lower()})
        for m in matches:
            if m.group("noun").lower() in wanted:
                return m
    return matches[0] if matches else None


def name_subject(text: str, name: str, class_word: str | None = None) -> str | None:
    """"A woman in a red coat" -> "Jane Doe in a red coat"; None when there is no generic subject."""
    if not (m := generic_subject(text, class_word)):
        return None
    text = text[: m.start()] + subject_phrase(name, class_word) + text[m.end():]
    text = re.sub(r",\s*([,.;:])", r"\1", text).rstrip(",")  # "Jane Doe, a woman,, wearing"
    return text[0].upper() + text[1:]


def lead_with_name(text: str, name: str, class_word: str | None = None) -> str:
    """"close-up portrait, laughing" -> "Jane Doe, close-up portrait, laughing"."""
    subject = subject_phrase(name, class_word).rstrip(",")
    if not text:
        return subject
    word = text.split()[0]
    first = text if len(word) > 1 and word.isupper() else text[0].lower() + text[1:]  # keep acronyms ("TV studio")
    return f"{subject}, {first}"


# --- identity words the prompt asks the model to leave out -------------------------------------------

COLOUR = (r"(?:(?:light|dark|medium|ash|honey|dirty|golden|platinum|strawberry|sandy|jet|bright|deep|pale)[- ])?"
          r"(?:blonde?|brunette|brown|black|red|auburn|ginger|grey|gray|silver|white|golden|chestnut|copper|sandy"
          r"|dark|light|fair|raven|pink|blue|purple|green|salt[- ]and[- ]pepper)")
HAIR_STYLE = (r"(?:long|short|shoulder-length|medium-length|cropped|wavy|curly|straight|thick|thin|fine|sleek|messy"
              r"|tousled|voluminous|flowing|loose|braided|styled|natural|shiny|layered)")
EYE = r"(?:blue|green|brown|hazel|grey|gray|amber|dark|light|black|bright blue|piercing blue|deep blue|ice blue)"
AGE_WORDS = r"(?:teens|twenties|thirties|forties|fifties|sixties|seventies|eighties|\d0'?s)"
ETHNIC = (r"(?:asian|east asian|south asian|southeast asian|caucasian|hispanic|latina|latino|latinx|african[- ]american"
          r"|african|black|white|middle[- ]eastern|arab|indian|chinese|japanese|korean|european|mixed[- ]race|biracial"
          r"|native american|indigenous|scandinavian|nordic|slavic)")
IDENTITY_ADJECTIVE = (rf"(?:blonde?|brunette|redheaded|{COLOUR}-haired|{EYE}-eyed|[\w-]+-skinned|\d{{1,2}}-year-old|young|younger|old"
                      rf"|older|elderly|middle-aged|teenage|teenaged|adolescent|mature|aging|ageing|{ETHNIC})")

EYE_ADJECTIVES = r"(?:(?:striking|bright|piercing|deep|big|large|expressive|beautiful|sparkling) )*"
SKIN = (r"(?:fair|light|dark|olive|tan|tanned|pale|brown|black|white|porcelain|ebony|medium|deep|golden|bronze"
        r"|light-brown|dark-brown)")

IDENTITY_REMOVALS = [(re.compile(p, re.IGNORECASE), r) for p, r in (
    # "with blue eyes and a scarf" -> "with a scarf"; "has blue eyes and wears" -> "wears"; "with (striking) blue eyes"
    (rf"\b(with|having) {EYE_ADJECTIVES}{EYE} eyes,? and ", r"\1 "),
    (rf"\b(?:has|have) {EYE_ADJECTIVES}{EYE} eyes,? and ", ""),
    (rf",?\s*\b(?:with|and|has|having) {EYE_ADJECTIVES}{EYE} eyes\b", ""),
    (rf"\b((?:her|his|their) ){EYE} (eyes)\b", r"\1\2"),
    # skin tone, the same way
    (rf"\b(with|having) (?:an? )?{SKIN}(?:[- ]toned)? (?:skin|complexion),? and ", r"\1 "),
    (rf",?\s*\b(?:with|and|has|having) (?:an? )?{SKIN}(?:[- ]toned)? (?:skin|complexion)\b", ""),
    # "The woman appears to be in her 40s, wearing ..." -> "The woman, wearing ..." (not before ", and ...")
    (rf"\s+(?:is|appears to be|seems to be|looks to be|looks) (?:about |around |approximately |roughly )?in (?:her|his"
     rf"|their) (?:early |mid-?|late )?{AGE_WORDS}(?=,\s+(?!and\b|but\b))", ""),
    # "in her thirties" where it is not a predicate ("she is in her thirties and ..." is flagged instead)
    (rf"(?<!\bis)(?<!\bbe)(?<!\blooks),?\s+in (?:her|his|their) (?:early |mid-?|late )?{AGE_WORDS}\b", ""),
    (r",?\s*\baged \d{1,2}\b", ""),
    (r",\s*(?:(?:approximately|about|around|roughly) )?\d{1,2} years old(?=,)", ""),
    # "of East Asian descent"
    (r",?\s*\bof (?:[\w-]+ ){1,3}(?:descent|heritage|ethnicity)\b", ""),
    # a colour before "hair" (style words stay: "long blonde hair" -> "long hair"), then a bare "with hair"
    (rf"(?<![\w-]){COLOUR},? (?=(?:{HAIR_STYLE},? )*hair\b)", ""),
    (r"\b(with|having|sporting) hair,? and ", r"\1 "),
    (r"\b(?:has|have) hair,? and ", ""),
    (r",?\s*\b(?:with|and|has|having|sporting) hair\b", ""),
    # identity adjectives before the person: "a blonde woman", "a 30-year-old Asian man"
    (rf"(?<![\w-]){IDENTITY_ADJECTIVE},?\s+(?=(?:[\w-]+\s+){{0,2}}?{PERSON}\b)", ""),
    # "a blonde/brunette/redhead in a red dress": the noun itself
    (r"\b(a|the) (?:blonde?|brunette|redhead)\b(?!\s+(?:[\w-]+\s+)?" + PERSON + r"\b)", r"\1 person"),
)]

IDENTITY_WORDS = re.compile(
    rf"(?<![\w-]){COLOUR} (?:{HAIR_STYLE},? )*hair\b|\bhair (?:is|that is|colou?red) (?:\w+ )?{COLOUR}\b"
    rf"|(?<![\w-])(?:blonde?|brunette|redhead(?:ed)?|{COLOUR}-haired)(?![\w-])"
    rf"|(?<![\w-]){EYE} eyes\b|(?<![\w-]){EYE}-eyed\b|\beyes (?:are|is) (?:\w+ )?{EYE}\b"
    rf"|\b\d{{1,2}}[- ]years?[- ]old\b|\bin (?:her|his|their) (?:early |mid-?|late )?{AGE_WORDS}\b|\bmiddle-aged\b"
    rf"|\belderly\b|\bteenage[dr]?\b|\b(?:appears|seems|looks) to be (?:about|around|roughly|approximately|in)\b"
    rf"|\baged \d+|(?<![\w-])(?:asian|caucasian|hispanic|latina|latino|latinx|african[- ]american"
    rf"|middle[- ]eastern|biracial|mixed[- ]race|ethnicity|descent)(?![\w-])"
    rf"|(?<![\w-]){SKIN}(?:[- ]toned)? (?:skin|complexion)\b|\b[\w-]+-skinned\b|\bskin tone\b|\bcomplexion\b",
    re.IGNORECASE,
)


def strip_identity(text: str) -> str:
    """Remove hair and eye colour, age and ethnicity where the grammar is plain; the rest is flagged."""
    for pattern, replacement in IDENTITY_REMOVALS:
        text = pattern.sub(replacement, text)
    return " ".join(text.split()).strip(" ,")


# --- other people ---------------------------------------------------------------------------------------

RELATION = (r"(?:friend|friends|husband|wife|boyfriend|girlfriend|partner|mother|father|mom|dad|mum|sister|brother"
            r"|daughter|son|child|children|kids|baby|family|colleague|colleagues|companion|companions|group)")
NUMBER = r"(?:two|three|four|five|six|seven|eight|nine|ten|several|many|a few|a couple of|multiple|some|other|\d+)"
SEVERAL_PEOPLE = re.compile(
    rf"\b{NUMBER} (?:[\w-]+ )?(?:people|persons|women|men|girls|boys|ladies|gentlemen|guys|friends|children|kids"
    rf"|adults|individuals|teenagers|figures)\b"
    rf"|\b(?:a group|a crowd|a couple|a pair|the couple|the pair|the duo|the group|the two|both of them|all of them"
    rf"|each other|one another)\b|\bthey (?:both|all|each)\b"
    rf"|\b(?:another|a second|the other) (?:[\w-]+ )?(?:woman|man|person|girl|boy|lady|gentleman|guy|child|individual)\b"
    rf"|\b(?:and|with|beside|alongside|next to|behind|hugging|kissing|holding hands with|embracing) (?:a|an|the|her|his"
    rf"|their) (?:[\w-]+ )?(?:woman|man|person|girl|boy|lady|gentleman|guy|child|individual|{RELATION})\b(?!')"
    r"|\b(?:with|among|surrounded by) (?:friends|family|colleagues|children|kids|classmates|teammates|relatives)\b",
    re.IGNORECASE,
)


# --- language -------------------------------------------------------------------------------------------


@cache
def language_identifier():
    """py3langid's naive Bayes model (97 languages, numpy arrays, no pickle), probabilities normalised."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_of(text: str, name: str = "") -> str | None:
    """The ISO 639-1 code of a caption that is clearly not English, else None.

    Most letters outside the Latin script decide at once; otherwise py3langid must name another language
    with probability >= 0.5. English captions of a few tag-like words ("portrait, bokeh, 85mm") score low
    for every language, so they are never flagged; four words or fewer are not judged.
    """
    if name.strip():
        text = name_pattern(name.strip()).sub(" ", text)
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    non_latin = sum(1 for c in letters if not unicodedata.name(c, "").startswith("LATIN")) / len(letters)
    if non_latin < 0.5 and len(text.split()) <= 4:
        return None
    language, probability = language_identifier().classify(text)
    if non_latin >= 0.5:
        return language if language != "en" else "und"
    return language if language != "en" and probability >= 0.5 else None
