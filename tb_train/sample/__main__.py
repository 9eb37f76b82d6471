"""`python -m tb_train.sample` (e.g. under torchrun): the sample job."""
import sys

from tb_train.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("sample"))
