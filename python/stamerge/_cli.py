"""The `stamerge` command the wheel installs: the Rust CLI (src/main.rs), run in this process."""

from __future__ import annotations

import sys


def main() -> int:
    from . import _native

    # The program name as typed, then the arguments: the same command line as the binary's.
    return _native.cli(["stamerge", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
