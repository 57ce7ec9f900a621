"""A loss function for the distributed failure tests (``train.loss = "tests/train/dist_faults.py:loss"``).

``KILN_TEST_FAULT`` = ``kill`` | ``hang`` | ``kill-once``: rank 1 kills itself (SIGKILL) or hangs at its
``KILN_TEST_FAULT_AT``-th loss call; ``kill-once`` only in the first attempt of an elastic job.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.nn.functional as F

_calls = [0]


def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    _calls[0] += 1
    mode = os.environ.get("KILN_TEST_FAULT", "")
    at = int(os.environ.get("KILN_TEST_FAULT_AT", "3"))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if os.environ.get("RANK") == "1" and _calls[0] == at and (mode != "kill-once" or first_attempt):
        if mode == "hang":
            time.sleep(3600)
        elif mode in ("kill", "kill-once"):
            os.kill(os.getpid(), signal.SIGKILL)
    return F.cross_entropy(output, target)
