"""Workspace layout, one per dataset name: raw/, images/, cache/, manifests/, runs/, loras/.

One writer per stage: a stage run takes the workspace's lock for that stage (`Workspace.lock`), so two
runs on one workspace take turns stage by stage (the second then finds the first's cached result) instead
of writing the same files at once. The lock dies with its holder, and whoever takes it next removes the
temp files a killed holder left (`Workspace.remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lorapipe.errors import UserError
from lorapipe.fsutil import file_lock, remove_temps

LOCKS = ".locks"
# File names are made from the slug (loras/versions/<slug>-<key>.diffusers.safetensors): well under 255 bytes.
MAX_SLUG_CHARS = 120
# (folder, glob) of the temp files each stage writes outside manifests/ (fsutil.atomic_path names them).
STAGE_TEMPS = {"collect": [("raw", ".*")], "crop": [("images", ".*.tmp.png")], "review": [("images", ".*.txt.*.tmp")]}


def ascii_name(text: str) -> str:
    """`text` in ASCII letters, transliterated by anyascii: "Zoë Laurent" -> "Zoe Laurent", "Ольга" -> "Ol'ga",
    "王小明" -> "Wang Xiao Ming" (a syllable of a script without case, such as Chinese or Hangul, is a word)."""
    from anyascii import anyascii

    out = []
    for char in text:
        latin = anyascii(char)
        caseless = not char.isascii() and char.lower() == char.upper()
        out.append(f" {latin} " if caseless and latin[:1].isupper() and len(latin) > 1 else latin)
    return "".join(out)


def slugify(name: str) -> str:
    """The name as lowercase ASCII words joined by "-", for folders, files and Prefect artifact keys:
    "Zoë Laurent" -> "zoe-laurent", "王小明" -> "wang-xiao-ming", "Ольга Петрова" -> "olga-petrova".

    A name with nothing to transliterate gets "person-" and a hash of the name: never a name shared by
    different people.
    """
    ascii_text = ascii_name(name).lower().replace("'", "").replace("`", "")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")[:MAX_SLUG_CHARS].strip("-")
    return slug or f"person-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


# The stem of a training image's name, from its source's file name: letters and digits of any script kept.
IMAGE_STEM_CHARS = 60


def training_image_name(source: str, image_id: str, bucket: str | None = None) -> str:
    """images/ file name of a training image: its source's name, a short id against collisions, and the
    bucket when it was re-cropped: `IMG_0042-3f9a1c2e.png`, `IMG_0042-3f9a1c2e-1024x1024.png`.

    A kohya user opening images/ in a caption tool sees which photo is which. `source` is a path, a URL or
    `archive.zip!/member.jpg`; anything but letters, digits, "_", "-" and "." becomes "-".
    """
    from urllib.parse import unquote, urlsplit

    name = source.rsplit("!/", 1)[-1]
    if "://" in name:
        name = unquote(urlsplit(name).path)
    stem = unicodedata.normalize("NFC", name.rsplit("/", 1)[-1]).rsplit(".", 1)[0]
    stem = re.sub(r"[^\w.-]+", "-", stem).strip("-.")[:IMAGE_STEM_CHARS].strip("-.") or "image"
    return f"{stem}-{image_id[:8]}{f'-{bucket}' if bucket else ''}.png"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @staticmethod
    def at_path(root: str | Path) -> Path:
        """The absolute path of the workspace `root` names (nothing is created)."""
        return Path(root).expanduser().resolve()

    @classmethod
    def at(cls, root: str | Path) -> "Workspace":
        """The workspace at `root`, its folders created. Raises UserError if a file is in the way."""
        ws = cls(cls.at_path(root))
        for folder in (ws.root, ws.raw, ws.images, ws.cache, ws.manifests, ws.runs, ws.loras):
            if folder.exists() and not folder.is_dir():
                raise UserError(f"{folder}: is a file; a workspace needs a folder here (choose another workspace)")
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UserError(f"{folder}: cannot create the workspace folder ({err.strerror or err})") from None
        return ws

    @contextlib.contextmanager
    def lock(self, stage: str) -> Iterator[None]:
        """This workspace's lock for `stage`: waits while another run holds it (see the module's docstring)."""
        with file_lock(self.root / LOCKS / f"{stage}.lock", f"the {stage} stage of {self.root}"):
            yield

    def remove_stale_temps(self, stage: str) -> None:
        """Remove the temp files a killed run of `stage` left; call it holding `lock(stage)`.

        Only temp names this stage writes: all of raw/ (collect is its only writer), crops (`.x.png.….tmp.png`)
        and caption sidecars (`.x.txt.….tmp`) in images/, the stage's own manifests. A training run folder
        has its own lock and clean-up (tasks/train.py).
        """
        for folder, pattern in STAGE_TEMPS.get(stage, []):
            remove_temps(self.root / folder, pattern)
        remove_temps(self.manifests, f".{stage}.*")

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def loras(self) -> Path:
        return self.root / "loras"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    def stage_manifest(self, stage: str, key: str) -> Path:
        """Content-addressed manifest for one stage run; `<stage>.jsonl` beside it is the latest copy."""
        return self.manifests / f"{stage}.{key[:16]}.jsonl"

    def latest_manifest(self, stage: str) -> Path:
        return self.manifests / f"{stage}.jsonl"
