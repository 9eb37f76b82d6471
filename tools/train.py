"""Script form of `tb-train` for launchers that need a file path: `deepspeed --num_gpus N tools/train.py
--config FILE [overrides]` (the launcher's --local_rank argument is accepted and ignored; the rank comes
from the environment)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tb_train.train.job import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
