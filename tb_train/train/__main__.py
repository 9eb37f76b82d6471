"""`python -m tb_train.train` (e.g. under torchrun): the train job."""
import sys

from tb_train.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("train"))
