"""DVC stage `register`: see `genmodels register --help`.

    python pipelines/register.py gan   # what `dvc repro register@gan` runs; same as `genmodels register gan`
"""

import sys

from genmodels.cli import main

if __name__ == "__main__":
    sys.exit(main(["register", *sys.argv[1:]]))
