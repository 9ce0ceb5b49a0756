"""`python -m churn_batch` runs the CLI."""

from churn_batch.cli import main

main()
