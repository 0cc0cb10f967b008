import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLURM_SCRIPTS = os.path.join(REPO, "..", "shared", "slurm")


def slurmctld_up() -> bool:
    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real 2-node SLURM cluster of ../shared/slurm; stopped afterwards unless it was already up."""
    was_up = slurmctld_up()
    start = subprocess.run(
        ["bash", os.path.join(SLURM_SCRIPTS, "start-slurm.sh")], capture_output=True, text=True, timeout=600
    )
    assert start.returncode == 0, f"start-slurm.sh failed:\n{start.stdout[-3000:]}\n{start.stderr[-3000:]}"
    yield
    if not was_up:
        subprocess.run(["bash", os.path.join(SLURM_SCRIPTS, "stop-slurm.sh")], capture_output=True, timeout=300)
