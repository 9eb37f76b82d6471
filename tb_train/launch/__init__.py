"""Submitting jobs to Slurm (or this machine) through submitit: `tb-submit` (see docs/slurm.md).

cluster.py   ClusterConfig: resources and scheduling policy, presets in configs/cluster/
submit.py    the tb-submit command: plan, dry run, submission, --then chains
task.py      JobTask: what every task runs (rank setup, the job's main, requeue after a save)
records.py   the run folder's submit/ records (jobs, attempts, code revision, logs)
status.py    tb-submit status, and waiting for a job
"""
