"""ml_collections config files, one per experiment family; ``common.base_config`` holds every
field and its default. Load one with ``--config pemn_jax/configs/NAME.py`` and override any field
as ``--config.model.dim=512``."""
