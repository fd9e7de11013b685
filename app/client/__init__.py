"""``crowdsam client``: a researcher's command line over the public HTTP API (httpx + rich)."""
