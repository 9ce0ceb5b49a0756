#!/usr/bin/env bash
# The HTML run report, called by cron after scoring:  jobs/report.sh [DATE]
# DATE is YYYY-MM-DD, today or yesterday (UTC; default yesterday). Writes
# reports/DATE/churn_report.{ipynb,html}; output goes to logs/report.log, metrics to
# logs/metrics/churn_batch_report.prom; exits with churn-batch's own code.

# shellcheck source=jobs/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

snapshot_date=$(resolve_date "${1:-yesterday}")
job_start report
run_with_retries report --date "$snapshot_date" "${@:2}"
job_end
