"""SAM per-family preprocessing, embedding/decode caches and the segmentation engine (worker side).

The model registry (names, checkpoints; torch-free) is ``app.segmentations.registry``: the API
imports it, never this package. Importing this package has no side effects; the OpenMP thread policy
is set by the processes that run models, at start-up (``app.core.runtime.configure_process``).
"""
