"""Stage rooms: load inputs, call the pure library (metrics/, families/), write outputs and log.

`featurizer` and `evaluate` here; `train` is `genmodels.train.run`. The `genmodels` CLI calls
these functions, and the DVC stages (`pipelines/*.py`) call the CLI.
"""
