"""Search spaces: an Optuna trial, a model geometry and a FLOPs target in, a ReductionPlan out."""
