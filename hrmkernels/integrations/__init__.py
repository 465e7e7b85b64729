"""Integrations with training frameworks. ``import hrmkernels`` never imports them; each module
here imports its framework (hf: transformers) when it is itself imported."""
