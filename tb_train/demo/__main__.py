"""`python -m tb_train.demo` (e.g. under torchrun): the demo job."""
import sys

from tb_train.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("demo"))
