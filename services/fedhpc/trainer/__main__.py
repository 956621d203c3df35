"""``python -m fedhpc.trainer``: the same as the ``fedhpc-trainer`` command."""

from __future__ import annotations

from fedhpc.trainer.cli import main

main(prog_name="fedhpc-trainer")
