"""A study and its trials: running them (here or in worker processes), one trial, tuning, the trial record, reading results back, Optuna storage and the project's tables."""
