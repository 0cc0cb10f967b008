"""Launchers for training runs: SLURM (``python -m launch.slurm``)."""
