"""DVC stage `tune@gan` / `tune@vae` (tune/dvc.yaml, not part of plain `dvc repro`): a Ray Tune
sweep -> tune/<family>_best.yaml.

    python pipelines/tune.py gan           # what `dvc repro tune/dvc.yaml` runs; same as `genmodels tune gan --resume auto`

`--resume auto` continues an interrupted sweep of the same name, so rerunning the stage after a
crash or Ctrl-C picks up where it stopped.
"""

import sys

from genmodels.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
