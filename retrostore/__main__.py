"""``python -m retrostore``: the command-line interface."""

from retrostore.cli import main

if __name__ == "__main__":
    main()
