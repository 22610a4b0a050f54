#!/usr/bin/env bash
# Everything owed to a GPU, in one run, with a report: see scripts/gpu_check.py.
#   scripts/gpu_check.sh OUTDIR                 on a machine with an NVIDIA GPU (about 8 minutes)
#   scripts/gpu_check.sh --emulated OUTDIR      the same list on the CPU emulator, where it can run
#   scripts/gpu_check.sh --emulated --quick OUTDIR   one case of each check (the test suite's run)
# Writes OUTDIR/report.md and OUTDIR/report.json; exits 1 if any check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
