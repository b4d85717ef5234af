"""`ray job submit` entrypoint: search tag length and learning rate per task (Ray Tune + Optuna + ASHA).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/tune.py jobs/tune.yaml

Submitting the same command again after a failure resumes the search (finished trials are kept).
"""

import sys

from tagray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
