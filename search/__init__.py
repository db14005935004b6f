"""The search: Optuna studies over reduction plans, persisted in SQL, driven from the command line."""

__version__ = "0.1.0"
