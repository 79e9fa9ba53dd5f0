"""``python -m moe_local.server MODEL [--port N ...]``: run the server without the CLI."""

from __future__ import annotations

import argparse
import sys

from moe_local.errors import MoeLocalError


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and serve until interrupted.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    from moe_local.config import LoadOptions, parse_size
    from moe_local.server import serve

    parser = argparse.ArgumentParser(prog="python -m moe_local.server", description=__doc__)
    parser.add_argument("model", help="checkpoint folder or a hub id in the local Hugging Face cache")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    parser.add_argument("--max-queue", type=int, default=16, help="waiting requests before 429")
    parser.add_argument("--model-name", default=None, help="name clients use (default: folder name)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--expert-memory", default=None, help="RAM for experts, e.g. 2GiB")
    parser.add_argument("--context", type=int, default=None, help="context length to allow")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        options = LoadOptions(
            dtype=args.dtype, expert_memory=parse_size(args.expert_memory), context=args.context
        )
        serve(
            args.model,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            max_queue=args.max_queue,
            load_options=options,
            model_name=args.model_name,
            log_level=args.log_level,
        )
    except MoeLocalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
