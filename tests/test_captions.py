"""Captioning with the tiny LLaVA (saved, loaded back with from_pretrained) and fitting captions to CLIP's 75 tokens."""

from __future__ import annotations

import pytest
from captioners import clip_token_counter, finish_caption, load_captioner
from captioners.postprocess import fit_tokens
from helpers import cropped_demo_records
from lorapipe.config import CaptionConfig
from lorapipe.demo_data import draw, scenes
from tasks.caption import caption_records

NAME = "Jane Doe"


# Post-processing rules, row by row: tests/test_caption_rules.py.


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


def test_llava_next_batched_equals_one_by_one(tmp_path):
    from lorapipe.tiny_models import build_tiny_llava_next

    model = str(build_tiny_llava_next(tmp_path / "tiny-llava-next"))
    images = [draw(s) for s in scenes(3)]  # portrait, landscape, square: different tile counts
    batched = load_captioner("transformers", model, device="cpu", batch_size=3, max_new_tokens=12)
    single = load_captioner("transformers", model, device="cpu", batch_size=1, max_new_tokens=12)
    assert batched.describe(images, "Describe.") == single.describe(images, "Describe.")


def test_quantized_loading_needs_a_gpu(tiny_models):
    with pytest.raises(ValueError, match="4bit loading needs a CUDA GPU"):
        load_captioner("transformers", str(tiny_models.llava), device="cpu", quantization="4bit")


def test_tiny_llava_describes_what_it_sees(tiny_models):
    captioner = load_captioner("llava", str(tiny_models.llava), device="cpu", max_new_tokens=24)
    scene = scenes(1)[0]
    answer = captioner.describe([draw(scene)], CaptionConfig().prompt)[0].text
    assert answer.startswith("a woman") and scene.clothes in answer


@pytest.fixture
def cropped(tmp_path, workspace):
    return cropped_demo_records(tmp_path / "photos", workspace, 3)


def test_caption_stage_names_the_person_and_caches_per_image(cropped, workspace, tiny_models):
    config = CaptionConfig(model=str(tiny_models.llava), device="cpu", max_new_tokens=24)
    records, stats = caption_records(cropped, workspace, config, NAME, str(tiny_models.sdxl))
    assert stats == {"computed": 3, "reused": 0, "captions": 3, "failed": 0}
    assert all(r.caption.startswith(NAME) for r in records)
    assert records[0].caption_by["model"] == str(tiny_models.llava)

    # A new name re-finishes captions without running the model again.
    renamed, stats = caption_records(cropped, workspace, config, "Ada Lovelace", str(tiny_models.sdxl))
    assert stats["computed"] == 0 and all(r.caption.startswith("Ada Lovelace") for r in renamed)
    # A new prompt does run it again.
    _, stats = caption_records(cropped, workspace, config.model_copy(update={"prompt": "Describe."}), NAME,
                               str(tiny_models.sdxl))
    assert stats["computed"] == 3
