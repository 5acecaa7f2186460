#!/usr/bin/env bash
# README's test command: installs what the tests need and is missing (Debian's docker-compose for
# tests/test_compose.py and chromium for tests/e2e/test_browser.py via apt-get, the project with
# its dev extra via pip), then runs the test suite from the repository root: python -m pytest "$@".
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v chromium >/dev/null || missing+=(chromium)
if ((${#missing[@]})); then
    echo "tests/run.sh: apt-get install ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# the project and every package of pyproject's dev extra installed, else pip install them
if ! python - <<'PY'
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version

with open("pyproject.toml", "rb") as file:
    project = tomllib.load(file)["project"]
try:
    for requirement in [project["name"], *project["optional-dependencies"]["dev"]]:
        version(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0])
except PackageNotFoundError:
    sys.exit(1)
PY
then
    echo "tests/run.sh: pip install -e .[dev]" >&2
    python -m pip install --quiet -e ".[dev]"
fi
exec python -m pytest "$@"
