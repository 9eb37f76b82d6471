"""`python -m tb_train JOB [options]`: any job of `tb_train.cli.JOBS` (e.g. under torchrun)."""
import sys

from tb_train.cli import JOBS, run_job

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python -m tb_train JOB [options]\njobs:\n" +
              "\n".join(f"  {name:<11} {job.summary}" for name, job in JOBS.items()))
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    sys.exit(run_job(sys.argv[1], sys.argv[2:]))
