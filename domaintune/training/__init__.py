"""Training runs here, in child processes started by the DeepSpeed launcher."""
