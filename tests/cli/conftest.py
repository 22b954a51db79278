import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def cli(tmp_path):
    """Run ``prunescope ...`` in a subprocess (as a user would); returns CompletedProcess."""

    def run(*args, workspace=None, timeout=600):
        env = dict(os.environ, HF_HUB_OFFLINE="1", PRUNESCOPE_WORKSPACE=str(workspace or tmp_path / "ws"))
        return subprocess.run([sys.executable, "-m", "core.cli", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=timeout)

    return run
