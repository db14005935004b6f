"""Setting up what every command runs on: the configuration, its budget, data, base models, the workbench (device, data, model, width cut) and scoring."""
