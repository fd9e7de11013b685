"""SAM model registry, per-family preprocessing, embedding/decode caches and the segmentation engine.

Importing this package stays light (no torch): ``registry`` is imported by the API. The thread
policy must be in the environment before torch is first imported, so it is set here.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
