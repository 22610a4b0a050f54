"""Same as the ``ps-local`` command: a whole parameter-server job on this machine.

    python scripts/run_local.py --servers 2 --workers 2 --steps 300
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a clone without installing
from common.launch.local import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
