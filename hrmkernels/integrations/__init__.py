"""Integrations with training frameworks. ``import hrmkernels`` never imports them; each module
here imports its framework when it is itself imported (hf: transformers; trl: trl 1.16)."""
