"""The inference engine: scheduling, paged KV cache, models, attention backends.

Kept light on purpose: importing a submodule must not pull in torch-heavy siblings.
"""
