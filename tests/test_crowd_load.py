"""200 annotators against a real ``crowdsam serve``: with cut-off requests and retries, no 5xx, nothing lost
or stored twice (the database is checked against every acknowledged client_id). No timing asserts."""

from __future__ import annotations

import asyncio
import os

from bench.crowd_load import CT_DIR, LoadConfig, create_dataset, make_tokens, report, run_load, serve, verify
from tests.services import _libpq


def test_a_crowd_of_200_loses_nothing_and_stores_nothing_twice(tmp_path) -> None:
    researcher, annotators = make_tokens(20)
    with serve(os.environ, log=tmp_path / "api.log") as server:
        base = server.base
        dataset_id, _ = create_dataset(base, researcher, "crowd", CT_DIR / "example_ct_sm.nii.gz", copies=3,
                                       annotators=[name for name, _ in annotators])
        cfg = LoadConfig(clients=200, actions=2, think_s=0.2, seed=1)
        stats, ledger = asyncio.run(run_load(base, annotators, dataset_id, cfg))
    lost, duplicated = verify(_libpq(os.environ["DATABASE_URL"]), ledger, [name for name, _ in annotators])
    print("\n".join(report(stats, ledger, lost, duplicated, cfg.clients)))

    assert stats.errors_5xx == 0, (tmp_path / "api.log").read_text()[-3000:]
    assert lost == 0 and duplicated == 0
    assert not ledger.bad_answers
    assert stats.gave_up == 0
    assert stats.tasks == cfg.clients * cfg.actions
    assert ledger.acked and ledger.retried  # boxes were stored, and cut-off requests were retried
