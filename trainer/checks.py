"""Refusals before any training, and the facts of the model as trained (for the files' metadata).

Each refusal is a UserError: one line naming the setting or the model and the reason.
"""

from __future__ import annotations

from lorapipe.errors import UserError

TRAINED_PREDICTION_TYPES = ("epsilon", "v_prediction")
# kohya's names for the metadata: `ss_base_model_version` and `modelspec.prediction_type`.
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"
MODELSPEC_PREDICTION_TYPE = {"epsilon": "epsilon", "v_prediction": "v"}


def zero_terminal_snr(noise_scheduler) -> bool:
    """The last timestep is pure noise (SNR 0): `rescale_betas_zero_snr` schedules (Lin et al. 2023)."""
    return float(noise_scheduler.alphas_cumprod[-1]) == 0.0


def check_noise_scheduler(noise_scheduler, base_model: str, min_snr_gamma: float | None) -> None:
    """Refuse what would train the wrong target or a NaN loss."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in TRAINED_PREDICTION_TYPES:
        raise UserError(f"{base_model}: its scheduler predicts {prediction_type!r}; lorapipe trains epsilon and "
                        "v_prediction models only (as kohya's SDXL scripts do)")
    if min_snr_gamma and prediction_type == "epsilon" and zero_terminal_snr(noise_scheduler):
        raise UserError(f"train.min_snr_gamma {min_snr_gamma}: {base_model} has a zero-terminal-SNR schedule, "
                        "where the epsilon weight min(SNR, gamma)/SNR divides by zero at the last timestep; "
                        "leave min_snr_gamma empty for this model")


def base_model_version(unet, text_encoders: list) -> str:
    """kohya's `ss_base_model_version`, read from the model: SDXL's UNet (size and crop conditioning,
    `addition_embed_type: text_time`) with two text encoders."""
    if unet.config.addition_embed_type != "text_time" or len([e for e in text_encoders if e is not None]) != 2:
        raise UserError("base_model: not an SDXL model (lorapipe trains SDXL's UNet with its two text encoders)")
    return SDXL_BASE_MODEL_VERSION


def model_facts(noise_scheduler, unet, text_encoders: list, bf16: bool) -> dict:
    """What the LoRA was trained against and how, for `ss_*` and `modelspec.*` metadata."""
    return {
        "base_model_version": base_model_version(unet, text_encoders),
        "prediction_type": noise_scheduler.config.prediction_type,
        "zero_terminal_snr": zero_terminal_snr(noise_scheduler),
        "mixed_precision": "bf16" if bf16 else "no",  # kohya's --mixed_precision values: no, fp16, bf16
    }
