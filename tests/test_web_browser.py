"""End-to-end: the annotate and review pages in headless Chromium against a live server.

Everything real: uvicorn on a free port, PostgreSQL, Redis, LiteMedSAM for the mask; Playwright
only drives the browser (and, for the offline test, cuts the page's network).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from app.imaging.coords import display_slice, mask_bbox_display
from tests.browser.harness import LAPTOP, TABLET, chromium, live_server
from tests.conftest import ARTIFACTS, CT_DIR, ROOT

pytestmark = pytest.mark.browser

SHOTS = ARTIFACTS / "web"
DOCS_SHOTS = ROOT / "docs" / "screenshots"
OUTBOX = "crowdsam.outbox.v1"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with live_server() as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport=LAPTOP)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # The pages run under `Content-Security-Policy: default-src 'self'`: a blocked script, style or image fails.
    page.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page, name: str, *, doc: bool = False) -> Path:  # type: ignore[no-untyped-def]
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    # docs/screenshots/ holds one committed shot per page: refreshed when missing or on request,
    # so that a test run does not rewrite committed files (the images vary slightly run to run).
    target = DOCS_SHOTS / f"{name}.png"
    if doc and (not target.exists() or os.environ.get("CROWDSAM_UPDATE_SCREENSHOTS") == "1"):
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return path


def reference_box(k: int, value: int) -> tuple[float, float, float, float]:
    """Tight display box of reference label ``value`` on slice ``k`` of example_ct_sm (RAS on disk)."""
    seg = np.asarray(nib.as_closest_canonical(nib.load(CT_DIR / "example_seg.nii.gz")).dataobj)
    box = mask_bbox_display(display_slice(seg, k) == value)
    assert box is not None, f"label {value} absent from slice {k}"
    return box


def wait_js(page, expression: str, arg: object = None, timeout: float = 30_000) -> None:  # type: ignore[no-untyped-def]
    """Poll ``expression`` until truthy. Not ``page.wait_for_function``: its predicate is built with
    ``new Function`` inside the page, which the pages' CSP (no ``unsafe-eval``) rightly blocks."""
    from playwright.sync_api import Error as PlaywrightError

    deadline = time.monotonic() + timeout / 1000
    while True:
        try:
            if page.evaluate(expression, arg) if arg is not None else page.evaluate(expression):
                return
        except PlaywrightError as exc:  # the page navigated (e.g. reloaded itself) while we asked: ask again
            if "context was destroyed" not in str(exc):
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout / 1000:g} s waiting for {expression}")
        page.wait_for_timeout(50)


def open_annotate(page, server: str, token: str, dataset_id: int) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    page.goto(f"{server}/annotate?dataset={dataset_id}#token={token}")  # the fragment never reaches the server
    return wait_task(page)


def wait_task(page, previous: tuple[int, int] | None = None) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Wait until a slice image is shown (a different one than ``previous``); returns (volume, slice)."""
    page.wait_for_selector("#canvas[data-ready='true']", timeout=20_000)
    if previous is not None:
        wait_js(page,
            "([v, k]) => { const c = document.querySelector('#canvas'); return c.dataset.ready === 'true'"
            " && (c.dataset.volume !== String(v) || c.dataset.slice !== String(k)); }",
            arg=list(previous), timeout=20_000,
        )
    canvas = page.locator("#canvas")
    return int(canvas.get_attribute("data-volume")), int(canvas.get_attribute("data-slice"))


class Screen:
    """Independent model of the page's layout: the image is fitted into the canvas and centred."""

    def __init__(self, page, display_size: list[int], zoom: float = 1.0) -> None:  # type: ignore[no-untyped-def]
        box = page.locator("#canvas").bounding_box()
        width, height = display_size
        self.scale = min(box["width"] / width, box["height"] / height) * zoom  # zoom keeps the centre
        self.x = box["x"] + (box["width"] - width * self.scale) / 2
        self.y = box["y"] + (box["height"] - height * self.scale) / 2

    def point(self, x: float, y: float) -> tuple[float, float]:
        return self.x + x * self.scale, self.y + y * self.scale


def drag(page, start: tuple[float, float], end: tuple[float, float]) -> None:  # type: ignore[no-untyped-def]
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=8)
    page.mouse.up()


def draw(page, screen: Screen, box: list[float]) -> None:  # type: ignore[no-untyped-def]
    drag(page, screen.point(box[0], box[1]), screen.point(box[2], box[3]))


def my_prompts(client, tokens, volume_id: int, role: str = "annotator") -> list[dict]:  # type: ignore[no-untyped-def]
    response = client.get(f"/api/v1/volumes/{volume_id}/prompts", params={"limit": 1000},
                          headers=tokens.headers(role))
    assert response.status_code == 200, response.text
    return response.json()["items"]


def assert_box(stored: list[float], drawn: list[float]) -> None:
    assert len(stored) == 4
    assert max(abs(a - b) for a, b in zip(stored, drawn, strict=True)) <= 1.0, (stored, drawn)


def test_annotator_draws_moves_resizes_and_submits_boxes_in_display_pixels(
    server, page, client, tokens, dataset, sm_volume
) -> None:
    volume_id, k = open_annotate(page, server, tokens.annotator, dataset["id"])
    assert volume_id == sm_volume["id"]
    assert "token" not in page.url  # stripped from the address bar and history
    assert page.evaluate("sessionStorage.getItem('crowdsam.token')") == tokens.annotator
    screen = Screen(page, sm_volume["display_size"])
    assert screen.scale > 3, "the slice must be shown at a different scale than its pixels"

    # first organ by label value is preselected; draw a spleen box around the real spleen of this slice
    assert page.locator("input[name=organ]:checked").get_attribute("value") == "spleen"
    spleen_ref, liver_ref = reference_box(k, 1), reference_box(k, 5)
    spleen = [spleen_ref[0] - 0.5, spleen_ref[1] - 0.75, spleen_ref[2] + 0.75, spleen_ref[3] + 0.5]
    draw(page, screen, spleen)
    # number key 4 → liver (labels sorted by value: spleen, kidney_right, kidney_left, liver, aorta)
    page.keyboard.press("4")
    assert page.locator("input[name=organ]:checked").get_attribute("value") == "liver"
    x0, y0, x1, y1 = liver_ref
    first = [x0 - 5, y0 - 3, x1 - 9, y1 - 10]
    draw(page, screen, first)
    # move it by (+5, +3) from its middle, then drag its bottom-right corner onto the liver's
    middle = ((first[0] + first[2]) / 2, (first[1] + first[3]) / 2)
    drag(page, screen.point(*middle), screen.point(middle[0] + 5, middle[1] + 3))
    drag(page, screen.point(x1 - 4, y1 - 7), screen.point(x1, y1))
    liver = list(liver_ref)
    # a third box outside the body, deleted again with the Delete key
    page.keyboard.press("5")
    draw(page, screen, [2, 2, 12, 10])
    assert page.locator("#box-list li").count() == 3
    page.keyboard.press("Delete")
    assert page.locator("#box-list li").count() == 2
    # a click-sized drag is not a box
    drag(page, screen.point(115, 5), screen.point(115.2, 5.2))
    assert page.locator("#box-list li").count() == 2
    shot(page, "annotate-laptop", doc=True)

    page.click("#submit")
    wait_js(page, "document.querySelector('#status').textContent.startsWith('Saved')")
    next_task = wait_task(page, (volume_id, k))
    assert page.locator("#done").inner_text() == "1 slice done"

    stored = {p["label"]: p for p in my_prompts(client, tokens, volume_id)}
    assert set(stored) == {"spleen", "liver"}
    assert_box(stored["spleen"]["box"], spleen)
    assert_box(stored["liver"]["box"], liver)
    assert all(p["slice"] == k and p["annotator"] == "annotator" and p["client_id"] for p in stored.values())
    assert stored["spleen"]["client_id"] != stored["liver"]["client_id"]

    # tablet: another scale again, touch-friendly layout; draw with key 3 = kidney_left
    page.set_viewport_size(TABLET)
    page.wait_for_timeout(300)
    tablet = Screen(page, sm_volume["display_size"])
    assert abs(tablet.scale - screen.scale) > 0.5
    page.keyboard.press("3")
    kidney = [30, 40, 52.5, 66]
    draw(page, tablet, kidney)
    shot(page, "annotate-tablet")
    page.click("#submit")
    wait_js(page, "document.querySelector('#done').textContent === '2 slices done'")
    stored2 = [p for p in my_prompts(client, tokens, volume_id) if p["label"] == "kidney_left"]
    assert len(stored2) == 1 and stored2[0]["slice"] == next_task[1]
    assert_box(stored2[0]["box"], kidney)


def test_zoomed_view_and_bone_window_keep_display_coordinates(server, page, client, tokens, dataset, sm_volume) -> None:
    volume_id, k = open_annotate(page, server, tokens.annotator, dataset["id"])
    with page.expect_request(lambda r: f"/slices/{k}.png" in r.url and "level=400" in r.url and "width=1800" in r.url):
        page.get_by_label("Window").select_option(label="Bone (L400 W1800)")
    page.locator("#canvas").focus()
    page.keyboard.press("+")
    page.keyboard.press("+")
    assert page.locator("#zoom-level").inner_text() == "156%"
    screen = Screen(page, sm_volume["display_size"], zoom=1.25 * 1.25)
    page.keyboard.press("5")
    aorta = [55.5, 45.25, 66.75, 57]
    draw(page, screen, aorta)
    page.click("#submit")
    wait_js(page, "document.querySelector('#done').textContent === '1 slice done'")
    wait_task(page, (volume_id, k))
    stored = my_prompts(client, tokens, volume_id)
    assert [p["label"] for p in stored] == ["aorta"] and stored[0]["slice"] == k
    assert_box(stored[0]["box"], aorta)


def test_touch_draws_a_box_on_a_tablet(server, browser, client, tokens, dataset, sm_volume) -> None:
    context = browser.new_context(viewport=TABLET, has_touch=True, is_mobile=True)
    try:
        page = context.new_page()
        volume_id, k = open_annotate(page, server, tokens.annotator, dataset["id"])
        screen = Screen(page, sm_volume["display_size"])
        assert page.evaluate("getComputedStyle(document.querySelector('#canvas')).touchAction") == "none"
        cdp = context.new_cdp_session(page)
        box = [40, 30, 75.5, 62]
        points = [screen.point(box[0] + (box[2] - box[0]) * t, box[1] + (box[3] - box[1]) * t)
                  for t in (0, 0.25, 0.5, 0.75, 1)]
        for i, (x, y) in enumerate(points):
            kind = "touchStart" if i == 0 else "touchMove"
            cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": x, "y": y}]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        assert page.locator("#box-list li").count() == 1
        # (a tap right after scrolling the tools panel only stops the scroll, as on any phone: click it)
        page.get_by_role("button", name="Submit boxes").click()
        wait_js(page, "document.querySelector('#done').textContent === '1 slice done'")
        wait_task(page, (volume_id, k))
        stored = my_prompts(client, tokens, volume_id)
        assert len(stored) == 1 and stored[0]["label"] == "spleen"
        assert_box(stored[0]["box"], box)
    finally:
        context.close()


def test_sign_in_form_and_nothing_here(server, page, client, tokens, dataset, sm_volume) -> None:
    page.goto(f"{server}/annotate?dataset={dataset['id']}")
    page.get_by_label("Access token").fill("csam_wrong")
    page.get_by_role("button", name="Start annotating").click()
    wait_js(page, "document.querySelector('#login-error').textContent.includes('not accepted')")
    page.get_by_label("Access token").fill(tokens.annotator)
    page.get_by_role("button", name="Start annotating").click()
    volume_id, k = wait_task(page)
    assert page.locator("#submit").is_disabled()  # nothing drawn: only "nothing here" is possible
    page.get_by_role("button", name="Nothing of these organs here").click()
    wait_task(page, (volume_id, k))
    assert page.locator("#done").inner_text() == "1 slice done"
    assert my_prompts(client, tokens, volume_id) == []
    coverage = client.get(f"/api/v1/volumes/{volume_id}/coverage", headers=tokens.headers("researcher")).json()
    rows = {row["slice"]: row for row in coverage["slices"]}
    assert rows[k]["seen_by"] == 1 and not any(c["prompts"] for c in rows[k]["labels"].values())


def test_token_in_a_query_is_refused_and_the_fragment_is_stripped(server, page, tokens, dataset) -> None:
    csp = page.goto(f"{server}/annotate?dataset={dataset['id']}").headers["content-security-policy"]
    assert csp.startswith("default-src 'self'")
    page.goto(f"{server}/annotate?token={tokens.annotator}&dataset={dataset['id']}")
    wait_js(page, "document.querySelector('#login-error').textContent.includes('#token=')")
    assert page.locator("#login").is_visible() and not page.locator("#workspace").is_visible()
    assert tokens.annotator not in page.url and "token" not in page.url and f"dataset={dataset['id']}" in page.url
    assert page.evaluate("sessionStorage.getItem('crowdsam.token')") is None  # never kept
    assert tokens.annotator not in page.content()  # never echoed

    page.goto(f"{server}/annotate?dataset={dataset['id']}#token={tokens.annotator}")
    wait_js(page, "!location.hash && sessionStorage.getItem('crowdsam.token') !== null")
    page.wait_for_selector("#workspace:not([hidden])")
    assert "token" not in page.url
    assert page.evaluate("sessionStorage.getItem('crowdsam.token')") == tokens.annotator  # the tab only
    assert page.evaluate("localStorage.getItem('crowdsam.token')") is None


def test_submit_survives_a_cut_network_and_a_reload_without_duplicates(
    server, page, client, tokens, dataset, sm_volume
) -> None:
    volume_id, _ = open_annotate(page, server, tokens.annotator, dataset["id"])
    screen = Screen(page, sm_volume["display_size"])
    draw(page, screen, [10, 10, 40, 40])
    page.keyboard.press("4")
    draw(page, screen, [50, 20, 100, 70])

    calls: list[str] = []

    def flaky(route) -> None:  # type: ignore[no-untyped-def]
        if route.request.method != "POST":
            route.continue_()
            return
        calls.append(route.request.post_data or "")
        if len(calls) == 2:
            route.fetch()  # the server stores the boxes, but the answer is lost on the way back
        route.abort("internetdisconnected")

    page.route("**/api/v1/volumes/*/prompts", flaky)
    page.click("#submit")
    assert page.locator("#submit").is_disabled()  # no second submission while one is in flight
    wait_js(page, "document.querySelector('#status').textContent.startsWith('Offline')")
    deadline = time.monotonic() + 20
    while len(calls) < 3 and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert len(calls) >= 3, "the page must retry with backoff"
    assert len(my_prompts(client, tokens, volume_id)) == 2  # the lost answer: stored once already
    bodies = [json.loads(body) for body in calls]
    assert all(body == bodies[0] for body in bodies), "retries resend the same client_ids"
    assert len(page.evaluate(f"JSON.parse(localStorage.getItem('{OUTBOX}'))")) == 1

    # the connection comes back; the annotator reloads: the saved submission is sent once more
    page.unroute("**/api/v1/volumes/*/prompts")
    page.reload()
    wait_js(page, f"JSON.parse(localStorage.getItem('{OUTBOX}') || '[]').length === 0", timeout=20_000)
    wait_task(page)
    stored = my_prompts(client, tokens, volume_id)
    assert len(stored) == 2
    assert sorted(p["client_id"] for p in stored) == sorted(b["client_id"] for b in bodies[0]["boxes"])
    assert {p["label"] for p in stored} == {"spleen", "liver"}


def _liver_display_mask(volume: dict, k: int) -> np.ndarray:
    """The reference liver on display slice k, computed here from the files (not by the service)."""
    import nibabel as nib

    from app.imaging.coords import display_slice
    from tests.conftest import CT_DIR

    seg = nib.as_closest_canonical(nib.load(CT_DIR / "example_seg.nii.gz"))
    return display_slice(np.asarray(seg.dataobj), k) == 5


def test_review_page_overlays_the_mask(server, page, client, tokens, dataset, sm_volume, run_jobs) -> None:
    from app.imaging.coords import mask_bbox_display

    volume_id = sm_volume["id"]
    areas = [(k, int(_liver_display_mask(sm_volume, k).sum())) for k in range(sm_volume["n_slices"])]
    k = max(areas, key=lambda a: a[1])[0]
    boxes = []
    for annotator, slice_k in (("annotator", k), ("annotator", k - 2), ("annotator2", k)):
        box = mask_bbox_display(_liver_display_mask(sm_volume, slice_k))
        assert box is not None
        body = {"boxes": [{"slice": slice_k, "label": "liver", "box": list(box)}]}
        response = client.post(f"/api/v1/volumes/{volume_id}/prompts", json=body, headers=tokens.headers(annotator))
        assert response.status_code == 201, response.text
        boxes.append(box)
    response = client.post(f"/api/v1/volumes/{volume_id}/segmentations", json={"model": "litemedsam"},
                           headers=tokens.headers("researcher"))
    assert response.status_code == 202, response.text
    seg_id = response.json()["id"]
    run_jobs("sam")
    seg = client.get(f"/api/v1/segmentations/{seg_id}", headers=tokens.headers("researcher")).json()
    assert seg["status"] == "finished", seg
    mask_png = client.get(f"/api/v1/segmentations/{seg_id}/slices/{k}.png", params={"mode": "mask"},
                          headers=tokens.headers("researcher"))
    alpha = np.asarray(Image.open(io.BytesIO(mask_png.content)).convert("RGBA"))[..., 3] > 0
    assert alpha.sum() > 100

    page.goto(f"{server}/review/{volume_id}?slice={k}#token={tokens.researcher}")
    page.wait_for_selector(f"#canvas[data-ready='true'][data-slice='{k}']", timeout=20_000)
    assert "token" not in page.url
    assert page.locator("#segmentation").input_value() == str(seg_id)
    assert page.locator("#annotators .annotator").count() == 2
    page.wait_for_timeout(200)
    shot(page, "review-laptop", doc=True)

    screen = Screen(page, sm_volume["display_size"])
    inside = _pixels(alpha, erode=2)
    outside = _pixels(~_dilate(alpha, 6) & _box_free(alpha.shape, boxes), erode=0)
    page.uncheck("#show-prompts")  # only the mask may colour the image now
    page.wait_for_timeout(200)
    image = _screenshot(page)
    assert _coloured(image, screen, inside) > 0.9, "mask pixels must be coloured"
    assert _coloured(image, screen, outside) < 0.02, "no colour outside the mask"

    # the liver toggle hides the overlay again: the colour came from the mask
    page.locator(".mask-label", has_text="liver").locator("input").uncheck()
    page.wait_for_timeout(300)
    assert _coloured(_screenshot(page), screen, inside) < 0.02

    # slice scroller: keyboard on the range input moves the slice
    page.focus("#slice")
    page.keyboard.press("ArrowLeft")
    page.wait_for_selector(f"#canvas[data-ready='true'][data-slice='{k - 1}']")
    page.set_viewport_size(TABLET)
    page.locator(".mask-label", has_text="liver").locator("input").check()
    page.check("#show-prompts")
    page.fill("#slice", str(k))
    page.wait_for_selector(f"#canvas[data-ready='true'][data-slice='{k}']")
    page.wait_for_timeout(300)
    shot(page, "review-tablet")


def _pixels(mask: np.ndarray, erode: int) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    kept = binary_erosion(mask, iterations=erode) if erode else mask
    ys, xs = np.nonzero(kept)
    pick = np.linspace(0, len(xs) - 1, min(200, len(xs))).astype(int)
    return np.stack([xs[pick], ys[pick]], axis=1)


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=iterations)


def _box_free(shape: tuple[int, ...], boxes: list) -> np.ndarray:  # type: ignore[type-arg]
    free = np.ones(shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        free[max(0, int(y0) - 3): int(y1) + 4, max(0, int(x0) - 3): int(x1) + 4] = False
    return free


def _screenshot(page) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(int)


def _coloured(image: np.ndarray, screen: Screen, pixels: np.ndarray) -> float:
    """Share of display pixels (their centres on screen) whose RGB is clearly not grey."""
    hits = 0
    for x, y in pixels:
        sx, sy = screen.point(x + 0.5, y + 0.5)
        rgb = image[int(sy), int(sx)]
        hits += int(rgb.max() - rgb.min() > 25)
    return hits / len(pixels)
