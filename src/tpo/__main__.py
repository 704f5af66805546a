"""``python -m tpo``: the same as the ``tpo`` command."""

from .cli import main

main()
