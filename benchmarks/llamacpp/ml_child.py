"""``moe-local bench`` for a run under a memory cap, without its second, all-resident load.

With an expert budget, ``moe-local bench`` loads the model a second time with every expert
resident to measure the floor; inside a memory cgroup that second load is what the cap kills, not
the run being measured. This child makes the same calls as the command (``prepare_load`` from the
same flags, then ``moe_local.bench.bench``) with ``measure_resident=False``, so the floor is
estimated from bandwidths instead, and writes the same JSON.

Usage: ``MOE_LOCAL_THREADS=N python ml_child.py MODEL --prompt-tokens P --new-tokens N --json F
[--cpu-memory SIZE | --expert-memory SIZE] [--dtype D]``. A refusal (``MoeLocalError``) exits
``REFUSED`` (3) with one line; 2 stays argparse's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REFUSED = 3  # exit status when moe-local refuses the budget or the model


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, ``REFUSED`` when moe-local refuses the budget or model."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", required=True)
    p.add_argument("--cpu-memory")
    p.add_argument("--expert-memory")
    p.add_argument("--dtype", default="auto")
    a = p.parse_args(argv)

    from moe_local import env
    from moe_local.errors import MoeLocalError

    try:
        from moe_local.cli.load_flags import LoadFlags, check_flags, prepare_load

        flags = LoadFlags(dtype=a.dtype, cpu_memory=a.cpu_memory, expert_memory=a.expert_memory)
        check_flags(flags)  # as the CLI does: a limit below the runtime is refused before torch loads
        threads = env.threads()
        if threads:
            import torch

            torch.set_num_threads(threads)
        from moe_local.bench import bench

        target = prepare_load(flags, a.model, context=a.prompt_tokens + a.new_tokens + 1)
        result = bench(
            target.path,
            target.options,
            prompt_tokens=a.prompt_tokens,
            new_tokens=a.new_tokens,
            measure_resident=False,
        )
    except MoeLocalError as e:
        print(f"error: {e}", file=sys.stderr)
        return REFUSED
    Path(a.json).write_text(json.dumps(dataclasses.asdict(result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
