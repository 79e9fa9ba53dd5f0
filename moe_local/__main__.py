"""``python -m moe_local``: the same CLI as ``moe-local``."""

from moe_local.cli import main

if __name__ == "__main__":
    main()
