"""Integrations with training frameworks. Each submodule imports its framework; this package does not.

- :mod:`adalora.integrations.trainer`: Hugging Face ``transformers.Trainer`` (``AdaLoRATrainer``,
  ``AdaLoRACallback``).
- The plain PyTorch loop lives in :mod:`adalora.training`.
"""
