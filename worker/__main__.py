"""``python -m worker``: model-holding RQ workers, the cron scheduler, and operator commands.

    python -m worker [--queues interactive,batch] [--checkpoint PATH] ...   a worker process
    python -m worker --queues train                                         a training worker
    python -m worker cron                                                   periodic jobs
    python -m worker status [--json]                                        queues, workers, jobs
    python -m worker autolabel --project P [--mode auto] [--no-wait]        batch-predict a project
    python -m worker prewarm --project P                                    embeddings of a project
    python -m worker finetune --project P [--no-wait]                       fine-tune, progress bar
    python -m worker sami --project P [--no-wait]                           SAMI run, progress bar
    python -m worker versions [--project P]                                 model versions
    python -m worker rollback --project P [--to VERSION|base]               serve another version

Every setting comes from the environment (serving/settings.py, listed by ``--help``: REDIS_URL,
CHECKPOINT, MODEL_DIR, LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, ...); the setting flags win.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from serving.settings import Settings, add_options, env_help

COMMANDS = (
    "work",
    "cron",
    "status",
    "autolabel",
    "prewarm",
    "finetune",
    "sami",
    "versions",
    "rollback",
)
logger = logging.getLogger("worker")
# Settings with a flag (``--model-dir`` for model_dir, ...); the others come from env only.
OPTIONS = ("redis_url", "queues", "checkpoint", "model_dir", "device", "precision", "log_level")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m worker",
        description=__doc__.splitlines()[0],
        epilog=env_help(exclude=OPTIONS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", default="work", choices=COMMANDS)
    add_options(parser, *OPTIONS)
    parser.add_argument("--name", help="worker name (default: random)")
    parser.add_argument("--burst", action="store_true", help="quit when the queues are empty")
    parser.add_argument("--project", type=int, help="Label Studio project id")
    parser.add_argument("--mode", choices=("auto", "boxes", "everything"), help="autolabel mode")
    parser.add_argument("--no-wait", action="store_true", help="autolabel/prewarm: only enqueue")
    parser.add_argument("--to", help="rollback: a version of the project, or 'base'")
    parser.add_argument("--json", action="store_true", help="status: machine-readable")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from env, then the setting flags given."""
    return Settings.from_env(**{name: getattr(args, name) for name in OPTIONS})


def connect(settings: Settings):
    import redis

    if not settings.redis_url:
        raise SystemExit("worker: error: set REDIS_URL (or --redis-url)")
    return redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=5, health_check_interval=10
    )


# -- commands ------------------------------------------------------------------------------------
def work(settings: Settings, args: argparse.Namespace) -> int:
    """Run one model-holding worker on the configured queues (highest priority first)."""
    from serving.runtime import ModelRuntime
    from worker.model_worker import REDIS_DOWN, ModelWorker, until_redis_answers

    connection = connect(settings)
    runtime = ModelRuntime(settings, redis=connection)
    until_redis_answers(connection.ping, "start-up")  # Redis away: wait for it, do not exit
    runtime.load()  # before taking any job: the model loads once per process
    worker = ModelWorker(
        list(settings.queue_names),
        runtime=runtime,
        heartbeat_seconds=settings.worker_heartbeat_seconds,
        connection=connection,
        name=args.name,
    )
    logger.info("worker %s on queues %s", worker.name, ",".join(settings.queue_names))
    while True:
        # with_scheduler: RQ's scheduler (a forked helper that never touches the model) moves
        # retries with a delay back to their queue; one per Redis, by lock.
        try:
            worker.work(
                burst=args.burst, logging_level=settings.log_level.upper(), with_scheduler=True
            )
        except REDIS_DOWN as error:  # Redis away where even ModelWorker does not expect it
            logger.warning("worker loop: Redis unreachable: %s", error)
        if args.burst or worker.stopping:
            return 0
        logger.warning("worker loop ended unexpectedly; restarting it in 5 s")
        time.sleep(5)
        until_redis_answers(worker.register_death, "worker restart")  # its name is free again


def cron(settings: Settings, args: argparse.Namespace) -> int:
    """RQ's cron scheduler with this service's periodic jobs (see worker/schedule.py)."""
    from worker.schedule import JsonCronScheduler, register_periodic_jobs

    scheduler = JsonCronScheduler(connect(settings), logging_level=settings.log_level.upper())
    register_periodic_jobs(scheduler, settings)
    scheduler.start()
    return 0


def status(settings: Settings, args: argparse.Namespace) -> int:
    from worker.operations import queue_status

    report = queue_status(connect(settings), settings)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"model: {report['model'] or 'no worker has published a version yet'}")
    for name, queue in report["queues"].items():
        print(
            f"queue {name:<12} queued {queue['queued']:>5}  running {queue['started']:>3}  "
            f"finished {queue['finished']:>5}  failed {queue['failed']:>4}  "
            f"workers {queue['workers']}"
        )
    for worker in report["workers"]:
        print(
            f"worker {worker['name']}: {worker['state']} on {','.join(worker['queues'])}"
            f"{' - ' + worker['job'] if worker['job'] else ''}"
        )
    for failure in report["recent_failures"]:
        print(f"failed {failure['id']}: {failure['reason']}")
    return 0


def autolabel(settings: Settings, args: argparse.Namespace, function: str) -> int:
    from worker.operations import enqueue_project, wait_for_jobs

    if args.project is None:
        raise SystemExit(f"worker: error: {function} needs --project")
    connection = connect(settings)
    job_ids = enqueue_project(connection, settings, args.project, function, args.mode)
    print(f"{len(job_ids)} {function} job(s) queued for project {args.project}")
    if args.no_wait or not job_ids:
        return 0
    failed = wait_for_jobs(connection, job_ids, f"{function} project {args.project}")
    for job_id, reason in failed.items():
        print(f"failed {job_id}: {reason}")
    return 1 if failed else 0


def finetune(settings: Settings, args: argparse.Namespace) -> int:
    """Queue a project's training run (as "Start training" does: ``finetune``, or ``sami``)
    and follow it on a progress bar."""
    from serving.requests import submit_training
    from serving.transports import QueueTransport
    from worker.operations import follow_training

    mode = "sami" if args.command == "sami" else "finetune"
    if args.project is None:
        raise SystemExit(f"worker: error: {args.command} needs --project")
    project = str(args.project)
    transport = QueueTransport(settings)
    job_id = submit_training(transport, project, mode, "command line")
    what = "SAMI run" if mode == "sami" else "fine-tune"
    print(f"{what} of project {project}: job {job_id}")
    if args.no_wait:
        return 0
    result = follow_training(transport.connection, job_id, description=what)
    print(json.dumps(result, indent=2, default=str))
    return 0 if result.get("status") in ("promoted", "rejected", "skipped") else 1


def versions(settings: Settings, args: argparse.Namespace) -> int:
    from serving.registry import ModelRegistry

    registry = ModelRegistry(settings.model_dir)
    projects = [str(args.project)] if args.project is not None else registry.projects()
    if not projects:
        print("no fine-tuned versions: every project is served by the base model")
    for project in projects:
        state = registry.version_history(project)
        print(f"project {project}: serving {state['current'] or 'the base model'}")
        for event in state["history"]:
            print(
                f"  {event['time']} {event['event']:<12} {event.get('version') or 'base'}"
                f"{': ' + event['reason'] if event.get('reason') else ''}"
            )
    return 0


def rollback(settings: Settings, args: argparse.Namespace) -> int:
    from serving.registry import ModelRegistry, RegistryError

    if args.project is None:
        raise SystemExit("worker: error: rollback needs --project")
    connection = connect(settings) if settings.redis_url else None
    registry = ModelRegistry(settings.model_dir, connection, settings.redis_key_prefix)
    try:
        state = registry.rollback(str(args.project), args.to)
    except RegistryError as error:
        raise SystemExit(f"worker: error: {error}") from error
    print(f"project {args.project}: now serving {state['current'] or 'the base model'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = settings_from(args)
    except ValueError as error:
        print(f"worker: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "work":
        return work(settings, args)
    if args.command in ("autolabel", "prewarm"):
        return autolabel(settings, args, args.command)
    commands = {
        "cron": cron,
        "status": status,
        "finetune": finetune,
        "sami": finetune,
        "versions": versions,
        "rollback": rollback,
    }
    return commands[args.command](settings, args)


if __name__ == "__main__":
    sys.exit(main())
