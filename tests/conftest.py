"""Session-wide test environment: CPU DeepSpeed, one shared torch-extensions cache."""
from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
