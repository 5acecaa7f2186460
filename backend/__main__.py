"""``python -m backend --checkpoint PATH --port PORT`` (also ``efficientsam-backend``).

Every option can also come from the environment (see serving/settings.py); flags win.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from serving.settings import Settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m backend", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, help="EfficientSAM .pt/.pt.zip/.safetensors (env CHECKPOINT)"
    )
    parser.add_argument("--host", help="listen address (env HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="listen port (env PORT, default 9090)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (env DEVICE, default auto)")
    parser.add_argument(
        "--precision",
        choices=("float32", "bfloat16", "float16"),
        help="env PRECISION, default float32",
    )
    parser.add_argument("--model-dir", type=Path, help="env MODEL_DIR")
    parser.add_argument(
        "--redis-url",
        help="env REDIS_URL: work goes to `python -m worker` processes (default: none, model in this process)",
    )
    parser.add_argument("--log-level", help="env LOG_LEVEL, default INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_env(
            checkpoint=args.checkpoint,
            host=args.host,
            port=args.port,
            device=args.device,
            precision=args.precision,
            model_dir=args.model_dir,
            redis_url=args.redis_url,
            log_level=args.log_level,
        )
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
