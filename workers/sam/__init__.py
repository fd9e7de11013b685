"""SAM model registry, per-family preprocessing, embedding/decode caches and the segmentation engine.

Importing this package stays light (no torch) and has no side effects: ``registry`` is imported
by the API. The OpenMP thread policy is set by the processes that run models, at start-up
(``app.core.runtime.configure_process``).
"""
