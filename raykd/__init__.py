"""raykd: feature-alignment knowledge distillation of causal LMs on Ray."""

__version__ = "0.1.0"
