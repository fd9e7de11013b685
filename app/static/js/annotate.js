// The crowd annotation page: get a slice from GET /api/v1/tasks/next, draw boxes, submit them.
import { API, ApiError, describe } from './api.js';
import { CURSORS, clampBox, dragBox, hitTest, normalize, roundBox } from './geometry.js';
import { Outbox, ownerTag } from './outbox.js';
import { $, bindZoomButtons, onKeys, setStatus, showLogin, signInAgain, startPage, wheelZoom } from './page.js';
import { LivePreview, decode, getDecoder, getEmbedding, groupPrompts, loadOrt, maskCanvas, promptKey } from './sam.js';
import { uuid } from './uuid.js';
import { View } from './view.js';

const DATASET_KEY = 'crowdsam.dataset';
const MIN_BOX_SCREEN_PX = 4;

const state = {
  api: null,
  outbox: null,
  datasets: [],
  datasetId: null,
  task: null,
  labels: [], // [name, value] sorted by value
  colors: {},
  organ: null,
  boxes: [], // {client_id, label, box, points: [{point: [x, y], positive, client_id}]}
  selected: null, // client_id
  busy: false,
  done: 0,
  drag: null,
  panMode: false,
  spaceHeld: false,
  pointMode: null, // 'add' | 'sub' | null: clicks put positive/negative points into a box
  sam: {
    model: samModel(), // ?sam=<model> (default litemedsam), ?sam=off: no preview
    visible: true,
    embedding: null, // the current task's, once it and its decoder are loaded
    results: new Map(), // box client_id (or 'drawing') -> {key, label, canvas, result, askedAt, decodedAt}
    unpainted: [],
    live: null,
    timings: null, // what loading the current preview took (bench/web_decoder.py reads it)
  },
};

function samModel() {
  const wanted = new URL(window.location.href).searchParams.get('sam');
  if (wanted === 'off') return null;
  return wanted && /^[A-Za-z0-9_.-]{1,64}$/.test(wanted) ? wanted : 'litemedsam';
}

const canvas = $('canvas');
const view = new View(canvas, drawOverlay);
view.onChange(() => {
  $('zoom-level').textContent = `${Math.round(view.zoom * 100)}%`;
});

// ---------------------------------------------------------------- start-up

/** The first request with a token: the datasets it may annotate (throws when the token is refused). */
async function load(api) {
  state.api = api;
  state.outbox = new Outbox(api, ownerTag(api.token), onOutboxEvent);
  state.datasets = await api.json('datasets');
  const threads = Number(new URL(window.location.href).searchParams.get('sam_threads')) || undefined;
  if (state.sam.model) loadOrt(threads).catch(() => {}); // load the runtime while the first task loads
}

/** The workspace shows: choose the dataset, send what an earlier visit kept, then the first task. */
async function show() {
  chooseDataset();
  if (state.outbox.pending().length) {
    setStatus('Sending boxes saved earlier…');
    const ok = await sendOutbox();
    if (!ok) return;
  }
  await nextTask();
}

function chooseDataset() {
  const select = $('dataset');
  select.replaceChildren(
    ...state.datasets.map((d) => new Option(`${d.name} (#${d.id})`, String(d.id))),
  );
  const wanted = new URL(window.location.href).searchParams.get('dataset') || sessionStorage.getItem(DATASET_KEY);
  const ids = state.datasets.map((d) => String(d.id));
  const chosen = ids.includes(wanted) ? wanted : ids[0];
  if (chosen) select.value = chosen;
  state.datasetId = chosen ? Number(chosen) : null;
  if (chosen) sessionStorage.setItem(DATASET_KEY, chosen);
}

$('dataset').addEventListener('change', async () => {
  state.datasetId = Number($('dataset').value);
  sessionStorage.setItem(DATASET_KEY, String(state.datasetId));
  await nextTask();
});

// ---------------------------------------------------------------- tasks and slice images

async function nextTask() {
  state.task = null;
  state.boxes = [];
  state.selected = null;
  resetSam();
  canvas.dataset.ready = 'false';
  refreshControls();
  $('empty').hidden = true;
  if (state.datasetId === null) {
    $('task-info').textContent = 'No dataset is open for annotation yet.';
    return;
  }
  $('task-info').textContent = 'Fetching the next slice…';
  let task;
  try {
    // ahead=1: the task after this one is leased too (`next`), so its embedding and image load in the background.
    task = await state.api.json('tasks/next', { query: { dataset: state.datasetId, ahead: 1 } });
  } catch (error) {
    $('task-info').textContent = `Could not get a slice: ${describe(error)}`;
    if (error instanceof ApiError && error.auth) showLogin(describe(error));
    return;
  }
  if (!task) {
    view.setImage(null);
    $('empty').hidden = false;
    $('task-info').textContent = 'No slice to annotate.';
    $('again').focus();
    return;
  }
  state.task = task;
  state.done = task.done ?? state.done;
  showDone();
  state.labels = Object.entries(task.labels).sort((a, b) => a[1] - b[1]);
  state.colors = task.colors || {};
  buildOrganPicker();
  $('task-info').textContent = `Case ${task.case_id}, slice ${task.slice}. Draw a box around every listed organ you see.`;
  startSam(task); // the embedding is asked for as soon as the task is handed, alongside the slice image
  await loadImage(false);
  refreshControls();
}

const ahead = { key: null, bitmap: null }; // the next task's slice image, fetched in the background

function imageKey(url) {
  return `${url}|${$('window').value}`;
}

/** Fetch the next task's embedding (into sam.js's cache) and its slice image while this task is worked on. */
function prefetch(next, embedding) {
  if (!next || state.api === null) return;
  if (embedding && state.sam.model) getEmbedding(state.api, next.volume_id, next.slice, state.sam.model).catch(() => {});
  const key = imageKey(next.slice_url);
  if (ahead.key === key) return;
  if (ahead.bitmap) ahead.bitmap.then((b) => b.close(), () => {});
  const [level, width] = ($('window').value || ',').split(',');
  Object.assign(ahead, { key, bitmap: state.api.bitmap(next.slice_url, { level, width }) });
  ahead.bitmap.catch(() => {});
}

async function loadImage(keepView) {
  const task = state.task;
  if (!task) return;
  const [level, width] = ($('window').value || ',').split(',');
  const fetchImage = () => state.api.bitmap(task.slice_url, { level, width });
  const early = ahead.key === imageKey(task.slice_url) ? ahead.bitmap.catch(fetchImage) : null;
  if (early) Object.assign(ahead, { key: null, bitmap: null });
  try {
    const bitmap = await (early || fetchImage());
    if (state.task !== task) return;
    const previous = view.image;
    view.setImage(bitmap, { keepView });
    if (previous && previous !== bitmap) previous.close();
    Object.assign(canvas.dataset, { volume: String(task.volume_id), slice: String(task.slice), ready: 'true' });
  } catch (error) {
    setStatus(`Could not load the slice image: ${describe(error)}`, true);
  }
}

$('window').addEventListener('change', () => loadImage(true));
$('again').addEventListener('click', () => nextTask());

function showDone() {
  $('done').textContent = `${state.done} slice${state.done === 1 ? '' : 's'} done`;
}

// ---------------------------------------------------------------- organ picker

function buildOrganPicker() {
  const fieldset = $('organs');
  const legend = fieldset.querySelector('legend');
  const names = state.labels.map(([name]) => name);
  if (!names.includes(state.organ)) state.organ = names[0] ?? null;
  fieldset.replaceChildren(
    legend,
    ...state.labels.map(([name], index) => {
      const label = document.createElement('label');
      label.className = 'organ';
      const input = document.createElement('input');
      input.type = 'radio';
      input.name = 'organ';
      input.value = name;
      input.checked = name === state.organ;
      input.addEventListener('change', () => selectOrgan(name));
      const swatch = document.createElement('span');
      swatch.className = 'swatch';
      swatch.style.background = colorOf(name);
      const text = document.createElement('span');
      text.textContent = name.replaceAll('_', ' ');
      label.append(input, swatch, text);
      if (index < 9) {
        const key = document.createElement('kbd');
        key.textContent = String(index + 1);
        key.setAttribute('aria-label', `key ${index + 1}`);
        label.append(key);
      }
      return label;
    }),
  );
}

function selectOrgan(name) {
  state.organ = name;
  for (const input of document.querySelectorAll('input[name="organ"]')) input.checked = input.value === name;
  view.render();
}

function colorOf(name) {
  return state.colors[name] || '#ffffff';
}

// ---------------------------------------------------------------- boxes: drawing and editing

function selectedBox() {
  return state.boxes.find((b) => b.client_id === state.selected) || null;
}

function addBox(box, label = state.organ) {
  const entry = { client_id: uuid(), label, box: clampBox(box, view.w, view.h), points: [] };
  state.boxes.push(entry);
  state.selected = entry.client_id;
  refreshControls();
  return entry;
}

function deleteSelected() {
  if (!state.selected || state.busy) return;
  state.boxes = state.boxes.filter((b) => b.client_id !== state.selected);
  state.selected = null;
  refreshControls();
}

function tolerance(pointerType) {
  return (pointerType === 'touch' ? 16 : 8) / view.scale;
}

/** The box and handle under display point (x, y): the selected box first, then the topmost. */
function hit(x, y, pointerType) {
  const tol = tolerance(pointerType);
  const order = [...state.boxes].reverse();
  const sel = selectedBox();
  if (sel) order.unshift(sel);
  for (const entry of order) {
    const handle = hitTest(entry.box, x, y, tol);
    if (handle) return { entry, handle };
  }
  return null;
}

canvas.addEventListener('pointerdown', (event) => {
  if (!state.task || !view.image || state.busy || state.drag) return;
  if (event.pointerType === 'mouse' && event.button !== 0 && event.button !== 1) return;
  canvas.focus({ preventScroll: true });
  canvas.setPointerCapture(event.pointerId);
  event.preventDefault();
  const [x, y] = view.toDisplay(event.clientX, event.clientY);
  const base = { id: event.pointerId, startX: x, startY: y, clientX: event.clientX, clientY: event.clientY };
  if (state.panMode || state.spaceHeld || event.button === 1) {
    state.drag = { ...base, kind: 'pan' };
    return;
  }
  if (state.pointMode) {
    placePoint(x, y, event.pointerType, event.shiftKey);
    return;
  }
  const found = hit(x, y, event.pointerType);
  if (found) {
    state.selected = found.entry.client_id;
    state.drag = {
      ...base, kind: 'edit', entry: found.entry, handle: found.handle, original: found.entry.box,
      originalPoints: found.entry.points.map((p) => p.point),
    };
  } else {
    state.selected = null;
    const px = Math.min(view.w, Math.max(0, x));
    const py = Math.min(view.h, Math.max(0, y));
    state.drag = { ...base, kind: 'draw', box: [px, py, px, py] };
  }
  refreshControls();
});

canvas.addEventListener('pointermove', (event) => {
  const drag = state.drag;
  if (!drag) {
    if (!view.image) return;
    const [x, y] = view.toDisplay(event.clientX, event.clientY);
    const found = state.panMode || state.spaceHeld || state.pointMode ? null : hit(x, y, event.pointerType);
    canvas.style.cursor = state.panMode || state.spaceHeld ? 'grab' : state.pointMode ? 'copy'
      : found ? CURSORS[found.handle] : 'crosshair';
    return;
  }
  if (event.pointerId !== drag.id) return;
  event.preventDefault();
  if (drag.kind === 'pan') {
    view.panBy(event.clientX - drag.clientX, event.clientY - drag.clientY);
    drag.clientX = event.clientX;
    drag.clientY = event.clientY;
    return;
  }
  const [x, y] = view.toDisplay(event.clientX, event.clientY);
  if (drag.kind === 'draw') {
    drag.box = clampBox([drag.startX, drag.startY, x, y], view.w, view.h);
  } else {
    drag.entry.box = dragBox(drag.original, drag.handle, x - drag.startX, y - drag.startY, view.w, view.h);
    if (drag.handle === 'move') movePoints(drag.entry, drag.originalPoints, drag.original);
  }
  requestPreviews();
  view.render();
});

function endDrag(event, cancelled) {
  const drag = state.drag;
  if (!drag || event.pointerId !== drag.id) return;
  state.drag = null;
  if (canvas.hasPointerCapture(event.pointerId)) canvas.releasePointerCapture(event.pointerId);
  if (drag.kind === 'draw' && !cancelled) {
    const [x0, y0, x1, y1] = normalize(drag.box);
    const minSize = MIN_BOX_SCREEN_PX / view.scale;
    if (x1 - x0 >= minSize && y1 - y0 >= minSize && state.organ) addBox([x0, y0, x1, y1]);
  } else if (drag.kind === 'edit') {
    if (cancelled) {
      drag.entry.box = drag.original;
      movePoints(drag.entry, drag.originalPoints, drag.original);
    }
    drag.entry.box = normalize(drag.entry.box);
    dropPointsOutside(drag.entry);
  }
  refreshControls();
}

canvas.addEventListener('pointerup', (event) => endDrag(event, false));
canvas.addEventListener('pointercancel', (event) => endDrag(event, true));
canvas.addEventListener('lostpointercapture', (event) => endDrag(event, false));
canvas.addEventListener('contextmenu', (event) => event.preventDefault());
canvas.addEventListener(
  'wheel',
  (event) => {
    if (!view.image) return;
    event.preventDefault();
    wheelZoom(view, event);
  },
  { passive: false },
);

function drawOverlay(ctx) {
  drawMasks(ctx);
  const all = state.boxes.map((entry) => ({ ...entry, selected: entry.client_id === state.selected }));
  if (state.drag && state.drag.kind === 'draw') {
    all.push({ label: state.organ, box: normalize(state.drag.box), selected: true, drawing: true });
  }
  for (const entry of all) {
    const [x0, y0, x1, y1] = entry.box;
    const [sx0, sy0] = view.toScreen(x0, y0);
    const [sx1, sy1] = view.toScreen(x1, y1);
    const color = colorOf(entry.label);
    ctx.fillStyle = `${color}26`;
    ctx.fillRect(sx0, sy0, sx1 - sx0, sy1 - sy0);
    ctx.lineWidth = 4;
    ctx.strokeStyle = 'rgba(0,0,0,0.75)';
    ctx.strokeRect(sx0, sy0, sx1 - sx0, sy1 - sy0);
    ctx.lineWidth = entry.selected ? 2.5 : 1.75;
    ctx.strokeStyle = color;
    ctx.setLineDash(entry.drawing ? [6, 4] : []);
    ctx.strokeRect(sx0, sy0, sx1 - sx0, sy1 - sy0);
    ctx.setLineDash([]);
    ctx.font = '600 12px system-ui, sans-serif';
    const text = entry.label.replaceAll('_', ' ');
    const tw = ctx.measureText(text).width + 8;
    ctx.fillStyle = 'rgba(0,0,0,0.85)';
    ctx.fillRect(sx0, sy0 - 17, tw + 4, 16);
    ctx.fillStyle = color;
    ctx.fillRect(sx0, sy0 - 17, 4, 16);
    ctx.fillStyle = '#fff';
    ctx.fillText(text, sx0 + 8, sy0 - 5);
    if (entry.selected && !entry.drawing) {
      const hs = 7;
      ctx.fillStyle = '#fff';
      ctx.strokeStyle = '#000';
      ctx.lineWidth = 1;
      for (const [hx, hy] of [
        [sx0, sy0], [sx1, sy0], [sx0, sy1], [sx1, sy1],
        [(sx0 + sx1) / 2, sy0], [(sx0 + sx1) / 2, sy1], [sx0, (sy0 + sy1) / 2], [sx1, (sy0 + sy1) / 2],
      ]) {
        ctx.fillRect(hx - hs / 2, hy - hs / 2, hs, hs);
        ctx.strokeRect(hx - hs / 2, hy - hs / 2, hs, hs);
      }
    }
  }
  drawPoints(ctx);
  notifyPainted();
}

// ---------------------------------------------------------------- side panel: box list and buttons

function refreshControls() {
  const list = $('box-list');
  list.replaceChildren(
    ...state.boxes.map((entry, index) => {
      const item = document.createElement('li');
      item.className = entry.client_id === state.selected ? 'selected' : '';
      const select = document.createElement('button');
      select.type = 'button';
      select.className = 'box-item';
      select.setAttribute('aria-pressed', String(entry.client_id === state.selected));
      const swatch = document.createElement('span');
      swatch.className = 'swatch';
      swatch.style.background = colorOf(entry.label);
      const [x0, y0, x1, y1] = entry.box.map((v) => Math.round(v));
      const positive = entry.points.filter((p) => p.positive).length;
      const negative = entry.points.length - positive;
      const points = entry.points.length ? ` +${positive} −${negative}` : '';
      select.append(swatch, `${index + 1}. ${entry.label.replaceAll('_', ' ')} [${x0}, ${y0}, ${x1}, ${y1}]${points}`);
      select.addEventListener('click', () => {
        state.selected = entry.client_id;
        refreshControls();
        canvas.focus();
      });
      const remove = document.createElement('button');
      remove.type = 'button';
      remove.className = 'ghost';
      remove.textContent = '×';
      remove.setAttribute('aria-label', `Delete box ${index + 1} (${entry.label})`);
      remove.disabled = state.busy;
      remove.addEventListener('click', () => {
        state.selected = entry.client_id;
        deleteSelected();
      });
      item.append(select, remove);
      return item;
    }),
  );
  const ready = Boolean(state.task && view.image) && !state.busy;
  $('submit').disabled = !ready || state.boxes.length === 0;
  $('nothing').disabled = !ready || state.boxes.length > 0;
  $('add-box').disabled = !ready || !state.organ;
  $('delete-box').disabled = !ready || !state.selected;
  $('dataset').disabled = state.busy;
  $('submit').textContent = state.boxes.length > 1 ? `Submit ${state.boxes.length} boxes` : 'Submit boxes';
  $('point-add').disabled = !ready;
  $('point-sub').disabled = !ready;
  requestPreviews();
  view.render();
}

$('delete-box').addEventListener('click', deleteSelected);
$('add-box').addEventListener('click', addCentredBox);
bindZoomButtons(view);
$('pan').addEventListener('click', () => {
  state.panMode = !state.panMode;
  $('pan').setAttribute('aria-pressed', String(state.panMode));
});

function addCentredBox() {
  if (!view.image || !state.organ || state.busy) return;
  const [cx, cy] = view.toDisplay(
    canvas.getBoundingClientRect().left + view.cssW / 2,
    canvas.getBoundingClientRect().top + view.cssH / 2,
  );
  const half = Math.max(4, Math.min(view.w, view.h) / 8);
  addBox([cx - half, cy - half, cx + half, cy + half]);
  canvas.focus();
}

// ---------------------------------------------------------------- refinement points

const round2 = (v) => Math.round(v * 100) / 100;

function inside([x, y], box) {
  const [x0, y0, x1, y1] = roundBox(normalize(box));
  return x0 <= x && x <= x1 && y0 <= y && y <= y1;
}

function setPointMode(mode) {
  state.pointMode = mode;
  $('point-add').setAttribute('aria-pressed', String(mode === 'add'));
  $('point-sub').setAttribute('aria-pressed', String(mode === 'sub'));
  canvas.style.cursor = mode ? 'copy' : 'crosshair';
  if (mode) setStatus(`${mode === 'add' ? 'Positive' : 'Negative'} points: click inside a box (Shift: the other kind; click a point to remove it; Esc: back to boxes).`);
}

/** A click in point mode: remove the point under it, else add one to the box under it (the selected box first). */
function placePoint(x, y, pointerType, invert) {
  const tol = tolerance(pointerType);
  for (const entry of state.boxes) {
    const index = entry.points.findIndex((p) => Math.hypot(p.point[0] - x, p.point[1] - y) <= tol);
    if (index >= 0) {
      entry.points.splice(index, 1);
      state.selected = entry.client_id;
      setStatus('Point removed.');
      refreshControls();
      return;
    }
  }
  const point = [round2(x), round2(y)];
  const sel = selectedBox();
  const entry = [sel, ...[...state.boxes].reverse()].find((e) => e && inside(point, e.box));
  if (!entry) {
    setStatus('Points refine a box: click inside one.', true);
    return;
  }
  const positive = (state.pointMode === 'add') !== invert;
  entry.points.push({ point, positive, client_id: uuid() });
  state.selected = entry.client_id;
  refreshControls();
}

/** Points travel with their box when it is moved. */
function movePoints(entry, originalPoints, originalBox) {
  const dx = entry.box[0] - originalBox[0];
  const dy = entry.box[1] - originalBox[1];
  entry.points.forEach((p, i) => {
    p.point = [round2(originalPoints[i][0] + dx), round2(originalPoints[i][1] + dy)];
  });
}

/** A resize may leave points outside the box: they would no longer refine it (the worker drops them). */
function dropPointsOutside(entry) {
  const before = entry.points.length;
  entry.points = entry.points.filter((p) => inside(p.point, entry.box));
  if (entry.points.length < before) setStatus(`${before - entry.points.length} point(s) outside the box removed.`);
}

function drawPoints(ctx) {
  for (const entry of state.boxes) {
    for (const p of entry.points) {
      const [sx, sy] = view.toScreen(p.point[0], p.point[1]);
      ctx.beginPath();
      ctx.arc(sx, sy, 6, 0, 2 * Math.PI);
      ctx.fillStyle = p.positive ? '#1f9d55' : '#c62828';
      ctx.fill();
      ctx.lineWidth = 2;
      ctx.strokeStyle = colorOf(entry.label);
      ctx.stroke();
      ctx.strokeStyle = '#fff';
      ctx.lineWidth = 1.75;
      ctx.beginPath();
      ctx.moveTo(sx - 3, sy);
      ctx.lineTo(sx + 3, sy);
      if (p.positive) {
        ctx.moveTo(sx, sy - 3);
        ctx.lineTo(sx, sy + 3);
      }
      ctx.stroke();
    }
  }
}

// ---------------------------------------------------------------- SAM preview (decoder in the page, sam.js)

function samStatus(text) {
  $('sam-status').textContent = text;
}

function resetSam() {
  const sam = state.sam;
  sam.embedding = null;
  sam.results.clear();
  sam.unpainted = [];
  if (sam.live) sam.live.clear();
  canvas.dataset.sam = 'loading';
}

/** The task's embedding and the decoder it names; then every box gets its mask. Failures only cost the preview. */
async function startSam(task) {
  const sam = state.sam;
  if (!sam.model) {
    samStatus('SAM preview is off on this page (?sam=off).');
    canvas.dataset.sam = 'off';
    prefetch(task.next, false);
    return;
  }
  samStatus('Loading the SAM preview…');
  try {
    const embedding = await getEmbedding(state.api, task.volume_id, task.slice, sam.model, {
      onPending: () => { if (state.task === task) samStatus('Preparing SAM preview… (a worker computes the slice embedding)'); },
    });
    if (state.task !== task) return;
    samStatus('Loading the SAM decoder…');
    const decoder = await getDecoder(state.api, embedding.meta.decoder);
    if (state.task !== task) return;
    sam.timings = {
      wireBytes: embedding.wireBytes, embeddingMs: embedding.fetchMs, pendingMs: embedding.pendingMs,
      decoderBytes: decoder.bytes, decoderLoadMs: decoder.loadMs, threads: decoder.threads,
    };
    sam.embedding = embedding;
    canvas.dataset.sam = 'ready';
    samStatus(`SAM preview ready (${sam.model}): the predicted mask follows your box.`);
    requestPreviews();
    prefetch(task.next, true); // now the next task's embedding and image, so its preview is ready after Submit
  } catch (error) {
    if (state.task !== task) return;
    canvas.dataset.sam = 'failed';
    samStatus(`No SAM preview for this slice: ${describe(error)}`);
    prefetch(task.next, false);
  }
}

/** The decoder prompt of a box as the worker will build it: its label's points inside it (plan.py). */
function promptFor(box, label) {
  const points = state.boxes.filter((b) => b.label === label).flatMap((b) => b.points);
  return groupPrompts([roundBox(normalize(box))], points)[0];
}

/** Ask for the mask of every box whose prompt changed (the one under the pointer first). */
function requestPreviews() {
  const sam = state.sam;
  if (!sam.embedding || !sam.live) return;
  const wanted = new Map();
  for (const entry of state.boxes) wanted.set(entry.client_id, { prompt: promptFor(entry.box, entry.label), label: entry.label });
  if (state.drag && state.drag.kind === 'draw' && state.organ) {
    const box = normalize(state.drag.box);
    if (box[2] - box[0] >= 1 && box[3] - box[1] >= 1) wanted.set('drawing', { prompt: promptFor(box, state.organ), label: state.organ });
  }
  const drawn = sam.results.get('drawing');
  for (const [id, want] of wanted) {
    const key = `${want.label}|${promptKey(want.prompt)}`;
    const have = sam.results.get(id);
    if (have && have.key === key) {
      sam.live.drop(id);
    } else if (!have && drawn && drawn.key === key && id !== 'drawing') {
      sam.results.set(id, drawn); // the box just drawn: the last frame's mask is already its mask
      sam.live.drop(id);
    } else {
      sam.live.want(id, { ...want.prompt, label: want.label, key, embedding: sam.embedding });
    }
  }
  for (const id of [...sam.results.keys()]) if (!wanted.has(id)) sam.results.delete(id);
  for (const id of [...sam.live.pending.keys()]) if (!wanted.has(id)) sam.live.drop(id);
  const drag = state.drag;
  sam.live.priority = drag && drag.kind === 'draw' ? 'drawing' : drag && drag.entry ? drag.entry.client_id : state.selected;
  sam.live.dragging = Boolean(drag && drag.kind !== 'pan');
  sam.live.schedule(); // a let-go box may start on a free lane now
}

state.sam.live = new LivePreview(
  async (prompt, lane) => (await decode(state.api, prompt.embedding, [prompt], lane))[0],
  (id, prompt, result, askedAt, seq) => {
    const sam = state.sam;
    if (prompt.embedding !== sam.embedding) return;
    const have = sam.results.get(id);
    if (have && have.seq > seq) return; // a newer request's mask is already shown
    const entry = {
      key: prompt.key, label: prompt.label, canvas: maskCanvas(result, colorOf(prompt.label)), result, askedAt,
      decodedAt: performance.now(), seq,
    };
    sam.results.set(id, entry);
    sam.unpainted.push({ id, entry });
    view.render();
  },
  (error) => samStatus(`SAM preview failed: ${describe(error)}`),
);

function drawMasks(ctx) {
  const sam = state.sam;
  if (!sam.visible || !sam.embedding) return;
  const [ox, oy] = view.origin;
  const s = view.scale;
  ctx.save();
  ctx.imageSmoothingEnabled = false;
  for (const { canvas: mask } of sam.results.values()) ctx.drawImage(mask, ox, oy, view.w * s, view.h * s);
  ctx.restore();
}

/** Tell listeners (tests, bench/web_decoder.py) which decoded masks this frame painted, and when. */
function notifyPainted() {
  const sam = state.sam;
  if (!sam.unpainted.length) return;
  const paintedAt = performance.now();
  for (const { id, entry } of sam.unpainted.splice(0)) {
    canvas.dispatchEvent(new CustomEvent('sam-painted', {
      detail: { id, key: entry.key, askedAt: entry.askedAt, decodedAt: entry.decodedAt, paintedAt, decodeMs: entry.result.decodeMs },
    }));
  }
}

$('sam-toggle').addEventListener('change', () => {
  state.sam.visible = $('sam-toggle').checked;
  setStatus(state.sam.visible ? 'SAM preview shown.' : 'SAM preview hidden.');
  view.render();
});
$('point-add').addEventListener('click', () => setPointMode(state.pointMode === 'add' ? null : 'add'));
$('point-sub').addEventListener('click', () => setPointMode(state.pointMode === 'sub' ? null : 'sub'));

// ---------------------------------------------------------------- submitting

function onOutboxEvent(event) {
  if (event.state === 'sending') {
    setStatus(event.attempt > 1 ? `Sending again (attempt ${event.attempt})…` : 'Sending…');
  } else if (event.state === 'waiting') {
    setStatus(`Offline or server busy — your boxes are kept and will be sent again in ${Math.ceil(event.delay / 1000)} s.`);
  } else if (event.state === 'rejected') {
    setStatus(`The server refused these boxes: ${describe(event.error)}`, true);
  } else if (event.state === 'blocked') {
    setStatus(describe(event.error), true);
  }
}

const KEPT = 'Your boxes are kept and will be sent after you sign in.';

/** Flush the outbox; true when everything was accepted. */
async function sendOutbox() {
  const result = await state.outbox.flush();
  if (result.blocked) {
    if (result.blocked.status === 401) signInAgain(result.blocked, `${describe(result.blocked)} ${KEPT}`);
    return false;
  }
  return Object.keys(result.rejected).length === 0;
}

async function submit(nothingHere) {
  const task = state.task;
  if (!task || state.busy) return;
  if (!nothingHere && state.boxes.length === 0) return;
  state.busy = true;
  refreshControls();
  const body = {
    boxes: nothingHere
      ? []
      : state.boxes.map((b) => ({ slice: task.slice, label: b.label, box: roundBox(normalize(b.box)), client_id: b.client_id })),
    // Refinement points: each lies inside its box, so the worker joins it to that box (workers/sam/plan.py).
    points: nothingHere
      ? []
      : state.boxes.flatMap((b) => b.points.map((p) => ({
        slice: task.slice, label: b.label, point: p.point, positive: p.positive, client_id: p.client_id,
      }))),
    seen: [task.slice],
  };
  const id = state.outbox.add(`volumes/${task.volume_id}/prompts`, body, { slice: task.slice, case_id: task.case_id });
  const result = await state.outbox.flush();
  state.busy = false;
  if (result.sent[id]) {
    state.done += 1;
    showDone();
    const points = body.points.length ? ` and ${body.points.length} point(s)` : '';
    setStatus(nothingHere ? 'Saved: nothing of these organs on that slice.' : `Saved ${body.boxes.length} box(es)${points}.`);
    await nextTask();
    return;
  }
  if (result.blocked && result.blocked.status === 401) {
    signInAgain(result.blocked, `${describe(result.blocked)} ${KEPT}`);
    return;
  }
  refreshControls();
}

$('submit').addEventListener('click', () => submit(false));
$('nothing').addEventListener('click', () => submit(true));

// ---------------------------------------------------------------- keyboard

onKeys(view, (event) => {
  if (event.ctrlKey && event.key === 'Enter') {
    event.preventDefault();
    submit(false);
    return true;
  }
  if (event.ctrlKey || event.metaKey) return true;
  const sel = selectedBox();
  if (/^[1-9]$/.test(event.key) && !event.altKey) {
    const entry = state.labels[Number(event.key) - 1];
    if (entry) {
      event.preventDefault();
      selectOrgan(entry[0]);
      setStatus(`Organ: ${entry[0].replaceAll('_', ' ')}`);
    }
  } else if ((event.key === 'Delete' || event.key === 'Backspace') && sel) {
    event.preventDefault();
    deleteSelected();
  } else if (event.key === 'Escape') {
    if (state.pointMode) setPointMode(null);
    else state.selected = null;
    refreshControls();
  } else if (event.key === 'a' || event.key === 'A') {
    setPointMode(state.pointMode === 'add' ? null : 'add');
  } else if (event.key === 's' || event.key === 'S') {
    setPointMode(state.pointMode === 'sub' ? null : 'sub');
  } else if (event.key === 'v' || event.key === 'V') {
    $('sam-toggle').click();
  } else if (event.key.startsWith('Arrow') && sel && !state.busy && event.target === canvas) {
    event.preventDefault();
    const step = event.shiftKey ? 10 : 1;
    const dx = { ArrowLeft: -step, ArrowRight: step }[event.key] || 0;
    const dy = { ArrowUp: -step, ArrowDown: step }[event.key] || 0;
    const before = sel.box;
    const originalPoints = sel.points.map((p) => p.point);
    sel.box = normalize(dragBox(sel.box, event.altKey ? 'se' : 'move', dx, dy, view.w, view.h));
    if (!event.altKey) movePoints(sel, originalPoints, before);
    dropPointsOutside(sel);
    refreshControls();
  } else if (event.key === 'b' || event.key === 'B') {
    event.preventDefault();
    setPointMode(null);
    addCentredBox();
  } else if (event.key === ' ' && (event.target === canvas || event.target === document.body)) {
    event.preventDefault();
    state.spaceHeld = true;
  } else {
    return false;
  }
  return true;
}, { inputsWithoutKeys: ['radio', 'checkbox', 'range'] });

document.addEventListener('keyup', (event) => {
  if (event.key === ' ') state.spaceHeld = false;
});

// ---------------------------------------------------------------- go

startPage({ load, show, onSignOut: () => { state.api = null; } });

// For debugging and tests: a read-only peek at the page state.
window.crowdsamAnnotate = { state, view, API, samKeyOf };

/** The preview key a box's mask must have to be current (tests and the bench wait for it). */
function samKeyOf(id) {
  const entry = state.boxes.find((b) => b.client_id === id);
  return entry ? `${entry.label}|${promptKey(promptFor(entry.box, entry.label))}` : null;
}
