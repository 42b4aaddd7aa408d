#!/usr/bin/env bash
# Build wheelhouse/: the wheels opdlab needs beyond what the GPU machine's image holds (python 3.12, x86-64
# manylinux; the image has torch, lightning, transformers, torchmetrics, tensorboard, tqdm and matplotlib, but
# not jsonargparse or math-verify). Run it where a package index is reachable; the GPU machine reaches none.
#
#   bash benchmarks/build_wheelhouse.sh [FOLDER] [MORE REQUIREMENTS ...]   # default FOLDER: wheelhouse
#
# The wheels are downloaded for the GPU machine's platform (not this one's) with their dependencies resolved;
# any the image already has are skipped at install time (`pip install --no-index --find-links`, which keeps
# installed versions that satisfy opdlab, torch above all). opdlab's own wheel is not here: with its toy
# checkpoints (~34 MB) it would not fit the 64 MiB that travels beside the working tree, so
# benchmarks/gpu_acceptance.py builds it on the GPU machine from the working tree. PYTHON chooses the pip
# that downloads (default: .venv/bin/python, else python3); PYTHON_VERSION the target (default 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-wheelhouse}
shift || true
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
# opdlab's own version ranges for the two, read from pyproject.toml (the "math" extra holds math-verify), and
# its build requirements (setuptools), which the GPU machine's pip installs into an isolated build of opdlab's wheel.
reqs=$("$py" - <<'PY'
import re, pathlib
text = pathlib.Path("pyproject.toml").read_text()
for name in ("jsonargparse", "math-verify"):
    print(re.search(rf'"({re.escape(name)}[^"]*)"', text).group(1))
print(*re.search(r'requires = \[(.*?)\]', text).group(1).replace('"', '').split(","))
PY
)
mkdir -p "$out"
# shellcheck disable=SC2086
"$py" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --implementation cp \
    --python-version "${PYTHON_VERSION:-3.12}" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$out" $reqs "$@"
echo "wheelhouse: $(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1) in $out ($(echo $reqs "$@"))"
