"""``python -m imagegen.cli``: the same as the ``imagegen`` command."""

from imagegen.cli import main

if __name__ == "__main__":
    main()
