#!/usr/bin/env bash
# Emulate N hosts on this machine: N `lmdir train` processes joined through jax.distributed on
# 127.0.0.1, each with its own emulated CPU devices and its own shard of the data.
#
#   scripts/launch_local.sh N CONFIG WORKDIR [--config.key=value ...]
#
# Environment: LMDIR_DEVICES_PER_PROCESS (default 4), LMDIR_PORT (default: a free port),
# PYTHON (default: python). Process 0 prints to the terminal; process i>0 logs to
# WORKDIR/logs/process_i.log. Exit status: the first non-zero status of the processes (0 if none).
# Ctrl-C / SIGTERM is forwarded to every process (each saves the same step and exits 130).
set -euo pipefail

if [ $# -lt 3 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/launch_local.sh N CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
n=$1 config=$2 workdir=$3
shift 3
python=${PYTHON:-python}
devices=${LMDIR_DEVICES_PER_PROCESS:-4}
port=${LMDIR_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if [ -e "$workdir" ] && [ ! -d "$workdir" ]; then
  echo "launch_local.sh: error: $workdir is a file, not a folder" >&2
  exit 2
fi
mkdir -p "$workdir/logs"

pids=()
forward() { kill -"$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward INT' INT
trap 'forward TERM' TERM
launch() {  # launch INDEX: one process in the background
  exec env JAX_PLATFORMS=cpu \
    XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
    JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$1" \
    "$python" -m lmdir_jax.cli train --config "$config" --workdir "$workdir" "${overrides[@]}"
}
overrides=("$@")
for ((i = 0; i < n; i++)); do
  if [ "$i" = 0 ]; then
    launch 0 &
  else
    launch "$i" > "$workdir/logs/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  while :; do
    code=0
    wait "$pid" || code=$?
    kill -0 "$pid" 2>/dev/null || break  # still running: the wait was cut short by a signal
  done
  if [ "$status" = 0 ] && [ "$code" != 0 ]; then
    status=$code
  fi
done
exit "$status"
