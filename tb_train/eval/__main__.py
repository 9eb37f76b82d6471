"""`python -m tb_train.eval` (e.g. under torchrun): the eval job."""
import sys

from tb_train.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("eval"))
