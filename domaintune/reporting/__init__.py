"""What a run tells people: evaluation and training reports (``reports``), charts
(``charts``), model cards (``modelcard``) and experiment tracking (``tracking``)."""
