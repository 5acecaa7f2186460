"""docker-compose.yml and Dockerfile: the services run the commands the other tests run, with env
names the settings read, Redis needs the password from .env (checked against a real
redis-server), and ``docker-compose config`` accepts the file (with each profile)."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis
import tomllib
import yaml

from backend.__main__ import parse_args as backend_args
from serving.settings import ENV, QUEUE_NAMES, Settings
from tests.redis_fixtures import free_port
from worker.__main__ import connect as worker_connect
from worker.__main__ import parse_args as worker_args
from worker.__main__ import settings_from as worker_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"

# The module invocations of tests/e2e (backend) and tests/worker (workers), as compose runs them.
COMMANDS = {
    "backend": ["python", "-m", "backend", "--port", "9090"],
    "worker": ["python", "-m", "worker", "--queues", "interactive,batch"],
    "train-worker": ["python", "-m", "worker", "--queues", "train"],
    "worker-cpu": ["python", "-m", "worker", "--queues", "interactive,batch"],
    "train-worker-cpu": ["python", "-m", "worker", "--queues", "train"],
    "cron": ["python", "-m", "worker", "cron"],
}
APP_SERVICES = tuple(COMMANDS)  # built from the Dockerfile
GPU_WORKERS = {"worker": "worker-cpu", "train-worker": "train-worker-cpu"}  # -> CPU twin
MODEL_SERVICES = ("worker", "train-worker", "worker-cpu", "train-worker-cpu")
SETTINGS_VARIABLES = {variable for variables in ENV.values() for variable in variables}
# What the label-studio service may set: names Label Studio 1.23.2 reads (core/settings/base.py,
# server.py's user creation, organizations/functions.py).
LABEL_STUDIO_VARIABLES = {
    "LABEL_STUDIO_ML_BLOCK_LOCAL_IP",
    "LABEL_STUDIO_SSRF_PROTECTION_ENABLED",
    "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN",
    "LABEL_STUDIO_HOST",
    "LABEL_STUDIO_USERNAME",
    "LABEL_STUDIO_PASSWORD",
    "LABEL_STUDIO_USER_TOKEN",
    "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED",
    "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT",
}
# What the user's .env may hold (${NAME} in the compose file); each is documented in its header.
DOTENV_VARIABLES = {
    "OUTBOUND_ALLOW",
    "REDIS_PASSWORD",
    "LABEL_STUDIO_API_KEY",
    "LABEL_STUDIO_USERNAME",
    "LABEL_STUDIO_PASSWORD",
    "LABEL_STUDIO_HOST",
    "BASIC_AUTH_USER",
    "BASIC_AUTH_PASS",
    "LOG_LEVEL",
    "TORCH_INDEX_URL",
}
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
# The required .env values the tests use (compose refuses to start without them).
REQUIRED_DOTENV = {"BASIC_AUTH_USER": "ml", "BASIC_AUTH_PASS": "secret"}  # compose refuses without
DOTENV = {**REQUIRED_DOTENV, "REDIS_PASSWORD": "test0password"}
REDIS_URL = f"redis://:{DOTENV['REDIS_PASSWORD']}@redis:6379/0"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def resolve(value: object) -> str:
    """A compose value as it is with DOTENV as .env (``${X:-default}`` -> default; ``${X:?why}``
    needs X in DOTENV)."""

    def substitute(match: re.Match) -> str:
        name, operator, default = match.groups()
        if name in DOTENV:
            return DOTENV[name]
        assert not (operator or "").endswith("?"), f"{name} is required: add it to DOTENV"
        return default or ""

    return INTERPOLATION.sub(substitute, str(value))


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {name: resolve(value) for name, value in env.items()}


def command(service: dict) -> list[str]:
    value = service["command"]
    return value.split() if isinstance(value, str) else list(value)


def gpu_devices(service: dict) -> list[dict]:
    resources = (service.get("deploy") or {}).get("resources") or {}
    devices = (resources.get("reservations") or {}).get("devices") or []
    return [device for device in devices if "gpu" in device.get("capabilities", [])]


def model_mount(service: dict) -> str:
    """The volume entry mounted at the service's MODEL_DIR."""
    target = environment(service)["MODEL_DIR"]
    mounts = [v for v in service.get("volumes", []) if v.split(":")[1] == target]
    assert len(mounts) == 1, f"no single volume at MODEL_DIR={target}: {service.get('volumes')}"
    return mounts[0]


def settings_of(name: str, service: dict, monkeypatch) -> Settings:
    """The Settings the service's process builds: its env, then its command's flags."""
    for variable in SETTINGS_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment(service).items():
        monkeypatch.setenv(variable, value)
    module, args = command(service)[2], command(service)[3:]
    if module == "backend":
        return Settings.from_env(**vars(backend_args(args)))  # its flags are Settings fields
    return worker_settings(worker_args(args))


def test_required_services(services):
    assert set(services) >= {"label-studio", "redis", *APP_SERVICES}


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_commands_are_the_tested_module_invocations(services, name, monkeypatch):
    service = services[name]
    assert command(service) == COMMANDS[name]
    assert service["image"] == services["backend"]["image"]
    assert service.get("build") == services["backend"]["build"]
    settings = settings_of(name, service, monkeypatch)  # the real argparse and validation
    assert settings.redis_url == REDIS_URL
    if name in MODEL_SERVICES:
        assert settings.queue_names == tuple(COMMANDS[name][-1].split(","))
        assert settings.label_studio_url == "http://label-studio:8080"
        assert "LABEL_STUDIO_API_KEY" in environment(service)
        assert settings.device == ("cpu" if name.endswith("-cpu") else "cuda")


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_env_names_are_settings_variables(services, name):
    unknown = set(environment(services[name])) - SETTINGS_VARIABLES
    assert not unknown, f"{name}: not read by serving/settings.py ENV: {sorted(unknown)}"


def test_dotenv_variables_are_known_and_documented():
    text = COMPOSE_FILE.read_text()
    header = text.split("\n\n", 1)[0]
    referenced = {match[0] for match in INTERPOLATION.findall(text)}
    assert referenced <= DOTENV_VARIABLES, sorted(referenced - DOTENV_VARIABLES)
    undocumented = {name for name in referenced if name not in header}
    assert not undocumented, f"explain in the header comment: {sorted(undocumented)}"


def test_backend_is_the_web_tier(services, monkeypatch):
    backend = services["backend"]
    assert "profiles" not in backend and not gpu_devices(backend)
    assert backend["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "9090:9090" in backend["ports"]
    env = environment(backend)
    assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert {"LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"} <= set(env)
    assert settings_of("backend", backend, monkeypatch).port == 9090
    check = backend["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"] and "/health" in check[3]
    compile(check[3], "healthcheck", "exec")


def test_redis_persists_and_has_a_healthcheck(services):
    redis = services["redis"]
    assert redis["image"] == "redis:7"
    words = command(redis)
    assert words[words.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert "ports" not in redis  # reached on the compose network only


def test_redis_needs_the_password_that_every_service_has(services, tmp_path, monkeypatch):
    """The redis service's own command line (a real redis-server here) refuses clients without
    the password; its healthcheck and every app service's REDIS_URL (as the workers connect)
    get in; a wrong password is refused."""
    redis_service = services["redis"]
    words = [resolve(word) for word in command(redis_service)]
    assert words[words.index("--requirepass") + 1] == DOTENV["REDIS_PASSWORD"]
    port = free_port()
    server = subprocess.Popen(
        [shutil.which(words[0]), *words[1:], "--port", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,  # its appendonly files
        stdout=subprocess.DEVNULL,
    )
    try:
        check = redis_service["healthcheck"]["test"]
        assert check[0] == "CMD-SHELL"
        script = check[1].replace("redis-cli", f"redis-cli -p {port}")

        def healthy(env: dict) -> bool:
            done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, timeout=10)
            return done.returncode == 0

        env = {"PATH": os.environ["PATH"], **environment(redis_service)}
        start = time.monotonic()
        while not healthy(env):
            assert time.monotonic() - start < 10, "redis-server did not answer its healthcheck"
            time.sleep(0.1)
        assert not healthy({**env, "REDISCLI_AUTH": "wrong"})
        assert not healthy({"PATH": os.environ["PATH"]})
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        for name in APP_SERVICES:
            settings = settings_of(name, services[name], monkeypatch)
            assert settings.redis_url == REDIS_URL, name
            local = settings.redis_url.replace("@redis:6379", f"@127.0.0.1:{port}")
            connection = worker_connect(replace(settings, redis_url=local))
            assert connection.ping(), name
            connection.close()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(local.replace(DOTENV["REDIS_PASSWORD"], "wrong")).ping()
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_label_studio_can_call_a_backend_on_the_network(services):
    studio = services["label-studio"]
    assert studio["image"] == "heartexlabs/label-studio:1.23.2"
    assert "8080:8080" in studio["ports"]
    assert any(volume.endswith(":/label-studio/data") for volume in studio["volumes"])
    env = environment(studio)
    assert set(env) <= LABEL_STUDIO_VARIABLES, sorted(set(env) - LABEL_STUDIO_VARIABLES)
    assert env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"
    assert env["LABEL_STUDIO_SSRF_PROTECTION_ENABLED"] == "false"
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"


@pytest.mark.parametrize("gpu_name", GPU_WORKERS)
def test_gpu_workers_and_their_cpu_twins(services, gpu_name):
    gpu, cpu = services[gpu_name], services[GPU_WORKERS[gpu_name]]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    devices = gpu_devices(gpu)
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia" and devices[0]["count"] == 1
    assert environment(gpu)["DEVICE"] == "cuda"
    assert not gpu_devices(cpu) and "deploy" not in cpu
    assert environment(cpu)["DEVICE"] == "cpu"
    assert command(cpu) == command(gpu)
    own = ("DEVICE", "TORCH_THREADS")  # a CPU trainer shares the cores with the click worker
    assert {k: v for k, v in environment(cpu).items() if k not in own} == {
        k: v for k, v in environment(gpu).items() if k not in own
    }
    if "train" in command(cpu):
        assert environment(cpu)["TORCH_THREADS"] == "1"


def test_model_holding_workers_share_one_writable_model_dir(services):
    mounts = {name: model_mount(services[name]) for name in MODEL_SERVICES}
    assert len(set(mounts.values())) == 1, mounts
    assert not next(iter(mounts.values())).endswith(":ro")
    assert model_mount(services["cron"]).split(":")[0] == next(iter(mounts.values())).split(":")[0]


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_each_profile_serves_every_queue(services, profile):
    enabled = {n: s for n, s in services.items() if s.get("profiles", [profile]) == [profile]}
    queues = {
        queue
        for name, service in enabled.items()
        if name in MODEL_SERVICES
        for queue in command(service)[command(service).index("--queues") + 1].split(",")
    }
    assert queues == set(QUEUE_NAMES)
    if profile == "cpu":  # `--profile cpu up` must not need a GPU
        assert not [name for name, service in enabled.items() if gpu_devices(service)]


def test_long_running_services_restart(services):
    assert {name: s.get("restart") for name, s in services.items()} == {
        name: "unless-stopped" for name in services
    }


def test_dockerfile_copies_every_package():
    text = DOCKERFILE.read_text()
    # the installed packages (pyproject's list); tests/ and benchmarks/ stay in the checkout
    installed = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = installed["packages"]["find"]["include"]
    packages = {
        p.name
        for p in REPO_ROOT.iterdir()
        if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, x) for x in patterns)
    }
    assert {"efficientsam", "serving", "backend", "worker"} <= packages
    copied = {line.split()[1] for line in text.splitlines() if line.startswith("COPY ")}
    assert packages <= copied
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert not copied & ignored, copied & ignored
    assert all((REPO_ROOT / source).exists() for source in copied)
    assert 'CMD ["python", "-m", "backend"]' in text and "EXPOSE 9090" in text
    assert re.search(r"^USER (?!root)", text, re.MULTILINE)


def compose_config(profile: str | None, dotenv: dict[str, str]) -> subprocess.CompletedProcess:
    """``docker-compose config -q`` with ``dotenv`` as the .env values (and nothing else)."""
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.fail("docker-compose is not installed: apt-get install -y docker-compose")
    profile_args = ["--profile", profile] if profile else []
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("COMPOSE_") and k not in DOTENV_VARIABLES
    }
    return subprocess.run(
        [executable, "-f", str(COMPOSE_FILE), *profile_args, "config", "-q"],
        cwd=REPO_ROOT,
        env={**env, **dotenv},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("profile", [None, "cpu", "gpu"])
def test_docker_compose_accepts_the_file(profile):
    result = compose_config(profile, DOTENV)
    assert result.returncode == 0, result.stderr


def test_docker_compose_refuses_to_run_without_a_redis_password():
    result = compose_config(None, REQUIRED_DOTENV)
    assert result.returncode != 0 and "set REDIS_PASSWORD in .env" in result.stderr


def test_backend_needs_basic_auth_credentials(services):
    """Compose ships with basic auth on: START_TRAINING and the other control actions need it."""
    env = services["backend"]["environment"]
    for name in REQUIRED_DOTENV:
        assert env[name].startswith(f"${{{name}:?") and env[name].endswith("}"), env[name]
        missing = compose_config(None, {k: v for k, v in DOTENV.items() if k != name})
        assert missing.returncode != 0 and "set BASIC_AUTH_USER" in missing.stderr
