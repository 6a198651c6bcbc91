"""Model weights lorapipe agrees to load: safetensors only, never pickle.

A pickle checkpoint (.ckpt, .pt, .pth, .bin, .pkl) runs code when it is loaded; torch's `weights_only`
default stops most of that, but lorapipe does not rely on it: wherever a model path is accepted (the base
model, its config folder, the VAE, the captioner, the model evaluation renders with), a pickle file is
refused by its name, and a local model folder whose weights exist only as pickle files is refused naming
one. Folders are loaded with `use_safetensors=True`, so a stray .bin beside the .safetensors is never read.
"""

from __future__ import annotations

from pathlib import Path

from lorapipe.errors import UserError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
REFUSED = "only .safetensors checkpoints are loaded (pickle files can run code)"


def pickle_name_problem(value: str | None) -> str | None:
    """The refusal for a model path that names a pickle file, or None (hub ids and folders pass here)."""
    if value and Path(value).suffix.lower() in PICKLE_SUFFIXES:
        return f"{value}: {REFUSED}"
    return None


def check_model_source(value: str | None) -> None:
    """Refuse a pickle file by name, and a local folder whose weights are pickle files only.

    A folder is looked at to one level of components (unet/, vae/, text_encoder/...). Hub ids are left to
    the loaders' `use_safetensors=True`.

    Raises:
        UserError: `<path>: only .safetensors checkpoints are loaded (pickle files can run code)`.
    """
    if problem := pickle_name_problem(value):
        raise UserError(problem)
    if not value:
        return
    root = Path(value).expanduser()
    if not root.is_dir():
        return
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        files = [p for p in folder.iterdir() if p.is_file()]
        pickles = sorted(p for p in files if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles and not any(p.suffix == ".safetensors" for p in files):
            raise UserError(f"{pickles[0]}: {REFUSED}")
