"""DVC stage `train@gan` / `train@vae`: Ray Train DDP training -> models/<family>/, metrics/train_<family>.json.

    python pipelines/train.py gan          # what `dvc repro train@gan` runs; same as `genmodels train gan`

With RAY_ADDRESS set the same command trains on that Ray cluster; with MLFLOW_TRACKING_URI set
it logs to that MLflow server.
"""

import sys

from genmodels.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
