"""``python -m fewstep_lab``: the same as the ``fewstep`` command (see cli.py)."""

from fewstep_lab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
