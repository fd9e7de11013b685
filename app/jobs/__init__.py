"""One job lifecycle for every kind of job (segmentation, export, evaluation, any later kind).

- :mod:`app.jobs.states`    — states, the shared row columns, the shared API fields
- :mod:`app.jobs.kinds`     — what differs per kind (row, queue, entry point, retries, typed params)
- :mod:`app.jobs.submit`    — submit after the commit, cancel (API side)
- :mod:`app.jobs.runner`    — one attempt: transitions, progress, cancel, retries, dead workers (worker side)
- :mod:`app.jobs.reconcile` — rows and RQ agree again after crashes and Redis restarts
"""
