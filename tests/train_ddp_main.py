"""Run by tests/test_train.py under torchrun: ``fastad.cli train`` once per argument list
(JSON list of argv lists in argv[1]), all in one process group, so that the launch cost is
paid once for the three methods."""
import json
import sys

from fastad import cli

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        rc = cli.main(argv)
        if rc:
            raise SystemExit(rc)
