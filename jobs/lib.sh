# shellcheck shell=bash
# Shared by the scripts cron calls (score.sh, report.sh, retrain.sh); sourced, not run.
#
# Cron starts a job in $HOME with a bare PATH, so everything is found from this file's
# own location: the project is the directory above jobs/, its virtualenv is .venv there.
#
# Environment (all optional):
#   CHURN_BATCH_VENV         virtualenv to run from            (default <project>/.venv)
#   CHURN_BATCH_BIN          the churn-batch command           (default $CHURN_BATCH_VENV/bin/churn-batch)
#   CHURN_BATCH_CONFIG       config file                       (default <project>/configs/default.toml)
#   CHURN_BATCH_LOG_DIR      where <job>.log and locks go      (default <project>/logs)
#   CHURN_BATCH_METRICS_DIR  node_exporter textfile directory  (default $CHURN_BATCH_LOG_DIR/metrics)
#   CHURN_BATCH_RETRIES      extra attempts after exit 7 or 8  (default 3)
#   CHURN_BATCH_RETRY_DELAY  seconds before the first retry, doubled each time (default 60)

set -uo pipefail

# Timestamps in the logs and dates like "yesterday" are UTC, as in the crontab.
export TZ=UTC

CHURN_BATCH_PROJECT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
CHURN_BATCH_VENV=${CHURN_BATCH_VENV:-$CHURN_BATCH_PROJECT/.venv}
CHURN_BATCH_BIN=${CHURN_BATCH_BIN:-$CHURN_BATCH_VENV/bin/churn-batch}
CHURN_BATCH_LOG_DIR=${CHURN_BATCH_LOG_DIR:-$CHURN_BATCH_PROJECT/logs}
CHURN_BATCH_METRICS_DIR=${CHURN_BATCH_METRICS_DIR:-$CHURN_BATCH_LOG_DIR/metrics}
CHURN_BATCH_RETRIES=${CHURN_BATCH_RETRIES:-3}
CHURN_BATCH_RETRY_DELAY=${CHURN_BATCH_RETRY_DELAY:-60}
export CHURN_BATCH_CONFIG=${CHURN_BATCH_CONFIG:-$CHURN_BATCH_PROJECT/configs/default.toml}
export PATH="$CHURN_BATCH_VENV/bin:/usr/local/bin:/usr/bin:/bin"

# Exit codes of churn-batch that mean "try again later" (storage unavailable, date locked).
readonly RETRY_LATER_CODES=" 7 8 "
readonly BACKOFF_CAP_SECONDS=3600

JOB_NAME=""
JOB_LOG=""
JOB_EXIT=0
JOB_ATTEMPTS=0
JOB_STARTED=0
JOB_EXTRA_METRICS=""

# Prefix each line read from stdin with a UTC timestamp (bash's own strftime: no fork a line).
stamp() {
    local line
    while IFS= read -r line || [[ -n $line ]]; do
        printf '%(%Y-%m-%dT%H:%M:%SZ)T %s\n' -1 "$line"
    done
}

# One line in the job's log, from the wrapper itself.
note() {
    printf '%s\n' "jobs/$JOB_NAME: $*" | stamp >>"$JOB_LOG"
}

# "yesterday" / "today" as an ISO date (UTC), fixed once so that every retry and the
# metrics look-up mean the same day even past midnight; anything else is passed on
# unchanged for churn-batch to accept or refuse.
resolve_date() {
    case ${1,,} in
        today) date -u +%F ;;
        yesterday) date -u -d yesterday +%F ;;
        *) printf '%s\n' "$1" ;;
    esac
}

# Seconds to wait before retry number $1 (1-based): RETRY_DELAY * 2^(n-1), capped.
backoff_delay() {
    local n=$1 delay=$CHURN_BATCH_RETRY_DELAY
    while ((n > 1 && delay < BACKOFF_CAP_SECONDS)); do
        delay=$((delay * 2))
        n=$((n - 1))
    done
    ((delay > BACKOFF_CAP_SECONDS)) && delay=$BACKOFF_CAP_SECONDS
    printf '%d\n' "$delay"
}

# Start job $1: open its log, take its lock (exit 8 at once if a previous run of the same
# job still holds it: two nightly runs must never overlap).
job_start() {
    JOB_NAME=$1
    JOB_LOG=$CHURN_BATCH_LOG_DIR/$JOB_NAME.log
    JOB_STARTED=$(date +%s)
    if ! mkdir -p "$CHURN_BATCH_LOG_DIR" "$CHURN_BATCH_METRICS_DIR"; then
        printf 'churn-batch %s: cannot create %s or %s\n' "$JOB_NAME" \
            "$CHURN_BATCH_LOG_DIR" "$CHURN_BATCH_METRICS_DIR" >&2
        exit 1
    fi
    local lock=$CHURN_BATCH_LOG_DIR/$JOB_NAME.lock
    exec 9>>"$lock"
    if ! flock -n 9; then
        note "another $JOB_NAME job still holds $lock; not starting (exit 8)"
        printf 'churn-batch %s: another run still holds %s; skipped\n' "$JOB_NAME" "$lock" >&2
        exit 8
    fi
    if [[ ! -x $CHURN_BATCH_BIN ]]; then
        note "$CHURN_BATCH_BIN not found or not executable (set CHURN_BATCH_VENV or CHURN_BATCH_BIN)"
        JOB_EXIT=2
        job_end
    fi
}

# Run churn-batch with the given arguments, retrying only exit 7 and 8 with back-off.
run_with_retries() {
    local attempts=$((CHURN_BATCH_RETRIES + 1)) delay
    cd "$CHURN_BATCH_PROJECT" || return 1
    for ((JOB_ATTEMPTS = 1; ; JOB_ATTEMPTS++)); do
        note "attempt $JOB_ATTEMPTS of $attempts: churn-batch $*"
        "$CHURN_BATCH_BIN" "$@" < /dev/null 2>&1 | stamp >>"$JOB_LOG"
        JOB_EXIT=${PIPESTATUS[0]}
        if [[ $RETRY_LATER_CODES != *" $JOB_EXIT "* ]] || ((JOB_ATTEMPTS >= attempts)); then
            break
        fi
        delay=$(backoff_delay "$JOB_ATTEMPTS")
        note "exit $JOB_EXIT ($(exit_meaning "$JOB_EXIT")): retrying in ${delay}s"
        sleep "$delay"
    done
}

exit_meaning() {
    case $1 in
        0) if [[ $JOB_NAME == score ]]; then echo "published"; else echo "ok"; fi ;;
        1) echo "unexpected error" ;;
        2) echo "usage or config error" ;;
        3) echo "no snapshot rows for the date" ;;
        4) echo "input rejected by the contract" ;;
        5) echo "drift gate blocked publication" ;;
        6) echo "model missing or incompatible" ;;
        7) echo "storage unavailable, retry later" ;;
        8) echo "locked by another run, retry later" ;;
        129) echo "interrupted by SIGHUP, rolled back" ;;
        130) echo "interrupted by SIGINT, rolled back" ;;
        143) echo "interrupted by SIGTERM, rolled back" ;;
        *) echo "exit $1" ;;
    esac
}

# Add rows-scored / rows-rejected gauges from the latest run recorded for date $1.
collect_run_metrics() {
    local output parsed scored rejected rows_read status scratch
    scratch=$(mktemp "${TMPDIR:-/tmp}/churn-batch-runs.XXXXXX") || return 0
    "$CHURN_BATCH_BIN" runs --json --limit 1 --date "$1" >"$scratch.out" 2>"$scratch" </dev/null
    status=$?
    output=$(cat "$scratch.out")
    stamp <"$scratch" >>"$JOB_LOG"
    rm -f "$scratch" "$scratch.out"
    if ((status != 0)); then
        note "could not read the runs table for $1 (exit $status); no row metrics this time"
        return 0
    fi
    parsed=$(printf '%s\n' "$output" | head -n 1 | "$CHURN_BATCH_VENV/bin/python" -c '
import json, sys
try:
    run = json.loads(sys.stdin.read())
    print(*(int(run.get(key) or 0) for key in ("rows_scored", "rows_rejected", "rows_read")))
except (ValueError, AttributeError, TypeError):
    sys.exit(1)
')
    if [[ -z $parsed ]]; then
        note "no run recorded for $1 (or unreadable runs --json output); no row metrics this time"
        return 0
    fi
    read -r scored rejected rows_read <<<"$parsed"
    JOB_EXTRA_METRICS+=$(metric rows_scored "Rows scored by the latest run of the job's snapshot date." "$scored")$'\n'
    JOB_EXTRA_METRICS+=$(metric rows_rejected "Rows rejected by the data contract in that run." "$rejected")$'\n'
    JOB_EXTRA_METRICS+=$(metric rows_read "Snapshot rows read by that run." "$rows_read")$'\n'
}

# HELP, TYPE and one sample of a gauge named churn_batch_$1 for this job.
metric() {
    printf '# HELP churn_batch_%s %s\n# TYPE churn_batch_%s gauge\nchurn_batch_%s{job="%s"} %s\n' \
        "$1" "$2" "$1" "$1" "$JOB_NAME" "$3"
}

# Write the job's node_exporter textfile atomically (temp file + mv in the same directory).
write_metrics() {
    local file=$CHURN_BATCH_METRICS_DIR/churn_batch_$JOB_NAME.prom now tmp last_success=0
    now=$(date +%s)
    if ((JOB_EXIT == 0)); then
        last_success=$now
    elif [[ -f $file ]]; then
        # A failed run keeps the previous success time: alerts fire on its age.
        last_success=$(awk -v job="$JOB_NAME" \
            '$1 == "churn_batch_last_success_timestamp_seconds{job=\"" job "\"}" { print $2 }' \
            "$file")
        last_success=${last_success:-0}
    fi
    tmp=$(mktemp "$CHURN_BATCH_METRICS_DIR/.churn_batch_$JOB_NAME.prom.XXXXXX") || return 1
    # The collector reads only *.prom, so it never sees the file half-written.
    if {
        metric last_success_timestamp_seconds "Unix time of the job's last successful run." "$last_success"
        metric last_run_timestamp_seconds "Unix time the job's last run finished." "$now"
        metric last_exit_code "Exit code of the job's last run (0 = success)." "$JOB_EXIT"
        metric last_duration_seconds "Wall time of the job's last run, retries included." "$((now - JOB_STARTED))"
        metric last_attempts "Attempts the last run took (retries after exit 7 or 8)." "$JOB_ATTEMPTS"
        printf '%s' "$JOB_EXTRA_METRICS"
    } >"$tmp" && chmod 0644 "$tmp" && mv -f "$tmp" "$file"; then
        return 0
    fi
    rm -f "$tmp"
    note "could not write $file"
    return 1
}

# Finish: metrics, a closing log line, and under cron a short message on failure (cron
# mails a job's output to MAILTO); then exit with churn-batch's own code.
job_end() {
    local seconds=$(($(date +%s) - JOB_STARTED))
    write_metrics
    note "finished: exit $JOB_EXIT ($(exit_meaning "$JOB_EXIT")) after ${seconds}s"
    if ((JOB_EXIT != 0)); then
        {
            printf 'churn-batch %s failed: exit %s (%s). Last lines of %s:\n' \
                "$JOB_NAME" "$JOB_EXIT" "$(exit_meaning "$JOB_EXIT")" "$JOB_LOG"
            tail -n 20 "$JOB_LOG"
        } >&2
    fi
    exit "$JOB_EXIT"
}
