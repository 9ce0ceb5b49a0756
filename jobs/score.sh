#!/usr/bin/env bash
# Nightly scoring, called by cron:  jobs/score.sh [DATE] [churn-batch score options]
# DATE is YYYY-MM-DD, today or yesterday (UTC; default yesterday). Output goes to
# logs/score.log, metrics to logs/metrics/churn_batch_score.prom; exits with
# churn-batch's own code after retrying 7 (storage unavailable) and 8 (locked).

# shellcheck source=jobs/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

snapshot_date=$(resolve_date "${1:-yesterday}")
job_start score
run_with_retries score --date "$snapshot_date" "${@:2}"
collect_run_metrics "$snapshot_date"
job_end
