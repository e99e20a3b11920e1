#!/usr/bin/env bash
# The whole test suite, as `make test` runs it: two pytest processes side by side. Most of the suite's
# time is spent waiting on real daemons (etcd, systemd, dockerd, HAProxy) rather than computing, so two
# processes take about half the time of one. One runs the fleet tests (tests/fleet, a session fleet of
# three hosts, and the demo's), the other everything else; each has its own session fixtures.
#
# With PYTEST_ARGS set (`make test PYTEST_ARGS="tests/unit -k wire"`), one pytest runs those instead.
set -uo pipefail
cd "$(dirname "$0")/.."

pytest=(.venv/bin/pytest -q -p no:cacheprovider)
export PYTHONASYNCIODEBUG=1
if [ -n "${PYTEST_ARGS:-}" ]; then
    # shellcheck disable=SC2086 # the arguments are words, as on a command line
    exec "${pytest[@]}" $PYTEST_ARGS
fi

FLEET=(tests/fleet tests/integration/test_sandbox_demo.py)
logs=.run/test
mkdir -p "$logs"
started=$(date +%s)

"${pytest[@]}" "${FLEET[@]}" > "$logs/fleet.log" 2>&1 &
fleet=$!
trap 'kill -INT "$fleet" 2>/dev/null; wait "$fleet"; exit 130' INT TERM

echo "== tests outside the fleet (the fleet's run is printed when both are done: $logs/fleet.log)"
"${pytest[@]}" tests --ignore=tests/fleet --ignore=tests/integration/test_sandbox_demo.py
rest_status=$?
wait "$fleet"
fleet_status=$?
trap - INT TERM

echo
echo "== the fleet tests (${FLEET[*]})"
cat "$logs/fleet.log"
echo
echo "== make test: $(( $(date +%s) - started )) s; outside the fleet: exit $rest_status; the fleet: exit $fleet_status"
[ "$rest_status" -eq 0 ] && [ "$fleet_status" -eq 0 ]
