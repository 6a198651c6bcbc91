"""Identity measured on real photos, offline: dlib's detector, aligner and ResNet descriptor; the probe's rule."""

from __future__ import annotations

import sys

import pytest
from PIL import Image, ImageOps

from lorapipe.config import ProbeConfig
from lorapipe.identity import (SAME_PERSON, FaceEmbedder, IdentityUnavailable, distance, face_embedder,
                               identity_stats, unavailable_stats)
from tasks.probe import decide


@pytest.fixture(scope="module")
def portraits():
    import matplotlib.cbook
    from skimage import data

    astronaut = Image.fromarray(data.astronaut())  # Eileen Collins, 512x512
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = Image.open(f).convert("RGB")
    return {"astronaut": astronaut, "hopper": hopper}


def test_same_person_is_closer_than_the_threshold_and_different_people_are_farther(portraits):
    embedder = face_embedder()
    faces = {name: embedder.face(img) for name, img in portraits.items()}
    mirrored = {name: embedder.face(ImageOps.mirror(img)) for name, img in portraits.items()}
    assert all(f.found and len(f.descriptor) == 128 for f in [*faces.values(), *mirrored.values()])
    for name in portraits:
        assert distance(faces[name].descriptor, mirrored[name].descriptor) < 0.3 < SAME_PERSON
    assert distance(faces["astronaut"].descriptor, faces["hopper"].descriptor) > SAME_PERSON
    # The largest box is the face (HOG also fires on a patch of the astronaut's suit): it sits in the upper half.
    left, top, right, bottom = faces["astronaut"].box
    assert bottom < 256 and right - left > 64


def test_a_small_or_absent_face_is_reported_as_such_not_as_a_distance(portraits):
    embedder = face_embedder()
    small = embedder.face(portraits["astronaut"].resize((200, 200)))  # her face is ~35 px here
    absent = embedder.face(Image.new("RGB", (256, 256), (120, 130, 140)))
    assert not small.found and small.reason.startswith("face too small:")
    assert not absent.found and absent.reason == "no face found"

    reference = embedder.face(portraits["astronaut"]).descriptor
    stats = identity_stats([small, absent, embedder.face(ImageOps.mirror(portraits["astronaut"]))], [reference])
    assert len(stats.distances) == 1 and stats.distances[0] < 0.3  # only the real face is a distance
    assert stats.missing == {"face too small": 1, "no face found": 1}
    assert stats.no_face_share == pytest.approx(2 / 3)
    none = identity_stats([absent, absent], [reference])
    assert none.mean is None and none.describe() == "no usable face in 2 of 2 samples (2 no face found)"
    no_photos = identity_stats([absent], [])
    assert no_photos.describe() == ("not measured: no face found in the person's photos; no usable face in 1 of 1 "
                                    "samples (1 no face found)")


def test_without_dlib_the_message_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib raises ImportError
    with pytest.raises(IdentityUnavailable, match=r"^face identity needs dlib: pip install 'lorapipe\[evidence\]'$"):
        FaceEmbedder()


def test_the_probe_trains_text_encoders_unless_the_base_model_draws_the_person():
    probe = ProbeConfig()
    known = identity_stats([], [])
    known.note, known.samples, known.distances = None, 4, [0.45, 0.5, 0.52, 0.48]
    assert decide(known, "a photo of Jane Doe", probe)[0] is False
    stranger = identity_stats([], [])
    stranger.note, stranger.samples, stranger.distances = None, 4, [0.8, 0.75, 0.9, 0.7]
    assert decide(stranger, "a photo of Jane Doe", probe)[0] is True
    faceless = identity_stats([], [])
    faceless.note, faceless.samples = None, 4
    use_te, reason = decide(faceless, "a photo of Jane Doe", probe)
    assert use_te and "no usable face in 4 of 4 renders of 'a photo of Jane Doe'" in reason
    use_te, reason = decide(unavailable_stats(4, "face identity needs dlib"), "a photo of Jane Doe", probe)
    assert use_te and reason.startswith("could not measure (face identity needs dlib)")
