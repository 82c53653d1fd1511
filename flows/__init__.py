"""Prefect flows: wiring only. The logic lives in ``tasks/`` (the stages)."""
