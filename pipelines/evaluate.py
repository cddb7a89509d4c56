"""DVC stage `evaluate`: see `genmodels evaluate --help`.

    python pipelines/evaluate.py gan   # what `dvc repro evaluate` runs; same as `genmodels evaluate`
"""

import sys

from genmodels.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
