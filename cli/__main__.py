"""``python -m cli``: the ``zeropass`` command without installing its script."""
from cli import main

main()
