"""Architecture adapters: one small module per family turns a checkpoint into ``Canonical``."""
