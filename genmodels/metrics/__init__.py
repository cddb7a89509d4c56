"""Sample-quality and likelihood metrics as plain functions of feature tensors or of a VAE.

``fid``: Frechet distance and mergeable feature statistics (one ``FeatureStats`` per DDP rank,
summed with ``all_reduce_``); ``kid``: kernel inception distance; ``prdc``: precision, recall,
density and coverage; ``likelihood``: ELBO and IWAE bounds in nats per image. The metrics take
features, not images (``features`` turns images into features), so each is testable on random
tensors.
"""
