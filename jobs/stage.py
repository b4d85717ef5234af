"""`ray job submit` entrypoint: run one stage of a pipeline YAML (earlier stages must have run).

ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/stage.py jobs/pipeline.yaml --stage single
"""

import sys

from tagray.cli import main

if __name__ == "__main__":
    sys.exit(main(["stage", *sys.argv[1:]]))
