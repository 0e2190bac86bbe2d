"""``python -m mt`` runs the ``mt`` command."""

from mt.cli import main

if __name__ == "__main__":
    main()
