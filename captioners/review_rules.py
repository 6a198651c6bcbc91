"""The caption rules, in one table: what each rule matches, and whether it cleans the VLM's answer (the caption
stage, `finish_caption`) or flags the caption for a person (the review stage, `caption_problems`), or both.

Cleaning runs the rows top to bottom on every new answer; a row cleans only what it can rewrite without
guessing, and what is left is flagged. Flags run on every caption, a person's edits included, after the
same normalisation, and each becomes a reason "kind: evidence" in the manifest and the review form.
README's "Caption rules" table is this table; tests/test_caption_rules.py has at least three phrasings per row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from captioners.caption_subject import (
    IDENTITY_WORDS,
    SEVERAL_PEOPLE,
    language_of,
    lead_with_name,
    name_in,
    name_subject,
    replace_leading_pronoun,
    strip_identity,
)
from captioners.caption_text import (
    DANGLING,
    MEDIUM,
    PLAIN_ROLE,
    REFUSAL,
    SHOWS,
    SPECIAL_TOKEN,
    KeepForReview,
    fit_tokens,
    normalize,
    opener,
    strip_decoration,
    strip_openers,
    strip_reasoning,
    strip_repetition,
    strip_template_tokens,
    unbalanced,
    without_refusal,
)

# Text in the picture is often a watermark, a meme caption or a screenshot: worth a look, maybe a drop.
MENTIONS_TEXT = re.compile(
    r"\b(watermark\w*|logo|signature|copyright|subtitles?|username|text (?:that )?(?:reads|says)|"
    r"the words?|written|caption reads)\b|@\w+|©",
    re.IGNORECASE,
)
BOILERPLATE_ANYWHERE = re.compile(
    rf"\b(?:the|this) {MEDIUM} {SHOWS}\b|\b(?:in|within) (?:the|this) {MEDIUM}, "
    r"|\b(?:image|photo|photograph|picture) (?:showing|depicting|featuring)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Subject:
    """What the rules need to know: the person's name and class word, and the review's limits."""

    name: str
    class_word: str | None = None
    count_tokens: Callable[[str], int] | None = None
    max_tokens: int = 75
    min_words: int = 3
    placeholder_tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    kind: str
    """The reason's prefix in the manifest and the review form."""
    matches: str
    """What it matches, in words, with examples."""
    clean: Callable[[str, Subject], str] | None = None
    """Rewrites a new answer (caption stage); may raise KeepForReview."""
    flag: Callable[[str, Subject], str | None] | None = None
    """Returns the evidence when the caption breaks the rule (review stage)."""

    @property
    def action(self) -> str:
        return "clean, else flag" if self.clean and self.flag else "clean" if self.clean else "flag"


def _text_only(clean: Callable[[str], str]) -> Callable[[str, Subject], str]:
    return lambda text, _: clean(text)


def _search(pattern: re.Pattern, why: str = "") -> Callable[[str, Subject], str | None]:
    return lambda text, _: f"{m.group(0).strip()!r}{why}" if (m := pattern.search(text)) else None


def _template_tokens(text: str, _: Subject) -> str | None:
    if m := SPECIAL_TOKEN.search(text) or PLAIN_ROLE.search(" " + text):
        return f"{m.group(0).strip()!r} (the server's chat template leaked into the answer)"
    return None


def _boilerplate(text: str, _: Subject) -> str | None:
    m = opener(text) or BOILERPLATE_ANYWHERE.search(text)
    return repr(m.group(0).strip(" ,")) if m and m.group(0).strip(" ,") else None


def _pronoun(text: str, s: Subject) -> str:
    return text if name_in(text, s.name) else (replace_leading_pronoun(text, s.name, s.class_word) or text)


def _subject(text: str, s: Subject) -> str:
    return text if name_in(text, s.name) else (name_subject(text, s.name, s.class_word) or text)


def _lead_with_name(text: str, s: Subject) -> str:
    return text if name_in(text, s.name) else lead_with_name(text, s.name, s.class_word)


def _name_missing(text: str, s: Subject) -> str | None:
    return None if name_in(text, s.name) else f"{s.name!r} is not in the caption (as a whole word)"


def _not_english(text: str, s: Subject) -> str | None:
    language = language_of(text, s.name)
    return f"{language!r}, not English (captions train best in the text encoders' language)" if language else None


def _truncated(text: str, _: Subject) -> str | None:
    if m := DANGLING.search(text):
        return f"ends with {text[max(0, m.start() - 20):].strip()!r} (cut by a content filter or a token limit?)"
    return "an unclosed quote or parenthesis" if unbalanced(text) else None


def _fit(text: str, s: Subject) -> str:
    if s.count_tokens is None:
        return text
    text = fit_tokens(text, s.count_tokens, s.max_tokens)
    if text and not name_in(text, s.name):  # the cut took the name with it: lead with it instead
        text = fit_tokens(_lead_with_name(text, s), s.count_tokens, s.max_tokens)
    return text


def _too_long(text: str, s: Subject) -> str | None:
    tokens = s.count_tokens(text) if s.count_tokens else 0
    return f"{tokens} CLIP tokens > {s.max_tokens}" if tokens > s.max_tokens else None


def _too_short(text: str, s: Subject) -> str | None:
    words = len(text.split())
    return f"{words} words < {s.min_words}" if words < s.min_words else None


def _placeholder(text: str, s: Subject) -> str | None:
    found = [t for t in s.placeholder_tokens if re.search(rf"(?<!\w){re.escape(t)}(?!\w)", text, re.IGNORECASE)]
    return f"{', '.join(map(repr, found))} (use the person's real name)" if found else None


def _empty(text: str, _: Subject) -> str | None:
    return None if text.strip() else "no caption"


RULES: tuple[Rule, ...] = (
    Rule("empty", "no caption at all, or nothing usable left of the answer", flag=_empty),
    Rule("normalise", "Unicode NFC; typographic quotes and apostrophes (’ “ ”) made straight; mojibake (Iâ€™m); "
         "full-width forms; zero-width characters; markdown and quotes around the answer",
         clean=_text_only(lambda text: strip_decoration(normalize(text)))),
    Rule("reasoning", "a reasoning model's <think>…</think>, <answer> tags, GLM's <|begin_of_box|>",
         clean=_text_only(strip_reasoning)),
    Rule("template_tokens", "chat-template tokens a server left in: <|im_end|>, <|eot_id|>, <end_of_turn>, </s>, "
         "[INST], a leading 'ASSISTANT:', a next 'USER:' turn; cut where the answer ends",
         clean=_text_only(strip_template_tokens), flag=_template_tokens),
    Rule("refusal", "apologies and refusals: I'm sorry, unable to, can't assist, as an AI; a refusal to identify "
         "the person is dropped and the description kept, any other refusal is left whole for a person",
         clean=_text_only(without_refusal), flag=_search(REFUSAL)),
    Rule("boilerplate", "openers about the picture: This image showcases, The image features, In this image, "
         "This is a photo of, Pictured is, The photo is (a close-up of), Here's a caption:; elsewhere, flagged",
         clean=_text_only(strip_openers), flag=_boilerplate),
    Rule("identity", "what the name should carry: hair, eye and skin colour, age, ethnicity (blonde, with blue eyes, "
         "fair skin, in her thirties, 30-year-old, Asian); removed where the grammar is plain, else flagged",
         clean=_text_only(strip_identity), flag=_search(IDENTITY_WORDS)),
    Rule("repetition", "a phrase repeated by a looping model (a coat coat coat)",
         clean=_text_only(strip_repetition)),
    Rule("pronoun", "a leading She/He/They/Her: replaced by the name (They sit -> Jane Doe sits)", clean=_pronoun),
    Rule("subject", "the generic subject (a woman, the person) replaced by the name; with class_word set, the "
         "subject that class word names is preferred (class_word man: a woman and a man -> a woman and Jane Doe)",
         clean=_subject),
    Rule("name_missing", "the name as a whole phrase on word boundaries (Eve is not in 'evening'); when missing, "
         "the caption leads with it", clean=_lead_with_name, flag=_name_missing),
    Rule("several_people", "more than one person: two women, a group of, a man and a woman, with her friend, "
         "another man", flag=_search(SEVERAL_PEOPLE, " (one person per caption trains best: crop or drop?)")),
    Rule("not_english", "a caption in another language (py3langid; any non-Latin script)", flag=_not_english),
    Rule("truncated", "a sentence cut short: ends on an article, preposition or conjunction (standing in a), a "
         "comma or dash, an open quote or parenthesis", flag=_truncated),
    Rule("too_long", "more CLIP tokens than SDXL reads (75): cut at a sentence or clause boundary",
         clean=_fit, flag=_too_long),
    Rule("too_short", "fewer words than review.min_words", flag=_too_short),
    Rule("placeholder", "a made-up trigger token (ohwx, sks, [name]) instead of the real name", flag=_placeholder),
    Rule("mentions_text", "text in the picture: watermark, logo, signature, the text reads, @handle",
         flag=_search(MENTIONS_TEXT, " (a watermark or caption in the picture?)")),
)


def clean_caption(raw: str, subject: Subject) -> str:
    """A VLM's answer through every cleaning row, in order. An answer no row can clean safely (a refusal)
    comes back normalised but otherwise as the model wrote it, for the review to flag."""
    text = raw
    try:
        for rule in RULES:
            if rule.clean:
                text = rule.clean(text, subject).strip(" ,;:")
                if not text:
                    return ""
    except KeepForReview as kept:
        return str(kept.args[0])
    return text


def caption_problems(caption: str | None, name: str, config, count_tokens, *, class_word: str | None = None) -> list[str]:
    """Every rule the caption breaks, as reasons "kind: evidence" for the manifest (empty list: clean).

    config: a ReviewConfig (max_tokens, min_words, placeholder_tokens); count_tokens: CLIP tokens of a text.
    """
    subject = Subject(name=name, class_word=class_word, count_tokens=count_tokens, max_tokens=config.max_tokens,
                      min_words=config.min_words, placeholder_tokens=tuple(config.placeholder_tokens))
    text = normalize(caption or "")
    if not text:  # nothing else can be said about no caption
        return [f"empty: {_empty(text, subject)}"]
    return [f"{rule.kind}: {why}" for rule in RULES if rule.flag and (why := rule.flag(text, subject))]
