"""``search train``: from an exported plan to a trained model (the loop, and its output folder)."""
