"""kdcore: knowledge distillation for online ranking (no Airflow imports here)."""

__version__ = "0.1.0"
