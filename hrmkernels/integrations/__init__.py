"""Integrations with training frameworks. ``import hrmkernels`` never imports them; each module
here imports its framework when it is itself imported (hf: transformers; trl: trl 1.16; data:
transformers, and datasets when a cache is built or checked)."""
