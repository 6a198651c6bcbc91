"""Captioning with the tiny LLaVA (saved, loaded back with from_pretrained), post-processing, review rules."""

from __future__ import annotations

import pytest
from PIL import Image

from captioners import clip_token_counter, finish_caption, load_captioner
from captioners.postprocess import fit_tokens
from helpers import cropped_demo_records
from lorapipe.config import CaptionConfig, ReviewConfig
from lorapipe.demo_data import draw, scenes
from tasks.caption import caption_records
from tasks.review import caption_problems, review_records

NAME = "Jane Doe"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The image shows a woman smiling in a red coat outdoors.", "Jane Doe smiling in a red coat outdoors."),
        ("In this image, a young man stands on a street.", "Jane Doe stands on a street."),
        ("close-up portrait, laughing, in a studio", "Jane Doe, close-up portrait, laughing, in a studio"),
        ("Jane Doe sitting in a kitchen", "Jane Doe sitting in a kitchen"),
        ("a woman wearing a coat coat coat", "Jane Doe wearing a coat"),
        ("I'm sorry, I cannot describe people in images.", ""),
    ],
)
def test_finish_caption(raw, expected):
    assert finish_caption(raw, NAME) == expected


def test_class_word_follows_the_name():
    assert finish_caption("a woman in a park", NAME, class_word="woman") == "Jane Doe, a woman, in a park"


def test_fit_cuts_at_a_clause_and_keeps_the_name(tiny_models):
    count = clip_token_counter(str(tiny_models.sdxl))
    long = "a woman smiling in a red coat, " + ", ".join(["standing on a city street in bright sunlight"] * 12)
    text = finish_caption(long, NAME, count_tokens=count, max_tokens=75)
    assert count(text) <= 75
    assert text.startswith("Jane Doe smiling in a red coat")
    assert long.replace("a woman", "Jane Doe").startswith(text)  # cut at a boundary, not mid-word
    assert fit_tokens("one two three", lambda s: len(s.split()), 2) == "one two"


def test_llava_batched_equals_one_by_one(tiny_models):
    images = [draw(s) for s in scenes(3)]
    prompt = CaptionConfig().prompt
    batched = load_captioner("llava", str(tiny_models.llava), device="cpu", batch_size=3, max_new_tokens=20)
    single = load_captioner("llava", str(tiny_models.llava), device="cpu", batch_size=1, max_new_tokens=20)
    assert batched.describe(images, prompt) == single.describe(images, prompt)


def test_tiny_llava_describes_what_it_sees(tiny_models):
    captioner = load_captioner("llava", str(tiny_models.llava), device="cpu", max_new_tokens=24)
    scene = scenes(1)[0]
    answer = captioner.describe([draw(scene)], CaptionConfig().prompt)[0]
    assert answer.startswith("a woman") and scene.clothes in answer


@pytest.fixture
def cropped(tmp_path, workspace):
    return cropped_demo_records(tmp_path / "photos", workspace, 3)


def test_caption_stage_names_the_person_and_caches_per_image(cropped, workspace, tiny_models):
    config = CaptionConfig(model=str(tiny_models.llava), device="cpu", max_new_tokens=24)
    records, stats = caption_records(cropped, workspace, config, NAME, str(tiny_models.sdxl))
    assert stats == {"computed": 3, "reused": 0, "captions": 3}
    assert all(r.caption.startswith(NAME) for r in records)
    assert records[0].caption_by["model"] == str(tiny_models.llava)

    # A new name re-finishes captions without running the model again.
    renamed, stats = caption_records(cropped, workspace, config, "Ada Lovelace", str(tiny_models.sdxl))
    assert stats["computed"] == 0 and all(r.caption.startswith("Ada Lovelace") for r in renamed)
    # A new prompt does run it again.
    _, stats = caption_records(cropped, workspace, config.model_copy(update={"prompt": "Describe."}), NAME,
                               str(tiny_models.sdxl))
    assert stats["computed"] == 3


@pytest.mark.parametrize(
    "caption, problem",
    [
        ("a woman in a red coat outdoors", "name_missing"),
        ("ohwx woman, Jane Doe, in a park", "placeholder"),
        ("Jane Doe", "too_short"),
        ("Jane Doe " + "smiling " * 80, "too_long"),
        ("", "empty"),
    ],
)
def test_review_rules_flag_with_a_reason(caption, problem, tiny_models):
    count = clip_token_counter(str(tiny_models.sdxl))
    problems = caption_problems(caption, NAME, ReviewConfig(), count)
    assert [p.split(":")[0] for p in problems] == [problem]


def test_review_approves_clean_captions_and_writes_only_their_sidecars(cropped, workspace, tiny_models):
    captions = ["Jane Doe smiling in a red coat outdoors", "sks person in a studio", "Jane Doe laughing in a park"]
    records = [r.model_copy(update={"caption": c}) for r, c in zip(cropped, captions)]
    reviewed, stats = review_records(records, workspace, ReviewConfig(), NAME, str(tiny_models.sdxl))
    assert stats == {"approved": 2, "pending": 1}
    assert [r.review for r in reviewed] == ["approved", "pending", "approved"]
    sidecars = [workspace.path(r.image_path).with_suffix(".txt") for r in reviewed]
    assert sidecars[0].read_text() == captions[0]
    assert not sidecars[1].exists()
    assert Image.open(workspace.path(reviewed[0].image_path)).size[0] % 32 == 0
