"""DVC stage `featurizer`: see `genmodels featurizer --help`.

    python pipelines/featurizer.py    # what `dvc repro featurizer` runs; same as `genmodels featurizer`
"""

import sys

from genmodels.cli import main

if __name__ == "__main__":
    sys.exit(main(["featurizer", *sys.argv[1:]]))
