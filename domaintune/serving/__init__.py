"""Using a trained model: predictions for raw input (``predict``; the task types compute
them) and the HTTP model server (``serve``)."""
