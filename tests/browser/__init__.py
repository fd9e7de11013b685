"""Helpers for the browser tests: a live uvicorn server and headless Debian Chromium via Playwright."""
