"""``python -m backend --checkpoint PATH --port PORT`` (also ``efficientsam-backend``).

Every setting comes from the environment (serving/settings.py, listed by ``--help``); the
flags below win.
"""

from __future__ import annotations

import argparse
import logging
import sys

from serving.settings import Settings, add_options, env_help

# Settings with a flag (``--model-dir`` for model_dir, ...); the others come from env only.
OPTIONS = (
    "checkpoint",
    "host",
    "port",
    "device",
    "precision",
    "model_dir",
    "redis_url",
    "log_level",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags as a namespace of Settings fields (None: not given)."""
    parser = argparse.ArgumentParser(
        prog="python -m backend",
        description=__doc__.splitlines()[0],
        epilog=env_help(exclude=OPTIONS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(parser, *OPTIONS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_env(**vars(args))
    except ValueError as error:
        print(f"backend: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from backend.app import create_app
    from serving.transports import configuration_error

    problem = configuration_error(settings)  # found before listening; the model loads later
    if problem:
        print(f"backend: error: {problem}", file=sys.stderr)
        return 2
    app = create_app(settings)  # the transport is built in its lifespan
    logging.getLogger(__name__).info(
        "serving on http://%s:%d (%s)",
        settings.host,
        settings.port,
        "Redis queues" if settings.redis_url else "model in this process",
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
