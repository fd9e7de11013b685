"""SAM's prompt decoder in the browser: the annotate page's live mask preview and the review page's per-annotator
masks, in headless Chromium against a live server, equal to the worker's own decode.

Everything real: the sample CT, a real ``sam``-queue job publishing the LiteMedSAM embedding (one publish, the
review page reuses it), the served ONNX decoder run by the vendored onnxruntime-web (WebAssembly, under the
pages' CSP), and the worker engine's decode of the same prompts computed here for comparison.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from tests.browser.harness import LAPTOP, chromium, live_server
from tests.test_web_browser import Screen, draw, open_annotate, reference_box, shot, wait_js

pytestmark = [pytest.mark.browser, pytest.mark.model]

AGREEMENT = 0.99


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with live_server() as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium() as launched:
        yield launched


def new_page(browser, errors: list[str]):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport=LAPTOP)
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # Any CSP violation (a blocked script, WebAssembly compile, worker or fetch) fails the test.
    page.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    return page


def publish_when_asked(page, run_jobs, ready: str, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    """Run the ``sam`` queue (the page's embedding request put a job there) until ``ready`` matches."""
    deadline = time.monotonic() + timeout
    while page.locator(ready).count() == 0:
        run_jobs("sam")
        assert time.monotonic() < deadline, f"no {ready} after {timeout} s: {page.locator('#sam-status').inner_text()}"
        page.wait_for_timeout(200)


def worker_mask(volume_id: int, k: int, box: list[float], points: list[list[float]],
                labels: list[int]) -> np.ndarray:
    """The worker engine's decode of one prompt on slice k (its own embedding and decoder: workers/sam)."""
    from app.core.db import session_scope
    from app.core.storage import get_storage
    from app.datasets.models import Dataset
    from app.imaging.coords import display_slice
    from app.volumes.models import Volume
    from app.volumes.slices import canonical_array
    from workers.sam.decode import DecodePrompt
    from workers.sam.engine import get_engine

    with session_scope() as session:
        volume = session.get(Volume, volume_id)
        assert volume is not None
        dataset = session.get(Dataset, volume.dataset_id)
        assert dataset is not None and volume.canonical_key is not None
        window = (float(dataset.window_level), float(dataset.window_width))
        display = np.asarray(display_slice(canonical_array(get_storage(), volume.canonical_key), k))
    engine = get_engine("litemedsam")
    prompt = DecodePrompt(box=(box[0], box[1], box[2], box[3]), points=tuple((p[0], p[1]) for p in points),
                          point_labels=tuple(labels))
    h, w = display.shape[:2]
    _, masks = engine.backend.decode(engine.encode(display, window), [prompt], (h, w))
    return np.asarray(masks).astype(bool).reshape(h, w)


# The page's mask of one box: the alpha channel of its offscreen canvas (original_size, one pixel per display pixel).
PAGE_MASK = """(id) => {
  const r = window.crowdsamAnnotate.state.sam.results.get(id);
  const c = r.canvas;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const out = [];
  for (let i = 3; i < d.length; i += 4) out.push(d[i] > 0 ? 1 : 0);
  return {w: c.width, h: c.height, mask: out, key: r.key};
}"""

# True once the selected box's mask is decoded for its current prompt (nothing newer queued or running).
PREVIEW_CURRENT = """() => {
  const a = window.crowdsamAnnotate;
  const id = a.state.selected;
  const r = id && a.state.sam.results.get(id);
  return Boolean(r) && r.key === a.samKeyOf(id) && !a.state.sam.live.busy && a.state.sam.live.pending.size === 0;
}"""


def page_mask(page, box_id: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    got = page.evaluate(PAGE_MASK, box_id)
    return np.array(got["mask"], dtype=bool).reshape(got["h"], got["w"])


def agreement(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float((got == want).mean())


def test_preview_follows_the_box_equals_the_worker_and_review_shows_each_annotator(
    server, browser, client, tokens, dataset, sm_volume, run_jobs
) -> None:
    errors: list[str] = []
    page = new_page(browser, errors)
    volume_id, k = open_annotate(page, server, tokens.annotator, dataset["id"])
    # The task's embedding is asked for at once: 202 → "preparing", then the worker publishes it.
    wait_js(page, "document.querySelector('#sam-status').textContent.startsWith('Preparing SAM preview')")
    publish_when_asked(page, run_jobs, "#canvas[data-sam='ready']")
    screen = Screen(page, sm_volume["display_size"])

    # A liver box around the real liver (key 4 = liver): the overlay appears and equals the worker's decode.
    page.keyboard.press("4")
    x0, y0, x1, y1 = reference_box(k, 5)
    box = [x0 - 2, y0 - 2, x1 + 2, y1 + 2]
    draw(page, screen, box)
    wait_js(page, PREVIEW_CURRENT)
    box_id = page.evaluate("window.crowdsamAnnotate.state.selected")
    entry = page.evaluate("(id) => window.crowdsamAnnotate.state.boxes.find((b) => b.client_id === id)", box_id)
    sent_box = [round(v, 2) for v in entry["box"]]
    got = page_mask(page, box_id)
    want = worker_mask(volume_id, k, sent_box, [], [])
    liver_agreement = agreement(got, want)
    print(f"\nbox {sent_box}: page {int(got.sum())} px, worker {int(want.sum())} px, agreement {liver_agreement:.4f}")
    assert want.sum() > 50 and liver_agreement >= AGREEMENT

    # The mask is painted on the slice in the label's colour (semi-transparent): V hides it, V shows it again.
    from scipy.ndimage import binary_erosion

    rows, cols = np.nonzero(binary_erosion(got, iterations=2))
    row, col = int(rows[len(rows) // 2]), int(cols[len(cols) // 2])
    origin = page.locator("#canvas").bounding_box()
    sx, sy = screen.point(col + 0.5, row + 0.5)
    at = [round(sx - origin["x"]), round(sy - origin["y"])]
    read = "([x, y]) => Array.from(document.querySelector('#canvas').getContext('2d').getImageData(x, y, 1, 1).data)"
    shown = page.evaluate(read, at)
    page.keyboard.press("v")
    assert page.evaluate("window.crowdsamAnnotate.state.sam.visible") is False
    page.wait_for_timeout(150)
    hidden = page.evaluate(read, at)
    page.keyboard.press("v")
    assert page.evaluate("window.crowdsamAnnotate.state.sam.visible") is True
    colour = page.evaluate("window.crowdsamAnnotate.state.task.colors.liver")
    target = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    distance = lambda px: sum(abs(px[i] - target[i]) for i in range(3))  # noqa: E731
    assert distance(shown) < distance(hidden), (shown, hidden, colour)
    assert page.evaluate("window.crossOriginIsolated") is True  # COOP/COEP: the decoder may use threads

    # A negative point inside the box (key S, click): the preview includes it, still equal to the worker's.
    ys, xs = np.nonzero(want)
    negative = [round(float(np.median(xs)) + 0.5, 2), round(float(np.median(ys)) + 0.5, 2)]
    page.keyboard.press("s")
    page.mouse.click(*screen.point(*negative))
    page.keyboard.press("Escape")
    wait_js(page, PREVIEW_CURRENT)
    entry = page.evaluate("(id) => window.crowdsamAnnotate.state.boxes.find((b) => b.client_id === id)", box_id)
    assert len(entry["points"]) == 1 and entry["points"][0]["positive"] is False
    point = entry["points"][0]["point"]
    assert abs(point[0] - negative[0]) < 0.5 and abs(point[1] - negative[1]) < 0.5
    got_point = page_mask(page, box_id)
    want_point = worker_mask(volume_id, k, sent_box, [point], [0])
    point_agreement = agreement(got_point, want_point)
    print(f"box + negative point {point}: page {int(got_point.sum())} px, worker {int(want_point.sum())} px, "
          f"agreement {point_agreement:.4f}")
    assert point_agreement >= AGREEMENT and not np.array_equal(want_point, want), "the point must change the mask"

    page.wait_for_timeout(150)
    shot(page, "annotate-preview", doc=True)

    # Submit: the box and its point are stored; the worker's plan joins the point to the box — the same decode.
    page.click("#submit")
    wait_js(page, "document.querySelector('#status').textContent.startsWith('Saved')")
    stored = client.get(f"/api/v1/volumes/{volume_id}/prompts", headers=tokens.headers("researcher")).json()["items"]
    from workers.sam.plan import PromptIn, decode_items

    items = decode_items([PromptIn(p["annotator"], p["label"], p["kind"], tuple(p["box"] or p["point"]),
                                   bool(p["positive"]) if p["kind"] == "point" else True) for p in stored])
    assert len(items) == 1
    prompt = items[0].prompt
    assert list(prompt.box or ()) == sent_box and [list(p) for p in prompt.points] == [point]
    assert prompt.point_labels == (0,)
    assert not errors, f"JavaScript errors or CSP violations on the annotate page: {errors}"
    page.context.close()

    # Review: a second annotator's box on the same slice; "SAM per annotator" decodes each one's prompts
    # in the page (staff fetch the published embedding: no second publish).
    other = [x0 + 1, y0 + 1, x1 - 1, y1 - 1]
    posted = client.post(f"/api/v1/volumes/{volume_id}/prompts", headers=tokens.headers("annotator2"),
                         json={"boxes": [{"slice": k, "label": "liver", "box": other}]})
    assert posted.status_code == 201, posted.text
    page = new_page(browser, errors)
    page.goto(f"{server}/review/{volume_id}?slice={k}#token={tokens.researcher}")
    page.wait_for_selector(f"#canvas[data-ready='true'][data-slice='{k}']", timeout=20_000)
    page.check("#sam-annotators")
    page.wait_for_selector(f"#canvas[data-sam-slice='{k}']", timeout=60_000)
    masks = page.evaluate("""() => {
      const out = {};
      for (const item of window.crowdsamReview.state.sam.items) {
        const m = item.result.mask;
        out[item.annotator] = {w: item.result.width, h: item.result.height, mask: Array.from(m)};
      }
      return out;
    }""")
    assert set(masks) == {"annotator", "annotator2"}
    for name, (b, pts, labs) in {"annotator": (sent_box, [point], [0]), "annotator2": (other, [], [])}.items():
        m = masks[name]
        review_got = np.array(m["mask"], dtype=bool).reshape(m["h"], m["w"])
        review_agreement = agreement(review_got, worker_mask(volume_id, k, b, pts, labs))
        print(f"review, {name}: agreement {review_agreement:.4f}")
        assert review_agreement >= AGREEMENT
    page.wait_for_timeout(150)
    shot(page, "review-annotators", doc=True)
    assert not errors, f"JavaScript errors or CSP violations on the review page: {errors}"
    page.context.close()
