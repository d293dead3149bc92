"""`python -m kvchat` runs the same entry point as the `kvchat` script."""

from kvchat.cli import main

if __name__ == "__main__":
    main()
