"""SDXL LoRA training, readable top to bottom like diffusers' training examples. No prefect imports.

    from trainer import Example, train_lora
    result = train_lora(examples, TrainConfig(), run_dir, cache_dir)
"""

from trainer.data import Example
from trainer.loop import TrainResult, train_lora

__all__ = ["Example", "TrainResult", "train_lora"]
