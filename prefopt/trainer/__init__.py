"""A thin, model-agnostic preference trainer on prefopt's fused head (see docs/trainer.md).

    from prefopt.trainer import TrainConfig, Trainer, train
    summary = train(TrainConfig(max_steps=20, output_dir="runs/demo"))
"""
from prefopt.trainer.config import PrefoptInputError, TrainConfig
from prefopt.trainer.loop import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train", "PrefoptInputError"]
