"""The VLM families people caption with, as tiny random-weight builds of their own transformers classes
(tests/vlm_families.py): loading, batching, padding, prompt token ids, decoding. Not caption quality.

Families whose processor needs torchvision (which does not import beside the CPU torch wheel here) run with
the video processor left out; loading them from a folder is tested for its one-line refusal naming the extra.
"""

from __future__ import annotations

import importlib
import json
import re
import tomllib
from pathlib import Path

import pytest

from captioners import load_captioner
from captioners.families import FAMILIES, TaskPrompt, required_modules
from captioners.transformers_vlm import TransformersCaptioner
from lorapipe.demo_data import draw, scenes
from lorapipe.errors import UserError
from vlm_families import BUILDERS, build_saved

PROMPT = "Describe the photo in one sentence."
LOADABLE = ["joycaption", "idefics3", "gemma3", "paligemma", "florence2"]  # their processors load here
NEEDS_TORCHVISION = {"onevision": "onevision", "qwen2_vl": "qwen-vl", "qwen2_5_vl": "qwen-vl",
                     "qwen3_vl": "qwen-vl", "glm4v": "glm-v", "smolvlm": "smolvlm"}
# The token each family's prompt starts with (None: not first) and how often it is in one prompt.
START = {
    "joycaption": ("<|begin_of_text|>", 1, True), "idefics3": ("<|begin_of_text|>", 1, True),
    "smolvlm": ("<|im_start|>", 1, True), "gemma3": ("<bos>", 1, True),
    "paligemma": ("<bos>", 1, False),  # after the image tokens, as its processor places it
    "florence2": ("<s>", 1, False),
    "glm4v": ("[gMASK]", 1, True),
    "qwen2_vl": ("<|im_start|>", 3, True), "qwen2_5_vl": ("<|im_start|>", 3, True),  # system, user, assistant
    "qwen3_vl": ("<|im_start|>", 2, True), "onevision": ("<|im_start|>", 2, True),  # user, assistant
}


def torchvision_imports() -> bool:
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def images():
    return [draw(s) for s in scenes(3)]  # portrait, landscape, square: different token counts where it matters


def captioner_for(family: str, tmp_path: Path, batch_size: int, max_new_tokens: int = 8):
    """Loaded from a saved folder where its processor loads here; else built in memory."""
    if family in LOADABLE:
        return load_captioner("transformers", build_saved(family, tmp_path / family), device="cpu",
                              batch_size=batch_size, max_new_tokens=max_new_tokens)
    model, processor = BUILDERS[family]()
    return TransformersCaptioner(model, processor, batch_size=batch_size, max_new_tokens=max_new_tokens)


def spy_generate(captioner) -> list:
    """Record each generate() call's input ids and output on the loaded model."""
    calls, generate = [], captioner.model.generate

    def spy(**kwargs):
        out = generate(**kwargs)
        calls.append((kwargs["input_ids"], out))
        return out

    captioner.model.generate = spy
    return calls


@pytest.mark.parametrize("family", LOADABLE + list(NEEDS_TORCHVISION))
def test_batched_equals_one_by_one(family, tmp_path, images):
    captioner = captioner_for(family, tmp_path, batch_size=3)
    batched = captioner.describe(images, PROMPT)
    captioner.batch_size = 1
    assert batched == captioner.describe(images, PROMPT)
    assert len(batched) == 3


@pytest.mark.parametrize("family", LOADABLE + list(NEEDS_TORCHVISION))
def test_the_prompt_has_one_bos_token(family, tmp_path, images):
    captioner = captioner_for(family, tmp_path, batch_size=1)
    calls = spy_generate(captioner)
    captioner.describe(images[:1], PROMPT)
    token, count, first = START[family]
    token_id = captioner.processor.tokenizer.convert_tokens_to_ids(token)
    ids = calls[0][0][0].tolist()
    assert ids.count(token_id) == count, captioner.processor.tokenizer.decode(ids[:12])
    assert not first or ids[0] == token_id


def test_gemma3_batches_one_list_of_images_per_prompt(tmp_path, images):
    captioner = captioner_for("gemma3", tmp_path, batch_size=8)
    calls = spy_generate(captioner)
    assert len(captioner.describe(images, PROMPT)) == 3 and calls[0][0].shape[0] == 3


@pytest.mark.parametrize("family, asked", [("florence2", "Describe with a paragraph what is shown in the image."),
                                          ("paligemma", "caption en")])
def test_families_without_a_chat_template_get_their_documented_prompt(family, asked, tmp_path, images):
    captioner = captioner_for(family, tmp_path, batch_size=3)
    calls = spy_generate(captioner)
    answers = captioner.describe(images, PROMPT)
    assert asked in captioner.processor.tokenizer.decode(calls[0][0][0], skip_special_tokens=True)
    assert len(answers) == 3


def test_an_encoder_decoder_answer_is_its_whole_output(tmp_path, images):
    captioner = captioner_for("florence2", tmp_path, batch_size=3)
    calls = spy_generate(captioner)
    answers = captioner.describe(images, PROMPT)
    decoded = captioner.processor.batch_decode(calls[0][1], skip_special_tokens=True)
    assert [a.text for a in answers] == [d.strip() for d in decoded] and all(a.ok for a in answers)


def test_task_prompts_accept_their_own_tasks_only():
    florence, paligemma = FAMILIES["florence2"].task, FAMILIES["paligemma"].task
    assert florence.for_prompt("<CAPTION>") == "<CAPTION>" and florence.for_prompt(PROMPT) == "<MORE_DETAILED_CAPTION>"
    assert paligemma.for_prompt("caption de") == "caption de" and paligemma.for_prompt(PROMPT) == "caption en"
    assert TaskPrompt("x", "y").for_prompt(" y ") == "y"


@pytest.mark.skipif(torchvision_imports(), reason="torchvision imports here: these processors load")
@pytest.mark.parametrize("family, extra", NEEDS_TORCHVISION.items())
def test_a_family_that_needs_torchvision_names_its_extra_before_loading(family, extra, tmp_path, monkeypatch):
    import transformers

    folder = build_saved(family, tmp_path / family)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(UserError, match=rf"needs torchvision.*: pip install 'lorapipe\[{extra}\]'$"):
        load_captioner("transformers", folder, device="cpu")


def test_each_family_extra_declares_what_its_processor_needs():
    extras = tomllib.loads(Path(__file__).parents[1].joinpath("pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for model_type, family in FAMILIES.items():
        if family.extra:
            declared = {re.split(r"[<>=!~\[; ]", requirement)[0] for requirement in extras[family.extra]}
            assert set(required_modules(model_type)) <= declared, (family.extra, extras[family.extra])
    assert required_modules("qwen2_5_vl") == ("torchvision",) and required_modules("gemma3") == ()


def remote_code_model(folder: Path) -> str:
    """What a CogVLM2 repository's config.json looks like: a model type transformers does not know."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "cogvlm2", "architectures": ["CogVLMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_cogvlm.CogVLMConfig",
                     "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM"}}))
    return str(folder)


def test_remote_code_is_refused_naming_lorapipes_setting(tmp_path):
    with pytest.raises(UserError, match=r"set caption\.trust_remote_code: true if you trust it"):
        load_captioner("transformers", remote_code_model(tmp_path / "cogvlm2"), device="cpu")


def test_a_model_without_a_chat_template_is_refused_before_its_weights_load(tmp_path, tiny_models, monkeypatch):
    import shutil

    import transformers

    folder = tmp_path / "no-template"
    shutil.copytree(tiny_models.llava, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "chat_template.json").unlink(missing_ok=True)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained",
                        lambda *a, **k: pytest.fail("the weights were loaded"))
    with pytest.raises(UserError, match="has no chat template"):
        load_captioner("transformers", str(folder), device="cpu")


def test_the_caption_stage_does_not_retry_what_cannot_change(tmp_path, workspace, tiny_models, prefect_harness,
                                                             monkeypatch):
    """A model that needs its repository's code fails once with one line, not three times (three loads)."""
    import tasks.caption
    from lorapipe.config import CaptionConfig
    from lorapipe.manifest import ImageRecord, write_manifest
    from tasks.caption import caption_task
    from tasks.stage import call_stage

    path = workspace.root / "images" / "a.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    draw(scenes(1)[0]).resize((96, 128)).save(path)
    record = ImageRecord(id="a" * 64, source="a.png", fetched_at="2026-01-01T00:00:00Z", image_path="images/a.png",
                         crop=[0, 0, 96, 128], bucket="96x128")
    manifest = write_manifest(tmp_path / "crop.jsonl", [record])
    opened = []
    open_captioner = tasks.caption.open_captioner
    monkeypatch.setattr(tasks.caption, "open_captioner", lambda config: opened.append(1) or open_captioner(config))
    config = CaptionConfig(model=remote_code_model(tmp_path / "cogvlm2"), device="cpu")
    with pytest.raises(UserError, match="caption.trust_remote_code"):
        call_stage(caption_task, workspace, manifest=str(manifest), workspace=str(workspace.root), config=config,
                   name="Jane Doe", tokenizer_from=str(tiny_models.sdxl))
    assert len(opened) == 1
