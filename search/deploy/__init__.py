"""Using a plan: ``search validate``, ``search bench`` and deployable programs."""
