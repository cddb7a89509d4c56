"""genmodels: distributed training pipeline for image generative models (GANs, VAEs).

DVC stages prepare WebDataset shards, Ray Train runs DDP training, Ray Tune searches, MLflow
tracks. The library never reads argv; `pipelines/*.py` and `genmodels.cli` are the entry points.
"""

__version__ = "0.1.0"
