"""The training loop's own counters as a stateful part (saved in every checkpoint under "train")."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    """step: optimizer steps done (skipped non-finite steps included). nonfinite_total: steps skipped
    because a loss or an input was not finite, over the whole run. nonfinite_in_a_row: the current streak
    of them, which stops the run when it exceeds engine.nonfinite_patience."""
    step: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0

    def record(self, skipped: bool) -> None:
        """Count one finished optimizer step; `skipped`: its update was dropped as non-finite."""
        self.step += 1
        if skipped:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
        else:
            self.nonfinite_in_a_row = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])
        self.nonfinite_total = int(sd["nonfinite_total"])
        self.nonfinite_in_a_row = int(sd["nonfinite_in_a_row"])


__all__ = ["TrainState"]
