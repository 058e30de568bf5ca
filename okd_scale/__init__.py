"""okd_scale: Online Knowledge Distillation of autoregressive language models at DeepSpeed scale."""

__version__ = "0.1.0"
