"""``python -m moe_local``: the same program as ``moe-local``."""

from moe_local.cli.interrupt import entry

if __name__ == "__main__":
    entry()
