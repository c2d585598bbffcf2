#!/usr/bin/env bash
# The lent-GPU session, one command (<= 6 min on a fresh H100): benchmarks/gpu_session.py does the work; see
# its docstring for the stages, their limits and the outputs under $OUT (default ./gpu-out).
#   bash benchmarks/gpu_session.sh                      # every stage
#   bash benchmarks/gpu_session.sh --only layer e2e     # some stages (--skip STAGE... to leave some out)
#   bash benchmarks/gpu_session.sh --dry-run            # the CPU rehearsal that CI runs
# Exit status: non-zero when a stage failed or ran past its limit. PYTHON picks the interpreter (python3).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_session.py" "$@"
