#!/usr/bin/env bash
# GPU acceptance (issue 31) in one command on a GPU machine that reaches no package index:
#
#   bash benchmarks/gpu_acceptance.sh [benchmarks/gpu_acceptance.py options]    # --help lists them
#
# 1. locates the wheelhouse (WHEELHOUSE, default wheelhouse/; built with benchmarks/build_wheelhouse.sh where a
#    package index is reachable, which this script tries when the folder is missing),
# 2. runs benchmarks/gpu_acceptance.py with PYTHON (default python3), whose first stages build opdlab's wheel
#    from this working tree and install it with what the machine lacks from the wheelhouse only (torch is kept),
#    then run the main job, the Qwen3-shaped fits per engine, rollout.py and loss_memory.py, and write the
#    report (default benchmarks/results/gpu.md). Its exit status is the script's.
# Through the device tool: run(command="bash benchmarks/gpu_acceptance.sh --output $OUT/gpu.md", carry=["wheelhouse"]).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python3}
wheelhouse=${WHEELHOUSE:-wheelhouse}
export PYTHONUNBUFFERED=1
case " $* " in
  *" --help "*|*" -h "*|*" --install skip "*|*" --install=skip "*) exec "$py" benchmarks/gpu_acceptance.py --wheelhouse "$wheelhouse" "$@" ;;
esac
if [ ! -d "$wheelhouse" ]; then
  echo "gpu_acceptance.sh: no $wheelhouse/; building it (needs a package index)"
  if ! PIP_RETRIES=0 PIP_TIMEOUT=10 timeout 300 bash benchmarks/build_wheelhouse.sh "$wheelhouse" >/dev/null 2>&1; then
    rm -rf "$wheelhouse"
    missing=$("$py" benchmarks/gpu_acceptance.py --list-missing --wheelhouse "$wheelhouse" 2>&1 | tail -1)
    if [ $? -ne 0 ] || [[ "$missing" != *"nothing is missing" ]]; then
      echo "gpu_acceptance.sh: cannot install: no $wheelhouse/ and no package index to build one (run benchmarks/build_wheelhouse.sh where there is one and carry $wheelhouse/); ${missing#gpu_acceptance: }"
      exit 2
    fi
    echo "gpu_acceptance.sh: no wheelhouse, but nothing opdlab needs is missing: installing opdlab alone"
    mkdir -p "$wheelhouse"  # empty: the install stage builds opdlab's wheel from this tree and needs nothing else
  fi
fi
exec "$py" benchmarks/gpu_acceptance.py --wheelhouse "$wheelhouse" "$@"
