"""What users see: terminal tables and progress, optuna-dashboard notes and pictures, plots."""
