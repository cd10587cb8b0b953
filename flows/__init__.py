"""Prefect flows of the pipeline and their deployments (prefect.yaml at the repository root)."""
