"""RQ entry points (thin): each takes ids, opens its own DB session and delegates to a runner."""
