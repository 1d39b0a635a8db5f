"""``python -m imagegen``: the same as the ``imagegen`` command (and ``python -m imagegen.cli``).

Run only by ``-m``: importing the package never imports this module, so it costs
``import imagegen`` nothing.
"""

from imagegen.cli import main

if __name__ == "__main__":
    main()
