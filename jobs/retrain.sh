#!/usr/bin/env bash
# Weekly retrain, called by cron:  jobs/retrain.sh [churn-batch train options]
# Registers a new model version and promotes it to champion only if it beats the
# current champion on the same holdout (`churn-batch train --promote`). Output goes to
# logs/retrain.log, metrics to logs/metrics/churn_batch_retrain.prom.

# shellcheck source=jobs/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

job_start retrain
run_with_retries train --promote "$@"
job_end
