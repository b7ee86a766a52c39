"""Entry point of ``python -m shards`` and of the ``shards`` console script."""

from __future__ import annotations

import sys

from shards import cli


def main(argv: list[str] | None = None) -> int:
    cli.install_sigterm_handler()
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
