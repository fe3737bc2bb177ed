"""Integrations with training frameworks. Each submodule imports its framework; this package does not.

Every integration translates its framework's events into the library's calls: build the allocator with T, apply the
regulariser (``allocator.add_regularization_gradient()``), step the allocator once per optimizer step, save and
restore its state.

- :mod:`adalora.integrations.loop`: the plain PyTorch loop (``fit``);
- :mod:`adalora.integrations.trainer`: Hugging Face ``transformers.Trainer`` and its subclasses (TRL, Seq2Seq,
  sentence-transformers' trainer): ``AdaLoRACallback``, ``AdaLoRATrainer``;
- :mod:`adalora.integrations.sentence_transformers`: saving sentence-transformers models that hold adapters;
- :mod:`adalora.integrations.lightning`: a Lightning callback.

What the allocator itself reports when it is stepped wrongly (per micro-batch, forgotten, behind a wrapped optimizer)
or when adapters get no gradient is in :mod:`adalora.misuse`, below the allocator.
"""
