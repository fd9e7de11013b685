"""Developer tools that are not shipped: neither installed with the package nor copied into the images.

``python -m scripts.demo`` is ``make demo``.
"""
