"""Stage 3: train experts (one SLURM array task = one expert) into the store."""
from hpcsoup.train.loop import TrainResult, evaluate, fit, predict

__all__ = ["TrainResult", "evaluate", "fit", "predict"]
