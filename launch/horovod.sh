#!/usr/bin/env bash
# Training with Horovod (one process per replica; horovodrun starts them).
#
#   launch/horovod.sh -n N [-H HOSTS] [--mpi] [--max-restarts R [--min-workers M]] -- <train arguments>
#       Runs `horovodrun -np N -H HOSTS --gloo python -m dist_rnn train ...
#       --set distribute.backend=horovod`. HOSTS defaults to localhost:N; for
#       several hosts give host1:slots,host2:slots (passwordless ssh between them,
#       the same checkout and Python on each, the run directory on a shared
#       filesystem). --mpi uses mpirun instead of the Gloo controller (needs a
#       Horovod built with MPI). On GPUs each rank pins the GPU of its local
#       rank (more ranks on a host than GPUs is refused: give slots <= GPUs)
#       and the all-reduce uses NCCL when Horovod was built with it (else it
#       goes through host memory, with a warning).
#
# Only rank 0 writes the run directory and prints INFO lines. Output lines are
# prefixed by horovodrun with [rank]<stdout>: / [rank]<stderr>:. $PYTHON picks
# the interpreter (default: python3 on PATH); horovodrun is taken from the same
# directory as $PYTHON, else from PATH. $HOROVOD_GLOO_TIMEOUT_SECONDS (default
# 60) bounds how long a Gloo collective waits for a dead rank.
#
# --max-restarts R (default 0: none): a rank killed by a signal, or one whose
# collective failed because a peer died or hung (exit 75), ends the horovodrun
# job and it is run again, resuming from the newest checkpoint (--run-dir
# required), at most R times (RUN_DIR/restarts.jsonl records each). A rank that
# fails first again before a new checkpoint cannot come back: the job continues
# with one rank fewer, down to --min-workers M (default N). Other failures (exit
# 2: bad config or data; exit 1: non-finite loss) are not restarted. This is
# restart-based recovery, not horovodrun --elastic (see README).
set -euo pipefail

usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

n="" hosts="" controller=(--gloo) max_restarts=0 min_workers=""
while [ $# -gt 0 ]; do
  case "$1" in
    -n) n="${2:-}"; shift 2 || usage ;;
    -H|--hosts) hosts="${2:-}"; shift 2 || usage ;;
    --mpi) controller=(--mpi); shift ;;
    --max-restarts) max_restarts="${2:-}"; shift 2 || usage ;;
    --min-workers) min_workers="${2:-}"; shift 2 || usage ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "error: launch/horovod.sh: unknown argument '$1' (expected -n N [-H HOSTS] [--mpi], then -- and train arguments)" >&2; exit 2 ;;
  esac
done

[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "error: launch/horovod.sh: -n must be a positive number of processes, got '${n}'" >&2; exit 2; }
hosts="${hosts:-localhost:$n}"
[[ "$max_restarts" =~ ^[0-9]+$ ]] || { echo "error: launch/horovod.sh: --max-restarts must be a number >= 0, got '${max_restarts}'" >&2; exit 2; }
[[ -z "$min_workers" || "$min_workers" =~ ^[1-9][0-9]*$ ]] || { echo "error: launch/horovod.sh: --min-workers must be a positive number, got '${min_workers}'" >&2; exit 2; }
[[ "$hosts" =~ ^[A-Za-z0-9._-]+(:[1-9][0-9]*)?(,[A-Za-z0-9._-]+(:[1-9][0-9]*)?)*$ ]] \
  || { echo "error: launch/horovod.sh: -H must be host[:slots][,host[:slots]...], got '${hosts}'" >&2; exit 2; }
timeout="${HOROVOD_GLOO_TIMEOUT_SECONDS:-60}"
[[ "$timeout" =~ ^[1-9][0-9]*$ ]] || { echo "error: launch/horovod.sh: HOROVOD_GLOO_TIMEOUT_SECONDS must be a positive integer, got '${timeout}'" >&2; exit 2; }
[ "${controller[0]}" = --gloo ] && controller+=(--gloo-timeout-seconds "$timeout")

PYTHON="${PYTHON:-python3}"
py="$(command -v "$PYTHON" || true)"
[ -n "$py" ] || { echo "error: launch/horovod.sh: Python interpreter '$PYTHON' not found (set PYTHON)" >&2; exit 2; }
if [ -x "$(dirname "$py")/horovodrun" ]; then
  hvdrun="$(dirname "$py")/horovodrun"
else
  hvdrun="$(command -v horovodrun || true)"
fi
if [ -z "$hvdrun" ] || ! "$py" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("horovod.tensorflow") is None)' >/dev/null 2>&1; then
  echo "error: launch/horovod.sh: Horovod with TensorFlow support is not installed for $py; run tools/install_horovod.sh (PYTHON=$py)" >&2
  exit 2
fi

if [ "$max_restarts" -gt 0 ]; then  # dist_rnn/supervisor.py runs horovodrun and restarts it
  exec "$py" -m dist_rnn.supervisor --python "$py" --kind horovod -n "$n" --max-restarts "$max_restarts" \
    ${min_workers:+--min-workers "$min_workers"} --hvdrun "$hvdrun" --hosts "$hosts" --controller "${controller[*]}" -- "$@"
fi
# horovodrun starts every rank in the current directory (over ssh on other hosts).
exec "$hvdrun" -np "$n" -H "$hosts" "${controller[@]}" \
  "$py" -u -m dist_rnn train "$@" --set distribute.backend=horovod
