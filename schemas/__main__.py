"""``python -m schemas > docs/TABLES.md`` regenerates the table reference (and the golden file)."""
from . import render

HEADER = """# zeropass tables

Generated from `schemas/__init__.py` by `python -m schemas > docs/TABLES.md`; do not edit by hand.
`tests/test_schemas.py` fails when this file and the declarations disagree, so every schema
change shows up here as a reviewed diff.

"""

if __name__ == "__main__":
    print(HEADER + render(), end="")
