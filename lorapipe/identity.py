"""Does a picture look like the person? dlib's face detector, 5-point aligner and ResNet face descriptor.

All three run offline on a CPU and install from PyPI (`pip install 'lorapipe[evidence]'`: `dlib-bin`'s
wheels, and `face-recognition-models`' `.dat` files in dlib's own format, no pickle). A face becomes a
128-d descriptor; two photos of one person lie closer than 0.6 (Euclidean), dlib's documented
same-person threshold for this model (99.38% on LFW). Measured with this module: scikit-image's
astronaut photo vs its mirror image 0.20, matplotlib's Grace Hopper vs her mirror 0.17, the two women
against each other 0.68. Timing on one CPU core: detection ~0.3 s at 512², descriptor ~0.4 s.

The HOG detector also fires on face-like texture (a patch of the astronaut's suit): the largest box is
taken. A face smaller than `MIN_FACE_SIDE` pixels is reported as too small, never as a distance: the
descriptor is computed from a 150 px chip and is not reliable below that scale.
"""

from __future__ import annotations

import importlib.util
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from lorapipe.errors import UserError

SAME_PERSON = 0.6  # dlib's threshold for dlib_face_recognition_resnet_model_v1
MIN_FACE_SIDE = 64  # px in the image as given; smaller faces are "too small", not a distance
DETECT_MAX_SIDE = 640  # detection runs on a copy no larger than this (speed); the descriptor on the original
INSTALL_HINT = "pip install 'lorapipe[evidence]'"
NO_FACE = "no face found"


class IdentityUnavailable(UserError):
    """dlib or its models are not installed."""


def _models_folder() -> Path:
    """face_recognition_models' folder of .dat files, found without importing it (its __init__ imports
    pkg_resources, which recent setuptools no longer ship)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise IdentityUnavailable(f"face identity needs the face-recognition-models package: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


@dataclass
class Face:
    """One image's face: a descriptor, or why there is none (`reason`)."""

    descriptor: list[float] | None
    box: tuple[int, int, int, int] | None = None  # left, top, right, bottom in the image's pixels
    reason: str | None = None

    @property
    def found(self) -> bool:
        return self.descriptor is not None


class FaceEmbedder:
    """dlib's HOG face detector + 5-point shape predictor + ResNet descriptor, loaded once."""

    def __init__(self):
        try:
            import dlib
        except ImportError:
            raise IdentityUnavailable(f"face identity needs dlib: {INSTALL_HINT}") from None
        folder = _models_folder()
        aligner = folder / "shape_predictor_5_face_landmarks.dat"
        resnet = folder / "dlib_face_recognition_resnet_model_v1.dat"
        for path in (aligner, resnet):
            if not path.exists():
                raise IdentityUnavailable(f"{path} is missing: reinstall face-recognition-models ({INSTALL_HINT})")
        self.detector = dlib.get_frontal_face_detector()
        self.aligner = dlib.shape_predictor(str(aligner))
        self.resnet = dlib.face_recognition_model_v1(str(resnet))
        self.dlib = dlib

    def face(self, image: Image.Image) -> Face:
        """The largest face's descriptor (128 floats), or a Face with the reason there is none."""
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        scale = min(1.0, DETECT_MAX_SIDE / max(rgb.shape[:2]))
        small = rgb
        if scale < 1.0:
            size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
            small = np.ascontiguousarray(np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR)))
        boxes = list(self.detector(small, 0)) or list(self.detector(small, 1))  # upsampled: faces of 40-80 px
        if not boxes:
            return Face(None, reason=NO_FACE)
        best = max(boxes, key=lambda b: b.width() * b.height())
        left, top, right, bottom = (round(v / scale) for v in (best.left(), best.top(), best.right(), best.bottom()))
        side = min(right - left, bottom - top)
        if side < MIN_FACE_SIDE:
            return Face(None, (left, top, right, bottom), f"face too small: {side} px < {MIN_FACE_SIDE} px")
        shape = self.aligner(rgb, self.dlib.rectangle(left, top, right, bottom))
        descriptor = self.resnet.compute_face_descriptor(rgb, shape, 0)
        return Face([float(v) for v in descriptor], (left, top, right, bottom))


@lru_cache(maxsize=1)
def face_embedder() -> FaceEmbedder:
    """The one embedder of this process (loading the models takes ~0.5 s)."""
    return FaceEmbedder()


def identity_available() -> str | None:
    """None when dlib and its models are installed; else the one-line reason they are not."""
    try:
        face_embedder()
    except IdentityUnavailable as err:
        return str(err)
    return None


def distance(a, b) -> float:
    """Euclidean distance between two descriptors (dlib's metric; < 0.6: the same person)."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


@dataclass
class IdentityStats:
    """How close a set of samples' faces are to the person's photos.

    `distances`: per sample with a face, the mean distance to the reference descriptors (0-~1.2;
    lower is closer; < 0.6 reads as the same person). `mean`/`spread` (standard deviation) are over
    those; None when no sample had a face. `missing` counts samples without a usable face, by reason.
    """

    samples: int
    references: int
    distances: list[float] = field(default_factory=list)
    missing: dict[str, int] = field(default_factory=dict)
    note: str | None = None  # why nothing was measured, when nothing was

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.distances) if self.distances else None

    @property
    def spread(self) -> float | None:
        return statistics.pstdev(self.distances) if self.distances else None

    @property
    def no_face_share(self) -> float:
        return (self.samples - len(self.distances)) / self.samples if self.samples else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "mean": self.mean, "spread": self.spread, "no_face_share": self.no_face_share}

    def faces_line(self) -> str:
        """How many samples had a usable face, and why the others had none."""
        missing = sum(self.missing.values())
        if not missing:
            return f"a face in all {self.samples} samples"
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.missing.items()))
        return f"no usable face in {missing} of {self.samples} samples ({reasons})"

    def describe(self) -> str:
        """One line for a table: the numbers, or why there are none."""
        if self.note:
            return f"not measured: {self.note}" + (f"; {self.faces_line()}" if self.missing else "")
        if not self.distances:
            return self.faces_line()
        return f"{self.mean:.3f} ± {self.spread:.3f} ({self.faces_line()}; < {SAME_PERSON} reads as the same person)"


def identity_stats(faces: list[Face], references: list[list[float]]) -> IdentityStats:
    """Each sample's face against the person's photos (`references`: their descriptors). Samples without a
    usable face are counted by reason; without references there are no distances and `note` says so."""
    stats = IdentityStats(samples=len(faces), references=len(references))
    if not references:
        stats.note = "no face found in the person's photos"
    missing: Counter = Counter()
    for face in faces:
        if not face.found:
            missing[(face.reason or NO_FACE).split(":")[0]] += 1
        elif references:
            stats.distances.append(statistics.fmean(distance(face.descriptor, r) for r in references))
    stats.missing = dict(missing)
    return stats


def unavailable_stats(samples: int, reason: str) -> IdentityStats:
    return IdentityStats(samples=samples, references=0, note=reason)
