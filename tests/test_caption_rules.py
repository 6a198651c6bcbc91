"""The caption rule table (captioners/review_rules.py), row by row, on answers as real VLMs write them.

GPT-4o writes typographic apostrophes; LLaVA opens with "The image features ..."; Qwen with "In this
image, ..."; servers leak their chat template. Every row of RULES has at least three phrasings here, and
the numbered faults go through the user's door: `lorapipe caption` against an OpenAI-compatible server on
127.0.0.1, then `lorapipe review`.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from captioners import clip_token_counter, finish_caption
from captioners.review_rules import RULES, caption_problems
from lorapipe.config import ReviewConfig

NAME = "Jane Doe"


def words(text: str) -> int:
    return len(text.split())


# (kind, VLM answer, caption after the caption stage, finish_caption's keyword arguments)
CLEANED = [
    ("normalise", "“A woman in a denim jacket leans on a railing.”", "Jane Doe in a denim jacket leans on a railing.", {}),
    ("normalise", "A woman in a cafÃ© wearing a beret.", "Jane Doe in a café wearing a beret.", {}),
    ("normalise", "**A woman**\u200b in a cafe\u0301, laughing.", "Jane Doe in a café, laughing.", {}),
    ("normalise", "A man in a flat cap, he’s reading the paper.", "Jane Doe in a flat cap, he's reading the paper.", {}),
    ("reasoning", "<think>The user wants a caption.</think><answer>A man in a grey suit on a city street.</answer>",
     "Jane Doe in a grey suit on a city street.", {}),
    ("reasoning", "<think>\nLet me look at the photo.\n</think>\n\nA woman reading on a sofa, lamp light.",
     "Jane Doe reading on a sofa, lamp light.", {}),
    ("reasoning", "<|begin_of_box|>A woman jogging in a park at dawn.<|end_of_box|>",
     "Jane Doe jogging in a park at dawn.", {}),
    ("reasoning", "<think>The photo shows a woman in a", "", {}),
    ("template_tokens", "A woman in a blue dress smiling outdoors.<|im_end|> <|im_start|>user",
     "Jane Doe in a blue dress smiling outdoors.", {}),
    ("template_tokens", "A woman sitting at a desk, typing.<|eot_id|><|start_header_id|>user<|end_header_id|>",
     "Jane Doe sitting at a desk, typing.", {}),
    ("template_tokens", "<start_of_turn>model\nA man hiking on a mountain trail.<end_of_turn>",
     "Jane Doe hiking on a mountain trail.", {}),
    ("template_tokens", "ASSISTANT: A woman holding an umbrella in the rain. USER: <image> Describe it again.",
     "Jane Doe holding an umbrella in the rain.", {}),
    ("template_tokens", "A man in a kitchen, cooking.<｜end▁of▁sentence｜>", "Jane Doe in a kitchen, cooking.", {}),
    ("template_tokens", "A woman on a beach at sunset.</s>[INST] Describe another photo [/INST]",
     "Jane Doe on a beach at sunset.", {}),
    ("refusal", "I can’t identify the person, but she is wearing a blue dress and smiling outdoors.",
     "Jane Doe is wearing a blue dress and smiling outdoors.", {}),
    ("refusal", "I’m unable to identify real people, but here’s a description: a man in a grey suit walks along "
     "a city street.", "Jane Doe in a grey suit walks along a city street.", {}),
    ("refusal", "Sorry, I can't tell who this is. The person is wearing a denim jacket at golden hour.",
     "Jane Doe is wearing a denim jacket at golden hour.", {}),
    ("refusal", "As an AI, I can't identify people. A woman in a green scarf walks her dog in a park.",
     "Jane Doe in a green scarf walks her dog in a park.", {}),
    ("refusal", "I’m not able to help identify people, but I can describe the image: a man in a blue suit stands "
     "at a podium.", "Jane Doe in a blue suit stands at a podium.", {}),
    ("refusal", "I don't feel comfortable identifying people, but the man wears a grey suit.",
     "Jane Doe wears a grey suit.", {}),
    ("refusal", "Sure! Here's a caption: a woman in a yellow raincoat on a rainy street. Let me know if you need "
     "anything else!", "Jane Doe in a yellow raincoat on a rainy street.", {}),
    ("boilerplate", "This image showcases a woman wearing a blue dress, smiling, outdoors.",
     "Jane Doe wearing a blue dress, smiling, outdoors.", {}),
    ("boilerplate", "The image features a woman sitting on a bench in a park, reading a book.",
     "Jane Doe sitting on a bench in a park, reading a book.", {}),
    ("boilerplate", "In this image, a man is standing on a beach at sunset.", "Jane Doe is standing on a beach at sunset.",
     {}),
    ("boilerplate", "This is a photo of a woman holding a coffee cup in a cafe.",
     "Jane Doe holding a coffee cup in a cafe.", {}),
    ("boilerplate", "The photo is a close-up of a woman laughing, soft window light.",
     "A close-up of Jane Doe laughing, soft window light.", {}),
    ("boilerplate", "The image captures a moment where a woman is dancing in the rain.",
     "Jane Doe is dancing in the rain.", {}),
    ("boilerplate", "In the photo, we can see a man cycling along a canal.", "Jane Doe cycling along a canal.", {}),
    ("boilerplate", "Pictured is a woman holding a bouquet of flowers.", "Jane Doe holding a bouquet of flowers.", {}),
    ("boilerplate", "The subject of this image is a woman in a green coat, standing by a lake.",
     "Jane Doe in a green coat, standing by a lake.", {}),
    ("boilerplate", "A photograph showing a man walking a dog.", "Jane Doe walking a dog.", {}),
    ("boilerplate", "A photo of the person sitting at a cafe table, holding a cup.",
     "Jane Doe sitting at a cafe table, holding a cup.", {}),
    ("identity", "A blonde woman with blue eyes in her thirties, wearing a grey hoodie, sitting on a park bench.",
     "Jane Doe, wearing a grey hoodie, sitting on a park bench.", {}),
    ("identity", "A young Asian woman with long black hair in a white blouse, smiling.",
     "Jane Doe with long hair in a white blouse, smiling.", {}),
    ("identity", "A 30-year-old man of Hispanic descent in a navy suit at a conference.",
     "Jane Doe in a navy suit at a conference.", {}),
    ("identity", "A redhead in a green dress walking through a market.", "Jane Doe in a green dress walking through a "
     "market.", {}),
    ("identity", "A middle-aged man with gray hair and brown eyes, wearing glasses, reading a newspaper.",
     "Jane Doe, wearing glasses, reading a newspaper.", {}),
    ("identity", "She has shoulder-length brown hair and is wearing a striped shirt.",
     "Jane Doe has shoulder-length hair and is wearing a striped shirt.", {}),
    ("identity", "A woman with striking green eyes and red lipstick, wearing a black dress.",
     "Jane Doe with red lipstick, wearing a black dress.", {}),
    ("identity", "A dark-skinned man with an olive complexion and a beard, in a yellow shirt.",
     "Jane Doe with a beard, in a yellow shirt.", {}),
    ("identity", "The woman appears to be in her 40s, wearing a blue blouse.", "Jane Doe, wearing a blue blouse.", {}),
    ("repetition", "a woman wearing a coat coat coat", "Jane Doe wearing a coat", {}),
    ("repetition", "A man standing on a beach, on a beach, on a beach.", "Jane Doe standing on a beach.", {}),
    ("repetition", "A woman smiling smiling smiling at the camera", "Jane Doe smiling at the camera", {}),
    ("pronoun", "She is wearing a blue dress and smiling.", "Jane Doe is wearing a blue dress and smiling.", {}),
    ("pronoun", "He stands on a rocky beach at sunset.", "Jane Doe stands on a rocky beach at sunset.", {}),
    ("pronoun", "They sit on a park bench, reading a book.", "Jane Doe sits on a park bench, reading a book.", {}),
    ("pronoun", "She's laughing in a kitchen.", "Jane Doe is laughing in a kitchen.", {}),
    ("pronoun", "Her hair is tied back, and she wears a denim jacket.",
     "Jane Doe's hair is tied back, and she wears a denim jacket.", {}),
    ("pronoun", "She walks a dog on a beach.", "Jane Doe, a woman, walks a dog on a beach.", {"class_word": "woman"}),
    ("subject", "A woman in a red coat standing on a bridge.", "Jane Doe in a red coat standing on a bridge.", {}),
    ("subject", "The person is sitting at a cafe table, holding a cup.",
     "Jane Doe is sitting at a cafe table, holding a cup.", {}),
    ("subject", "a woman in a park", "Jane Doe, a woman, in a park", {"class_word": "woman"}),
    ("subject", "A woman hands a coffee to a man in a grey suit.",
     "A woman hands a coffee to Jane Doe, a man, in a grey suit.", {"class_word": "man"}),
    ("subject", "A dog sits beside a lady in a park.", "A dog sits beside Jane Doe, a woman, in a park.",
     {"class_word": "woman"}),
    ("name_missing", "TV studio, a news desk, bright lights", "Jane Doe, TV studio, a news desk, bright lights", {}),
    ("name_missing", "A dark studio, a single spotlight", "Jane Doe, a dark studio, a single spotlight", {}),
    ("name_missing", "close-up portrait, laughing, in a studio", "Jane Doe, close-up portrait, laughing, in a studio", {}),
    ("name_missing", "Walking a dog along a beach at sunrise.", "Jane Doe, walking a dog along a beach at sunrise.", {}),
    ("name_missing", "Jane Doe sitting in a kitchen", "Jane Doe sitting in a kitchen", {}),
    ("name_missing", "A woman in an evening gown on a balcony at dusk.", "Eve in an evening gown on a balcony at dusk.",
     {"name": "Eve"}),
    ("name_missing", "Zoe\u0308 in a yellow coat, in a park", "Zoë in a yellow coat, in a park", {"name": "Zoë"}),
    ("too_long", "A woman smiling in a park. She holds a red umbrella over her head.", "Jane Doe smiling in a park.",
     {"count_tokens": words, "max_tokens": 6}),
    ("too_long", "A woman in a red coat, standing on a bridge, looking at the river", "Jane Doe in a red coat",
     {"count_tokens": words, "max_tokens": 8}),
    ("too_long", "A woman standing in a garden full of roses", "Jane Doe standing", {"count_tokens": words, "max_tokens": 5}),
]

# Refusals no rule can clean safely: kept as the model wrote them (normalised), for a person.
KEPT_FOR_REVIEW = [
    "I’m sorry, but I can’t help with identifying people in images.",
    "I'm sorry, I can't assist with that request.",
    "I am unable to see the image, but it likely shows a woman in a park.",
    "The woman, whom I cannot identify, wears a blue dress.",
    "As an AI language model, I cannot describe images of real people.",
]

# (kind, caption, name): caption_problems must report this kind.
FLAGGED = [
    ("empty", "", NAME), ("empty", "   ", NAME), ("empty", "\u200b", NAME),
    ("template_tokens", "Jane Doe in a park.<|im_end|>", NAME),
    ("template_tokens", "Jane Doe smiling at the camera </s>", NAME),
    ("template_tokens", "Jane Doe at a desk [INST] describe the image", NAME),
    ("template_tokens", "Jane Doe on a beach. USER: thanks", NAME),
    ("refusal", "Jane Doe. I’m sorry, I can’t identify people.", NAME),
    ("refusal", "I'm sorry, I can't assist with that request.", NAME),
    ("refusal", "As an AI, I cannot describe real people.", NAME),
    ("refusal", "Jane Doe, but I am unable to identify her.", NAME),
    ("boilerplate", "The image shows Jane Doe in a park", NAME),
    ("boilerplate", "This image showcases Jane Doe in a red coat", NAME),
    ("boilerplate", "Jane Doe in a park; the photo depicts a sunny day", NAME),
    ("boilerplate", "Jane Doe smiling. In this image, the light is warm", NAME),
    ("identity", "Jane Doe, whose hair is blonde, in a park", NAME),
    ("identity", "Jane Doe appears to be in her early twenties, at a desk", NAME),
    ("identity", "Jane Doe's eyes are green; she sits by a window", NAME),
    ("identity", "Jane Doe, a Caucasian woman, in a studio", NAME),
    ("identity", "Jane Doe, a 45-year-old teacher, in a classroom", NAME),
    ("identity", "Jane Doe is in her 30s and wears a green coat", NAME),
    ("identity", "Jane Doe, fair-skinned, at the beach", NAME),
    ("name_missing", "A woman in an evening gown on a balcony at dusk.", "Eve"),
    ("name_missing", "A woman holding a rose in a garden", "Rose"),
    ("name_missing", "A man parking in a marked bay", "mark"),
    ("name_missing", "Jane in a park, smiling", NAME),
    ("several_people", "Jane Doe and a man sitting on a bench, laughing.", NAME),
    ("several_people", "Two women walking arm in arm down a street, Jane Doe on the left.", NAME),
    ("several_people", "Jane Doe with her friends at a birthday party.", NAME),
    ("several_people", "A group of people at a concert, Jane Doe in the front.", NAME),
    ("several_people", "Jane Doe stands next to another woman in a red dress.", NAME),
    ("several_people", "Jane Doe laughing with friends at a cafe.", NAME),
    ("not_english", "Eine Frau in einem roten Mantel steht lächelnd im Park.", NAME),
    ("not_english", "Jane Doe con un vestido azul sonriendo al aire libre.", NAME),
    ("not_english", "Jane Doe en robe bleue sourit sur un balcon au coucher du soleil.", NAME),
    ("not_english", "一位穿着蓝色连衣裙的女士在户外微笑。", NAME),
    ("not_english", "Jane Doe в красном пальто улыбается в парке.", NAME),
    ("truncated", "Jane Doe in a red coat, standing in a", NAME),
    ("truncated", "Jane Doe sitting on a bench and", NAME),
    ("truncated", "Jane Doe on a beach at sunset, holding", NAME),
    ("truncated", "Jane Doe leaning on a railing (golden hour", NAME),
    ("truncated", "Jane Doe in a well-", NAME),
    ("too_long", "Jane Doe " + "smiling " * 80, NAME),
    ("too_long", "Jane Doe in a red coat, " + ", ".join(["standing on a city street in bright sunlight"] * 9), NAME),
    ("too_long", "Jane Doe. " + "A cafe table, a cup, a saucer, a spoon. " * 8, NAME),
    ("too_short", "Jane Doe", NAME), ("too_short", "“Jane Doe”", NAME), ("too_short", "Jane Doe.", NAME),
    ("placeholder", "ohwx woman, Jane Doe, in a park", NAME),
    ("placeholder", "sks person Jane Doe at the beach", NAME),
    ("placeholder", "[name] Jane Doe in a studio", NAME),
    ("mentions_text", "Jane Doe in a park, a watermark in the corner", NAME),
    ("mentions_text", "Jane Doe holding a sign, the text reads 'hello'", NAME),
    ("mentions_text", "Jane Doe at a desk, @janedoe in the corner", NAME),
]

# Near misses: each must not be reported as its kind.
NOT_FLAGGED = [
    ("name_missing", "Eve's red coat, in the evening light on a balcony", "Eve"),
    ("name_missing", "Zoë in a park, smiling", "Zoe\u0308"),
    ("name_missing", "jane doe in a park, smiling", "jane doe"),
    ("identity", "Jane Doe in a white dress and a black leather jacket, red lipstick", NAME),
    ("identity", "Jane Doe, wide-eyed, laughing, hair in a bun", NAME),
    ("identity", "Jane Doe with a blue scarf, young trees behind her", NAME),
    ("several_people", "Jane Doe with her dog in a park", NAME),
    ("several_people", "Jane Doe in a crowded market, hands together", NAME),
    ("several_people", "Jane Doe holding a man's watch, smiling", NAME),
    ("several_people", "Jane Doe in her boyfriend's jacket", NAME),
    ("not_english", "Jane Doe in a kimono, Kyoto street, bokeh", NAME),
    ("not_english", "Jane Doe, portrait, bokeh, 85mm", NAME),
    ("not_english", "Jane Doe wearing a beret at a Paris café terrace", NAME),
    ("not_english", "Jane Doe, fiesta, sombrero, mariachi band", NAME),
    ("not_english", "Jane Doe in a dirndl, alpine meadow, Tyrol", NAME),
    ("truncated", "Jane Doe with her sunglasses on", NAME),
    ("truncated", "Jane Doe, hood up, in the rain", NAME),
    ("truncated", "Jane Doe, arms crossed, looking on", NAME),
    ("boilerplate", "Jane Doe in a photo booth, pulling a face", NAME),
    ("boilerplate", "Jane Doe in a T-shirt showing a band's name", NAME),
    ("refusal", "Jane Doe, unable to hide her smile, at a party", NAME),
]


@pytest.fixture(scope="module")
def count_tokens(tiny_models):
    return clip_token_counter(str(tiny_models.sdxl))


@pytest.mark.parametrize("kind, raw, expected, options", CLEANED, ids=[f"{c[0]}-{i}" for i, c in enumerate(CLEANED)])
def test_cleaning_row(kind, raw, expected, options, count_tokens):
    options = dict(options)
    name = options.pop("name", NAME)
    caption = finish_caption(raw, name, **options)
    assert caption == unicodedata.normalize("NFC", expected)
    if caption:  # what a row cleaned, the review no longer flags
        problems = caption_problems(caption, name, ReviewConfig(), count_tokens,
                                    class_word=options.get("class_word"))
        assert not [p for p in problems if p.startswith(f"{kind}:")], problems


@pytest.mark.parametrize("raw", KEPT_FOR_REVIEW)
def test_a_refusal_that_cannot_be_cleaned_safely_is_kept_and_flagged(raw, count_tokens):
    caption = finish_caption(raw, NAME)
    assert caption == raw.replace("’", "'")  # as the model wrote it, without the name bolted on
    kinds = [p.split(":")[0] for p in caption_problems(caption, NAME, ReviewConfig(), count_tokens)]
    assert "refusal" in kinds and "name_missing" in kinds


@pytest.mark.parametrize("kind, caption, name", FLAGGED, ids=[f"{c[0]}-{i}" for i, c in enumerate(FLAGGED)])
def test_flagging_row(kind, caption, name, count_tokens):
    problems = caption_problems(caption, name, ReviewConfig(), count_tokens)
    assert kind in [p.split(":")[0] for p in problems], problems


@pytest.mark.parametrize("kind, caption, name", NOT_FLAGGED, ids=[f"{c[0]}-{i}" for i, c in enumerate(NOT_FLAGGED)])
def test_near_misses_are_not_flagged(kind, caption, name, count_tokens):
    problems = caption_problems(caption, name, ReviewConfig(), count_tokens)
    assert kind not in [p.split(":")[0] for p in problems], problems


def test_every_row_has_three_phrasings_and_a_readme_line():
    cleaned = Counter(kind for kind, *_ in CLEANED)
    flagged = Counter(kind for kind, *_ in FLAGGED) + Counter("refusal" for _ in KEPT_FOR_REVIEW)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for rule in RULES:
        if rule.clean:
            assert cleaned[rule.kind] >= 3, f"{rule.kind}: fewer than three cleaning phrasings"
        if rule.flag:
            assert flagged[rule.kind] >= 3, f"{rule.kind}: fewer than three flagged phrasings"
        assert re.search(rf"^\| `{rule.kind}` \| .* \| {re.escape(rule.action)} \|$", readme, re.M), rule.kind


def test_a_clean_caption_breaks_no_rule(count_tokens):
    for caption in ("Jane Doe in a denim jacket leans on a railing at golden hour.",
                    "Jane Doe, close-up portrait, laughing, in a studio",
                    "A close-up of Jane Doe smiling, soft window light"):
        assert caption_problems(caption, NAME, ReviewConfig(), count_tokens) == []


# --- through the user's door: `lorapipe caption` against a server on 127.0.0.1, then `lorapipe review` ---

# What an OpenAI-compatible server answered for each photo, and what the person then sees.
ANSWERS = {
    # issue: a GPT-4o refusal (typographic apostrophes) was approved as "Eve, I’m sorry, ..."
    "I’m sorry, but I can’t help with identifying people in images.": ("pending", ["refusal", "name_missing"]),
    "I can’t identify the person, but she is holding a coffee cup in a cafe.":
        ("approved", "Eve is holding a coffee cup in a cafe."),
    # issue: name "Eve" was taken as present in "evening"
    "A woman in an evening gown on a balcony at dusk.": ("approved", "Eve in an evening gown on a balcony at dusk."),
    # issue: openers and identity words slipped through
    "This image showcases a woman wearing a blue dress, smiling, outdoors.":
        ("approved", "Eve wearing a blue dress, smiling, outdoors."),
    "A blonde woman with blue eyes in her thirties, wearing a grey hoodie, sitting on a park bench.":
        ("approved", "Eve, wearing a grey hoodie, sitting on a park bench."),
    # issue: a content-filter cut and a leaked chat template were stored and not flagged
    "A woman in a red coat, standing in a": ("pending", ["truncated"]),
    "A woman in a yellow raincoat on a rainy street.<|im_end|> <|im_start|>user":
        ("approved", "Eve in a yellow raincoat on a rainy street."),
    "Ein Mann in einem grauen Anzug steht auf einer Straße.": ("pending", ["not_english"]),
    "Two women laughing on a sofa, one in a green sweater.": ("pending", ["several_people"]),
}


@pytest.fixture(scope="module")
def reviewed_by_cli(tmp_path_factory, tiny_models):
    """Photos -> `lorapipe collect/validate/dedup/crop/caption/review` with the VLM behind a local server."""
    from flows.cli import app
    from lorapipe.demo_data import draw, scenes
    from test_caption_api import FakeVLMServer

    root = tmp_path_factory.mktemp("rules-cli")
    photos, ws = root / "photos", root / "ws"
    photos.mkdir()
    for i, scene in enumerate(scenes(len(ANSWERS))):
        draw(scene).save(photos / f"p{i}.png")
    server = FakeVLMServer()
    server.script = [(200, {}, answer, 0, "stop") for answer in ANSWERS]
    config = root / "job.yaml"
    config.write_text(
        f"name: Eve\nimages: {photos}\ndataset:\n  crop:\n    resolution: 256\n    bucket_step: 32\n    face_aware: false\n"
        f"caption:\n  backend: openai\n  model: gpt-4o\n  api_base_url: {server.url}\n"
        f"  api_key_env: LORAPIPE_TEST_NO_KEY\n  api_concurrency: 1\n  batch_size: 1\n"
        f"train:\n  base_model: {tiny_models.sdxl}\n"
    )
    runner = CliRunner()
    try:
        for argv in (["collect", str(ws), "--config", str(config)], ["validate", str(ws)], ["dedup", str(ws)],
                     ["crop", str(ws)], ["caption", str(ws)]):
            result = runner.invoke(app, argv)
            assert result.exit_code == 0, (argv, result.output)
    finally:
        server.close()
    assert len(server.requests) == len(ANSWERS)
    listed = runner.invoke(app, ["review", str(ws)])
    assert listed.exit_code == 0, listed.output
    manifest = [json.loads(line) for line in Path(json.loads(listed.stdout)["manifest"]).read_text().splitlines()]
    return ws, listed, [r for r in manifest if r["status"] == "kept"]


def outcomes(records, review):
    return sorted((r["caption"], sorted({p.split(":")[0] for p in r["review_reasons"]}))
                  for r in records if r["review"] == review)


def test_cli_refusals_are_never_approved(reviewed_by_cli):
    ws, listed, records = reviewed_by_cli
    refusal = [r for r in records if "sorry" in r["caption"].lower()]
    assert len(refusal) == 1 and refusal[0]["review"] == "pending"
    assert refusal[0]["caption"] == "I'm sorry, but I can't help with identifying people in images."
    assert any(p.startswith("refusal:") for p in refusal[0]["review_reasons"])
    assert "Eve is holding a coffee cup in a cafe." in [r["caption"] for r in records if r["review"] == "approved"]
    assert "refusal" in listed.stderr


def test_cli_a_name_inside_another_word_is_not_the_name(reviewed_by_cli):
    _, _, records = reviewed_by_cli
    evening = next(r for r in records if "evening gown" in r["caption"])
    assert evening["caption"] == "Eve in an evening gown on a balcony at dusk." and evening["review"] == "approved"


def test_cli_openers_and_identity_words_are_removed(reviewed_by_cli):
    ws, _, records = reviewed_by_cli
    approved = {r["caption"] for r in records if r["review"] == "approved"}
    assert {"Eve wearing a blue dress, smiling, outdoors.",
            "Eve, wearing a grey hoodie, sitting on a park bench."} <= approved
    sidecars = {p.read_text() for p in (ws / "images").glob("*.txt")}
    assert sidecars == approved  # what trains is what was approved, nothing else
    assert not any(re.search(r"showcases|blonde|blue eyes|thirties", s, re.I) for s in sidecars)


def test_cli_cut_and_leaked_answers_are_flagged_or_cleaned(reviewed_by_cli):
    _, listed, records = reviewed_by_cli
    assert ("Eve in a red coat, standing in a", ["truncated"]) in outcomes(records, "pending")
    assert "Eve in a yellow raincoat on a rainy street." in [r["caption"] for r in records if r["review"] == "approved"]
    assert not any("<|" in r["caption"] for r in records)


def test_cli_every_answer_lands_where_a_person_expects(reviewed_by_cli):
    _, listed, records = reviewed_by_cli
    expected_approved = sorted(v[1] for v in ANSWERS.values() if v[0] == "approved")
    assert sorted(r["caption"] for r in records if r["review"] == "approved") == expected_approved
    pending = [sorted({p.split(":")[0] for p in r["review_reasons"]}) for r in records if r["review"] == "pending"]
    assert sorted(pending) == sorted(sorted(v[1]) for v in ANSWERS.values() if v[0] == "pending")
    assert json.loads(listed.stdout)["waiting"] == len(pending)
