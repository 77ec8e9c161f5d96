"""``python -m blockcap``: the fire CLI."""

from blockcap.cli import main

if __name__ == "__main__":
    main()
