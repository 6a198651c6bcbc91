"""The text primitives behind the caption rules (captioners/review_rules.py holds the table that uses them).

Every function takes text already normalised by `normalize` (NFC, straight quotes and apostrophes), so a
pattern written with "'" also matches GPT-4o's "’". Patterns are English: a caption in another language is
flagged by `language_of`, not cleaned.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Callable

import ftfy

# --- normalisation --------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """ftfy's fix_text: mojibake repaired ("Iâ€™m" -> "I'm"), typographic quotes and apostrophes made straight,
    full-width forms made half-width, NFC; then invisible format characters dropped and whitespace collapsed."""
    text = ftfy.fix_text(text, normalization="NFC")
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")  # zero-width spaces, BOMs, joiners
    return " ".join(text.split())


MARKDOWN = re.compile(r"\*\*|__|^#+\s*|^[-*•]\s+|^\d+\.\s+")


def strip_decoration(text: str) -> str:
    """Markdown emphasis, a leading bullet or heading, and quotes around the whole answer."""
    return MARKDOWN.sub("", text).strip(" \"'`*")


# --- leaked chat-template tokens and reasoning ----------------------------------------------------------

# Reasoning models (GLM-4.1V-Thinking, Qwen3-VL-Thinking ...) wrap their answer; keep only the answer.
THINKING = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL | re.IGNORECASE)
ANSWER_TAGS = re.compile(r"</?answer>|<\|begin_of_box\|>|<\|end_of_box\|>", re.IGNORECASE)

# Tokens a server should have consumed: ChatML and Qwen (<|im_end|>), Llama 3 and JoyCaption (<|eot_id|>),
# Phi and GLM (<|end|>, <|user|>), DeepSeek (<｜end▁of▁sentence｜>, half-width after normalize), Gemma
# (<end_of_turn>), Idefics3/SmolVLM (<end_of_utterance>), LLaVA/Mistral (</s>, [INST]).
SPECIAL_TOKEN = re.compile(
    r"<\|[^<>|]{1,40}\|>|</?s>|<(?:bos|eos|pad|unk|image|video|audio|mask)>|</?(?:start|end)_of_\w{1,20}>"
    r"|<fake_token_around_image>|<global-img>|<row_\d+_col_\d+>|\[/?INST\]|<</?SYS>>",
    re.IGNORECASE,
)
# Placeholders the processor puts where an image goes: removed where they stand, not cut at.
PLACEHOLDER = re.compile(
    r"<\|?(?:image|video|audio|pad|unk|image_pad|video_pad|vision_start|vision_end|vision_pad)\|?>"
    r"|<fake_token_around_image>|<global-img>|<row_\d+_col_\d+>",
    re.IGNORECASE,
)
LEADING_TURN = re.compile(
    rf"^(?:(?:{SPECIAL_TOKEN.pattern})\s*(?:(?:assistant|model|gpt|bot)\b)?\s*:?\s*)+|^(?:assistant|gpt)\s*:\s*",
    re.IGNORECASE,
)
# A next turn the model went on to write in plain text (LLaVA-1.5's "USER: ... ASSISTANT:").
PLAIN_ROLE = re.compile(r"\s(?:USER|ASSISTANT|SYSTEM|Human|User|Assistant)\s*:")


def strip_reasoning(text: str) -> str:
    return ANSWER_TAGS.sub("", THINKING.sub("", text))


def strip_template_tokens(text: str) -> str:
    """Drop a leading assistant header, cut at the first end-of-turn token (what follows is a turn the model
    invented), and remove image placeholders."""
    text = LEADING_TURN.sub("", PLACEHOLDER.sub(" ", text).strip())
    ends = [m.start() for m in (SPECIAL_TOKEN.search(text), PLAIN_ROLE.search(text)) if m]
    return text[: min(ends, default=len(text))].strip()


# --- refusals and chat ----------------------------------------------------------------------------------

REFUSAL_VERBS = (r"(?:help|assist|identify|recogni[sz]e|provide|describe|determine|tell|say|comply|process|fulfill?"
                 r"|share|speculate|see|view|analy[sz]e|name|discuss|make out|access)")
REFUSAL = re.compile(
    r"\b(?:i'?m sorry|i am sorry|i apologi[sz]e|my apologies|sorry, (?:but )?i"
    r"|(?:i|we)(?:'m| am|'re| are)? (?:cannot|can ?not|can't|won't|will not|unable to|not able to|do not|don't"
    rf"|not allowed to|not permitted to) (?:\w+ )?{REFUSAL_VERBS}\b"
    r"|(?:unable|not able) to (?:help|assist|identify|recogni[sz]e|describe|provide|determine|process|comply|view"
    r"|see the)|can'?t assist|cannot assist|(?:do not|don't|am not|'m not|not) (?:feel )?comfortable (?:identifying|describing|naming)"
    r"|(?:don't|do not) have the (?:ability|capability|means) to|as an ai\b|as a language model"
    r"|as an? (?:ai )?assistant,|against (?:my|the|our) (?:guidelines|policy|policies|content policy))",
    re.IGNORECASE,
)
# A refusal to say *who* someone is: the model may still describe the photo, and that part is usable.
IDENTITY_REFUSAL = re.compile(
    r"\b(?:cannot|can ?not|can't|won't|will not|unable to|not able to|don't|do not|not (?:allowed|permitted) to)"
    r"(?: help(?: you)?(?: with)?)? (?:\w+ ){0,4}?(?:identif\w*|recogni[sz]\w*|(?:tell|say|determine|know) who"
    r"|name (?:the|this|people|individuals|real)|(?:their|her|his|the person's) identity)",
    re.IGNORECASE,
)
APOLOGY_ONLY = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry|my apologies|i apologi[sz]e|unfortunately)(?:,? but)?[,.!]?$", re.IGNORECASE)
CHAT = re.compile(
    r"^(?:sure|certainly|of course|absolutely|okay|ok|great question)\b[,!.]?$"
    r"|\b(?:let me know|feel free|i hope this helps|hope this helps|happy to help|is there anything else"
    r"|if you (?:have|need|want|would like|'d like)|i'd be happy|i would be happy)\b",
    re.IGNORECASE,
)
# "However, I can describe the image:" / "Here's a description:" — a lead-in before the usable part.
LEAD_IN = re.compile(
    r"^(?:(?:however|but|that said|instead|still),?\s+)?(?:(?:here(?:'s| is)|i can (?:describe|tell you about|"
    r"provide|give)|below is)[^:.]{0,80}:\s*|i can (?:tell you|say|see|describe) (?:that )?)",
    re.IGNORECASE,
)
SEGMENT_END = re.compile(r"(?<=[.!?])\s+|,\s+but\s+|;\s+(?:but\s+)?|\.\s+(?:but|however),?\s+", re.IGNORECASE)


class KeepForReview(Exception):
    """A rule cannot clean this answer safely: keep it as it is, for the review to flag."""


def without_refusal(text: str) -> str:
    """Keep what describes the photo around a refusal to identify the person; anything else is kept whole.

    "I can't identify people, but she wears a blue dress." -> "she wears a blue dress."
    Raises KeepForReview when a refusal remains (a refusal to describe at all, a model that did not see the
    image, a refusal inside the description) or when fewer than three words would be left.
    """
    if not REFUSAL.search(text) and not CHAT.search(text) and not LEAD_IN.match(text):
        return text
    kept, dropped = [], False
    for segment in SEGMENT_END.split(text):
        segment = segment.strip(" ,;")
        bare = LEAD_IN.sub("", segment).strip(" ,;")
        if bare != segment:
            dropped = True
        if not bare:
            continue
        if APOLOGY_ONLY.match(bare) or CHAT.search(bare) or IDENTITY_REFUSAL.search(bare):
            dropped = True  # the whole segment: a description inside a refusal is not separable safely
            continue
        kept.append(bare)
    rest = " ".join(kept)
    if REFUSAL.search(rest) or (dropped and len(rest.split()) < 3):
        raise KeepForReview(text)
    return rest if dropped else text


# --- openers --------------------------------------------------------------------------------------------

MEDIUM = r"(?:image|photo|photograph|picture|pic|scene|shot|snapshot|portrait|selfie|frame|still|screenshot)"
SHOWS = (r"(?:shows|showcases|depicts|features|captures|presents|portrays|displays|illustrates|contains|highlights"
         r"|is showing|is of|appears to (?:show|depict|be of)|seems to (?:show|depict|be of))")
OPENERS = [re.compile(p, re.IGNORECASE) for p in (
    rf"^(?:in|within|from) (?:the|this) (?:provided |given )?{MEDIUM}(?: provided| given| shown)?"
    rf"(?:,? (?:we|you|one|i) (?:can )?see|,? there (?:is|are))?,?\s*",
    rf"^(?:the|this) (?:provided |given |particular )?{MEDIUM} {SHOWS}(?: a moment (?:of|where|in which))?,?\s*",
    rf"^(?:this|it|here) is (?:an? )?{MEDIUM} (?:of|showing|depicting|featuring|that shows|capturing)\s+",
    rf"^(?:(?:this|it|here) is|(?:the|this) {MEDIUM} is)\s+(?=(?:a|an)\b)",  # keeps "a close-up of"
    r"^(?:an? )?(?:image|photo|photograph|picture|pic|snapshot) (?:of|showing|depicting|featuring|capturing)\s+",
    rf"^(?:pictured|shown|seen|featured|depicted)(?: here| above| in (?:the|this) {MEDIUM})? (?:is|are)\s+",
    rf"^the (?:main |central )?(?:subject|focus|focal point)(?: of (?:the|this) {MEDIUM})? is\s+(?=(?:a|an)\b)",
    r"^(?:here,? )?(?:i|we|you|one) (?:can )?see\s+",
    rf"^(?:here(?:'s| is) )?(?:an? |the |my )?(?:[\w-]+ )?(?:caption|description)"
    rf"(?: for (?:the|this) {MEDIUM})?(?: you (?:requested|asked for))?:\s*",
)]
def opener(text: str) -> re.Match | None:
    for pattern in OPENERS:
        if m := pattern.match(text):
            return m
    return None


def strip_openers(text: str) -> str:
    """Words about the picture rather than what is in it; framing words ("a close-up of") are kept."""
    while m := opener(text):  # "The image shows, in this image, ..." takes two passes
        text = text[m.end():]
    return text


REPEATED_WORDS = re.compile(r"\b(\w+(?:\s+\w+){0,3})(?:[\s,]+\1\b)+", re.IGNORECASE)


def strip_repetition(text: str) -> str:
    return REPEATED_WORDS.sub(r"\1", text)


# --- a sentence cut short -------------------------------------------------------------------------------

# Words an English caption does not end on: articles, most prepositions, conjunctions, possessives,
# auxiliaries. Particles that end phrases ("with her coat on", "hood up") are deliberately absent.
DANGLING = re.compile(
    r"(?:\b(?:a|an|the|of|with|at|in|to|from|by|for|into|onto|between|against|through|toward|towards|among"
    r"|beside|and|or|but|nor|while|whose|whom|which|his|their|its|my|your|our|is|are|was|were|has|have"
    r"|being|very|wearing|holding)|[,;:(&/]|[-–—]|\.\.\.|…)\s*$",
    re.IGNORECASE,
)


def unbalanced(text: str) -> bool:
    return text.count("(") > text.count(")") or text.count('"') % 2 == 1


def drop_dangling(text: str) -> str:
    """After a cut at a word: take back trailing words the sentence cannot end on ("standing in a" -> "standing")."""
    while (m := DANGLING.search(text)) and m.start() > 0:
        text = text[: m.start()].rstrip(" ,;:")
    return text


def fit_tokens(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> str:
    """Shorten to `max_tokens`: cut after the last sentence or clause that fits, else after the last word
    (taking back words a sentence cannot end on)."""
    if count_tokens(text) <= max_tokens:
        return text
    for boundary in (r"[.!?](?=\s)", r"[;,](?=\s)", r"\s"):
        cuts = [m.start() + (0 if boundary == r"\s" else 1) for m in re.finditer(boundary, text)]
        for cut in reversed(cuts):
            candidate = text[:cut].rstrip(" ,;")
            if boundary == r"\s":
                candidate = drop_dangling(candidate)
            if candidate and count_tokens(candidate) <= max_tokens:
                return candidate
    return ""
