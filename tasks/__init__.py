"""The stages of the retraining DAG, as plain functions of (config, manifests) -> manifest.

Each module holds one stage: ``ingest``, ``validate``, ``preprocess``, ``finetune``,
``evaluate``, ``register``. They run and are tested without Prefect; ``flows/retrain.py``
wraps them as Prefect tasks.
"""
