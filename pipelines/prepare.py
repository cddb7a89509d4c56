"""DVC stage `prepare`: image source -> data/shards/{train,val}-NNNNNN.tar + manifest.json.

    python pipelines/prepare.py            # what `dvc repro prepare` runs; same as `genmodels prepare`
"""

import sys

from genmodels.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
