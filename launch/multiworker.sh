#!/usr/bin/env bash
# Multi-worker training with tf.distribute.MultiWorkerMirroredStrategy.
#
#   launch/multiworker.sh -n N [--max-restarts R [--min-workers M]] -- <dist-rnn train arguments>
#       Starts N local workers on free loopback ports, each with its TF_CONFIG.
#   launch/multiworker.sh --hosts h1:port,h2:port,... --index I [--max-restarts R] -- <train arguments>
#       Starts worker I of a multi-host cluster (run once on every host; the
#       run directory must be on a filesystem all hosts share).
#
# --max-restarts R (default 0: no restart): a worker killed by a signal, or one
# whose collective failed because a peer died or hung (exit 75), stops the
# others and the job resumes from the newest checkpoint (--run-dir required),
# at most R times; RUN_DIR/restarts.jsonl records each restart. A worker that
# fails first again before a new checkpoint cannot come back: with -n the job
# continues on one worker fewer, down to --min-workers M (default N); with
# --hosts (one launcher per host, fixed cluster) it stops. Other failures (bad
# config or data: exit 2; non-finite loss: exit 1) are never restarted.
#
# Sets distribute.backend=multiworker. Output lines are prefixed with [wI].
# SIGINT/SIGTERM are forwarded to the workers; if any worker fails, the others
# are stopped and the script exits non-zero. $PYTHON picks the interpreter
# (default: python3 on PATH).
#
# GPUs with -n: the host's GPUs (CUDA_VISIBLE_DEVICES if set, else those
# `nvidia-smi` lists) are shared out in equal consecutive blocks, one block per
# worker through its CUDA_VISIBLE_DEVICES; a GPU count that -n does not divide
# is refused. Without either source of GPUs the environment is left alone.
set -euo pipefail

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

n="" hosts="" index="" max_restarts=0 min_workers=""
while [ $# -gt 0 ]; do
  case "$1" in
    -n) n="${2:-}"; shift 2 || usage ;;
    --hosts) hosts="${2:-}"; shift 2 || usage ;;
    --index) index="${2:-}"; shift 2 || usage ;;
    --max-restarts) max_restarts="${2:-}"; shift 2 || usage ;;
    --min-workers) min_workers="${2:-}"; shift 2 || usage ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "error: launch/multiworker.sh: unknown argument '$1' (expected -n N or --hosts/--index, then -- and train arguments)" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-python3}"
[[ "$max_restarts" =~ ^[0-9]+$ ]] || { echo "error: launch/multiworker.sh: --max-restarts must be a number >= 0, got '${max_restarts}'" >&2; exit 2; }
[[ -z "$min_workers" || "$min_workers" =~ ^[1-9][0-9]*$ ]] || { echo "error: launch/multiworker.sh: --min-workers must be a positive number, got '${min_workers}'" >&2; exit 2; }

tf_config() {  # tf_config HOSTS_CSV INDEX
  "$PYTHON" -c 'import json,sys; print(json.dumps({"cluster": {"worker": sys.argv[1].split(",")}, "task": {"type": "worker", "index": int(sys.argv[2])}}))' "$1" "$2"
}

if [ -n "$hosts" ]; then
  [[ "$index" =~ ^[0-9]+$ ]] || { echo "error: launch/multiworker.sh: --hosts needs --index I" >&2; exit 2; }
  if [ "$max_restarts" -gt 0 ]; then
    exec "$PYTHON" -m dist_rnn.supervisor --python "$PYTHON" --kind multiworker --hosts "$hosts" --index "$index" \
      --max-restarts "$max_restarts" -- "$@"
  fi
  export TF_CONFIG; TF_CONFIG=$(tf_config "$hosts" "$index")
  exec "$PYTHON" -m dist_rnn train "$@" --set distribute.backend=multiworker
fi

[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "error: launch/multiworker.sh: -n must be a positive number of workers, got '${n}'" >&2; exit 2; }
ports=$("$PYTHON" - "$n" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(",".join(f"127.0.0.1:{s.getsockname()[1]}" for s in socks))
for s in socks:
    s.close()
PY
)

# This host's GPUs, to give each local worker its own (every worker seeing all
# of them would put two replicas on one GPU, which NCCL refuses).
gpus=()
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
  [[ "$CUDA_VISIBLE_DEVICES" =~ ^-|^$ ]] || IFS=, read -ra gpus <<<"$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi >/dev/null 2>&1; then
  mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr -d ' ' | grep -E '^[0-9]+$' || true)
fi
per_worker=0
if [ "${#gpus[@]}" -gt 0 ]; then
  if [ $(( ${#gpus[@]} % n )) -ne 0 ]; then
    echo "error: launch/multiworker.sh: -n $n workers cannot share this host's ${#gpus[@]} GPU(s) (${gpus[*]}) equally; use -n dividing ${#gpus[@]}, or list the GPUs to use in CUDA_VISIBLE_DEVICES" >&2
    exit 2
  fi
  per_worker=$(( ${#gpus[@]} / n ))
fi

if [ "$max_restarts" -gt 0 ]; then  # dist_rnn/supervisor.py starts, watches and restarts the workers
  exec "$PYTHON" -m dist_rnn.supervisor --python "$PYTHON" --kind multiworker -n "$n" --max-restarts "$max_restarts" \
    ${min_workers:+--min-workers "$min_workers"} --gpus "$(IFS=,; echo "${gpus[*]}")" -- "$@"
fi

pids=()
stop_all() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
forward() { trap - INT TERM; stop_all; }
trap forward INT TERM

for ((i = 0; i < n; i++)); do
  (
    export TF_CONFIG; TF_CONFIG=$(tf_config "$ports" "$i")
    if [ "$per_worker" -gt 0 ]; then
      mine=("${gpus[@]:$((i * per_worker)):$per_worker}")
      export CUDA_VISIBLE_DEVICES; CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${mine[*]}")
    fi
    exec "$PYTHON" -u -m dist_rnn train "$@" --set distribute.backend=multiworker
  ) > >(sed -u "s/^/[w$i] /") 2> >(sed -u "s/^/[w$i] /" >&2) &
  pids+=($!)
done

status=0
running=("${pids[@]}")
while [ "${#running[@]}" -gt 0 ]; do
  still=()
  for p in "${running[@]}"; do
    if kill -0 "$p" 2>/dev/null; then
      still+=("$p")
      continue
    fi
    set +e; wait "$p"; rc=$?; set -e
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$rc
      echo "launch/multiworker.sh: a worker exited with status $rc; stopping the others" >&2
      stop_all
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  [ "${#running[@]}" -gt 0 ] && sleep 0.5
done
exit "$status"
