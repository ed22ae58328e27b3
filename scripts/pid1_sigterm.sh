#!/usr/bin/env bash
# How long `disco serve` takes to end when SIGTERM reaches it DELAY seconds after it starts as PID 1 of a new PID
# namespace, as a container's entrypoint does (PID 1 ignores a signal it has no handler for).
#   [DISCO=PATH] scripts/pid1_sigterm.sh DELAY [INIT...]   e.g. scripts/pid1_sigterm.sh 0.1, or ... 0.1 tini --
# With INIT (tini --, as the images' ENTRYPOINT), the init is PID 1 and forwards the signal to disco serve.
# Needs root (or unprivileged user namespaces) for unshare. Prints the seconds it took and the exit status (143: the
# command's handler; 0: the server's), or "still running after 30 s".
set -u
delay=${1:?"usage: [DISCO=PATH] $0 DELAY [INIT...]"}; shift
# the console script itself, not a shim in front of it (pyenv's adds a shell and a second exec); DISCO=PATH chooses
disco=${DISCO:-$(command -v disco)}
if [[ $disco == */shims/* ]] && command -v pyenv >/dev/null; then disco=$(pyenv which disco); fi
[ -x "$disco" ] || { echo "no disco command at '$disco': give DISCO=/path/to/disco" >&2; exit 2; }
log=$(mktemp)
start=$(date +%s.%N)
unshare --pid --fork --kill-child "$@" "$disco" serve --port 0 --metrics-port 0 >"$log" 2>&1 &
u=$!
for _ in $(seq 100); do pid1=$(pgrep -P "$u" | head -1); [ -n "$pid1" ] && break; sleep 0.01; done
sleep "$delay"
if ! kill -0 "$u" 2>/dev/null || [ -z "$pid1" ]; then  # nothing measured: say why, not a time
    echo "disco serve did not start as PID 1: $(tail -3 "$log")" >&2
    rm -f "$log"; exit 1
fi
kill -TERM "$pid1"
for _ in $(seq 300); do kill -0 "$u" 2>/dev/null || break; sleep 0.1; done
end=$(date +%s.%N)
if kill -0 "$u" 2>/dev/null; then
    echo "SIGTERM after ${delay} s: still running after 30 s"
    kill -9 "$u"; wait "$u" 2>/dev/null
else
    wait "$u"; status=$?  # unshare's: that of what it ran
    echo "SIGTERM after ${delay} s: ended after $(python3 -c "print(f'{$end - $start:.2f}')") s, status $status"
fi
echo "  its last line: $(tail -1 "$log")"
rm -f "$log"
