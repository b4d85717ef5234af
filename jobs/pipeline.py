"""`ray job submit` entrypoint: run (or resume) every stage of a pipeline YAML on the cluster.

ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/pipeline.py jobs/pipeline.yaml
"""

import sys

from tagray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
