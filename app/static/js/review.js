// The researcher review page: scroll a volume's slices with the crowd's boxes and a SAM mask overlaid.
import { API, describe } from './api.js';
import { $, bindZoomButtons, onKeys, setStatus, startPage, wheelZoom } from './page.js';
import { labelColor } from '/static/palette.js';
import { decode, getDecoder, getEmbedding, groupPrompts, maskOutline } from './sam.js';
import { View } from './view.js';

const DASHES = [[], [8, 4], [2, 3], [10, 3, 2, 3], [4, 4]];
const CACHE_SIZE = 64;

const volumeId = Number((window.location.pathname.match(/\/review\/(\d+)/) || [])[1]);

const state = {
  api: null,
  volume: null,
  dataset: null,
  labels: [], // [name, value] by value
  slice: 0,
  prompts: new Map(), // slice -> prompts
  annotators: [], // names, sorted
  hiddenAnnotators: new Set(),
  showPrompts: true,
  coverage: new Map(), // slice -> coverage row
  segmentations: [],
  segmentation: null,
  maskLabels: new Set(),
  showMask: true,
  opacity: 0.5,
  mask: null, // ImageBitmap of the current slice's mask
  seq: 0,
  sam: { on: false, items: [], slice: null, seq: 0 }, // "SAM per annotator": [{annotator, label, result, outline}] of the slice
};

const cache = new Map(); // key -> Promise<ImageBitmap>
const view = new View($('canvas'), drawOverlay);

function cached(key, load) {
  if (cache.has(key)) {
    const hit = cache.get(key);
    cache.delete(key);
    cache.set(key, hit);
    return hit;
  }
  const promise = load().catch((error) => {
    cache.delete(key);
    throw error;
  });
  cache.set(key, promise);
  while (cache.size > CACHE_SIZE) cache.delete(cache.keys().next().value);
  return promise;
}

function colorOf(name) {
  const entry = state.labels.find(([n]) => n === name);
  return entry ? labelColor(entry[1]) : '#ffffff';
}

// ---------------------------------------------------------------- start-up and loading

/** The first requests with a token: the volume and its dataset (throws when the token is refused). */
async function load(api) {
  state.api = api;
  if (!Number.isInteger(volumeId) || volumeId <= 0) throw new Error('The address must be /review/<volume id>.');
  state.volume = await api.json(`volumes/${volumeId}`);
  state.dataset = await api.json(`datasets/${state.volume.dataset_id}`);
}

/** The workspace shows: the slice of the link (else the middle one) with boxes, coverage and a mask. */
async function show() {
  state.labels = Object.entries(state.dataset.labels).sort((a, b) => a[1] - b[1]);
  const v = state.volume;
  $('volume-info').textContent = `${state.dataset.name} · case ${v.case_id} · volume ${v.id} · ${v.display_size[0]}×${v.display_size[1]}×${v.n_slices}`;
  $('slice').max = String(v.n_slices - 1);
  const params = new URL(window.location.href).searchParams;
  const wanted = Number(params.get('slice'));
  state.slice = Number.isInteger(wanted) && wanted >= 0 && wanted < v.n_slices ? wanted : Math.floor(v.n_slices / 2);
  await Promise.all([loadPrompts(), loadCoverage(), loadSegmentations(Number(params.get('segmentation')) || null)]);
  await showSlice(state.slice);
}

async function loadPrompts() {
  try {
    const items = await state.api.all(`volumes/${volumeId}/prompts`);
    state.prompts = new Map();
    const names = new Set();
    for (const p of items) {
      if (!state.prompts.has(p.slice)) state.prompts.set(p.slice, []);
      state.prompts.get(p.slice).push(p);
      names.add(p.annotator);
    }
    state.annotators = [...names].sort();
  } catch (error) {
    setStatus(`Could not load the crowd boxes: ${describe(error)}`, true);
  }
  buildAnnotatorToggles();
}

async function loadCoverage() {
  try {
    const coverage = await state.api.json(`volumes/${volumeId}/coverage`);
    state.coverage = new Map(coverage.slices.map((row) => [row.slice, row]));
  } catch (error) {
    setStatus(`Could not load coverage: ${describe(error)}`, true);
  }
  drawCoverage();
}

async function loadSegmentations(preferred = null) {
  try {
    const listed = await state.api.json(`volumes/${volumeId}/segmentations`);
    state.segmentations = Array.isArray(listed) ? listed : listed.items || [];
  } catch (error) {
    state.segmentations = [];
    setStatus(`Could not list segmentations: ${describe(error)}`, true);
  }
  const select = $('segmentation');
  const options = state.segmentations.map((s) => {
    const option = new Option(`#${s.id} · ${s.model} · ${s.fusion} · ${s.status}`, String(s.id));
    option.disabled = s.status !== 'finished';
    return option;
  });
  select.replaceChildren(new Option('None', ''), ...options);
  const finished = state.segmentations.filter((s) => s.status === 'finished');
  const chosen = finished.find((s) => s.id === preferred) || finished.find((s) => s.id === state.segmentation?.id) || finished[0];
  select.value = chosen ? String(chosen.id) : '';
  chooseSegmentation(chosen || null);
}

function chooseSegmentation(seg) {
  state.segmentation = seg;
  state.mask = null;
  const labels = seg ? (seg.labels && seg.labels.length ? seg.labels : state.labels.map(([n]) => n)) : [];
  state.maskLabels = new Set(labels);
  const box = $('mask-labels');
  box.replaceChildren(
    ...state.labels
      .filter(([name]) => labels.includes(name))
      .map(([name]) => checkbox(name, true, colorOf(name), (on) => {
        if (on) state.maskLabels.add(name);
        else state.maskLabels.delete(name);
        refreshSlice();
      }, 'mask-label')),
  );
  const link = $('download');
  if (seg) {
    link.hidden = false;
    link.href = `${API}/segmentations/${seg.id}/mask`;
    const timings = seg.stats && seg.stats.timings ? ` · ${Number(seg.stats.timings.total_s || 0).toFixed(1)} s` : '';
    const prompted = seg.stats && seg.stats.prompted_slices ? ` · ${seg.stats.prompted_slices.length} prompted slices` : '';
    $('seg-info').textContent = `Model ${seg.model}, fusion ${seg.fusion}${prompted}${timings}`;
  } else {
    link.hidden = true;
    $('seg-info').textContent = state.segmentations.length ? 'No finished segmentation chosen.' : 'No segmentation of this volume yet.';
  }
  updateUrl();
}

function checkbox(name, checked, color, onChange, className = '') {
  const label = document.createElement('label');
  label.className = `check ${className}`;
  const input = document.createElement('input');
  input.type = 'checkbox';
  input.checked = checked;
  input.value = name;
  input.addEventListener('change', () => onChange(input.checked));
  label.append(input);
  if (color) {
    const swatch = document.createElement('span');
    swatch.className = 'swatch';
    swatch.style.background = color;
    label.append(swatch);
  }
  label.append(name.replaceAll('_', ' '));
  return label;
}

function buildAnnotatorToggles() {
  const counts = new Map();
  for (const list of state.prompts.values()) for (const p of list) counts.set(p.annotator, (counts.get(p.annotator) || 0) + 1);
  const box = $('annotators');
  if (!state.annotators.length) {
    box.replaceChildren(Object.assign(document.createElement('p'), { className: 'muted', textContent: 'No crowd boxes yet.' }));
    return;
  }
  box.replaceChildren(
    ...state.annotators.map((name) => {
      const label = checkbox(`${name}`, !state.hiddenAnnotators.has(name), null, (on) => {
        if (on) state.hiddenAnnotators.delete(name);
        else state.hiddenAnnotators.add(name);
        view.render();
      }, 'annotator');
      label.append(` (${counts.get(name)})`);
      return label;
    }),
  );
}

// ---------------------------------------------------------------- slices

// ---------------------------------------------------------------- SAM per annotator (decoder in the page, sam.js)

/** Each annotator's own masks of the slice: their boxes (+ points) decoded in the page, as the worker would. */
async function refreshAnnotatorMasks() {
  const sam = state.sam;
  const seq = ++sam.seq;
  const k = state.slice;
  const canvas = $('canvas');
  if (!sam.on) {
    sam.items = [];
    $('sam-status').textContent = '';
    view.render();
    return;
  }
  const prompts = state.prompts.get(k) || [];
  const groups = new Map(); // `${annotator}\u0000${label}` -> {annotator, label, boxes, points}
  for (const p of prompts) {
    const id = `${p.annotator}\u0000${p.label}`;
    if (!groups.has(id)) groups.set(id, { annotator: p.annotator, label: p.label, boxes: [], points: [] });
    if (p.box) groups.get(id).boxes.push(p.box);
    else if (p.point) groups.get(id).points.push({ point: p.point, positive: p.positive !== false });
  }
  const wanted = [...groups.values()].flatMap((g) => groupPrompts(g.boxes, g.points).map((prompt) => ({ ...g, prompt })));
  if (!wanted.length) {
    sam.items = [];
    canvas.dataset.samSlice = String(k);
    $('sam-status').textContent = 'No crowd prompts on this slice.';
    view.render();
    return;
  }
  const model = state.segmentation?.model || 'litemedsam';
  $('sam-status').textContent = `Decoding ${wanted.length} prompt(s) with ${model}…`;
  try {
    const embedding = await getEmbedding(state.api, volumeId, k, model, {
      onPending: () => { if (seq === sam.seq) $('sam-status').textContent = 'Preparing the SAM embedding of this slice…'; },
    });
    if (seq !== sam.seq) return;
    await getDecoder(state.api, embedding.meta.decoder); // loaded once per page: not part of the decode time
    if (seq !== sam.seq) return;
    const started = performance.now();
    const results = await decode(state.api, embedding, wanted.map((w) => w.prompt));
    if (seq !== sam.seq) return;
    sam.items = wanted.map((w, i) => ({ annotator: w.annotator, label: w.label, result: results[i], outline: maskOutline(results[i]) }));
    sam.slice = k;
    canvas.dataset.samSlice = String(k);
    $('sam-status').textContent = `${wanted.length} mask(s) decoded in the page in ${Math.round(performance.now() - started)} ms (${model}).`;
    view.render();
  } catch (error) {
    if (seq === sam.seq) $('sam-status').textContent = `No per-annotator masks: ${describe(error)}`;
  }
}

function drawAnnotatorMasks(ctx, ox, oy, s) {
  const sam = state.sam;
  if (!sam.on || !sam.items.length || sam.slice !== state.slice) return; // another slice's masks: not yet
  ctx.save();
  ctx.translate(ox, oy);
  ctx.scale(s, s);
  for (const item of sam.items) {
    if (state.hiddenAnnotators.has(item.annotator)) continue;
    const dash = DASHES[state.annotators.indexOf(item.annotator) % DASHES.length].map((v) => v / s);
    ctx.setLineDash(dash);
    ctx.lineWidth = 3.5 / s;
    ctx.strokeStyle = 'rgba(0,0,0,0.7)';
    ctx.stroke(item.outline);
    ctx.lineWidth = 1.75 / s;
    ctx.strokeStyle = colorOf(item.label);
    ctx.stroke(item.outline);
  }
  ctx.restore();
  ctx.setLineDash([]);
}

async function showSlice(k) {
  const v = state.volume;
  if (!v) return;
  state.slice = Math.max(0, Math.min(v.n_slices - 1, k));
  $('slice').value = String(state.slice);
  $('slice-out').textContent = `${state.slice} / ${v.n_slices - 1}`;
  describeSlice();
  drawCoverage();
  updateUrl();
  if (state.sam.on) refreshAnnotatorMasks();
  await refreshSlice();
}

async function refreshSlice() {
  const seq = ++state.seq;
  const k = state.slice;
  const [level, width] = ($('window').value || ',').split(',');
  const ct = cached(`ct:${k}:${level}:${width}`, () => state.api.bitmap(`volumes/${volumeId}/slices/${k}.png`, { level, width }));
  const seg = state.segmentation;
  const labels = [...state.maskLabels].sort();
  const mask = seg && labels.length
    ? cached(`mask:${seg.id}:${k}:${labels}`, () =>
        state.api.bitmap(`segmentations/${seg.id}/slices/${k}.png`, { mode: 'mask', labels: labels.join(',') }))
    : Promise.resolve(null);
  try {
    const [image, maskImage] = await Promise.all([ct, mask]);
    if (seq !== state.seq) return;
    state.mask = maskImage;
    view.setImage(image, { keepView: true });
    $('canvas').dataset.slice = String(k);
    $('canvas').dataset.ready = 'true';
  } catch (error) {
    if (seq === state.seq) setStatus(`Could not load slice ${k}: ${describe(error)}`, true);
  }
}

function describeSlice() {
  const row = state.coverage.get(state.slice);
  const prompts = state.prompts.get(state.slice) || [];
  const labels = row ? Object.entries(row.labels || {}).map(([name, c]) => `${name.replaceAll('_', ' ')} ${c.annotators}×`).join(', ') : '';
  $('slice-info').textContent = prompts.length || row
    ? `Slice ${state.slice}: ${prompts.length} crowd prompt(s)${labels ? ` — ${labels}` : ''}; seen by ${row ? row.seen_by : 0}.`
    : `Slice ${state.slice}: no crowd prompts.`;
}

function updateUrl() {
  const url = new URL(window.location.href);
  url.searchParams.set('slice', String(state.slice));
  if (state.segmentation) url.searchParams.set('segmentation', String(state.segmentation.id));
  else url.searchParams.delete('segmentation');
  window.history.replaceState(window.history.state, '', url.pathname + url.search);
}

// ---------------------------------------------------------------- drawing

function drawOverlay(ctx) {
  const [ox, oy] = view.origin;
  const s = view.scale;
  if (state.mask && state.showMask && state.opacity > 0) {
    ctx.save();
    ctx.globalAlpha = state.opacity;
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(state.mask, ox, oy, view.w * s, view.h * s);
    ctx.restore();
  }
  drawAnnotatorMasks(ctx, ox, oy, s);
  if (!state.showPrompts) return;
  for (const p of state.prompts.get(state.slice) || []) {
    if (state.hiddenAnnotators.has(p.annotator)) continue;
    const color = colorOf(p.label);
    ctx.setLineDash(DASHES[state.annotators.indexOf(p.annotator) % DASHES.length]);
    if (p.box) {
      const [x0, y0] = view.toScreen(p.box[0], p.box[1]);
      const [x1, y1] = view.toScreen(p.box[2], p.box[3]);
      ctx.lineWidth = 3.5;
      ctx.strokeStyle = 'rgba(0,0,0,0.7)';
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
      ctx.lineWidth = 1.75;
      ctx.strokeStyle = color;
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
      ctx.setLineDash([]);
      ctx.font = '11px system-ui, sans-serif';
      ctx.fillStyle = 'rgba(0,0,0,0.85)';
      const text = `${p.annotator}: ${p.label}`;
      ctx.fillRect(x0, y1 + 1, ctx.measureText(text).width + 10, 14);
      ctx.fillStyle = color;
      ctx.fillRect(x0, y1 + 1, 3, 14);
      ctx.fillStyle = '#fff';
      ctx.fillText(text, x0 + 6, y1 + 12);
    } else if (p.point) {
      const [x, y] = view.toScreen(p.point[0], p.point[1]);
      ctx.setLineDash([]);
      ctx.beginPath();
      ctx.arc(x, y, 5, 0, 2 * Math.PI);
      ctx.fillStyle = p.positive === false ? '#000' : color;
      ctx.fill();
      ctx.lineWidth = 2;
      ctx.strokeStyle = color;
      ctx.stroke();
    }
  }
  ctx.setLineDash([]);
}

function drawCoverage() {
  const canvas = $('coverage');
  const v = state.volume;
  if (!v) return;
  const rect = canvas.getBoundingClientRect();
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.max(1, Math.round(rect.width * dpr));
  canvas.height = Math.max(1, Math.round(rect.height * dpr));
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = '#1a1f26';
  ctx.fillRect(0, 0, rect.width, rect.height);
  const cell = rect.width / v.n_slices;
  let prompted = 0;
  for (let k = 0; k < v.n_slices; k += 1) {
    const row = state.coverage.get(k);
    if (!row) continue;
    const annotators = Math.max(0, ...Object.values(row.labels || {}).map((c) => c.annotators || 0));
    if (annotators > 0) prompted += 1;
    ctx.fillStyle = annotators > 0 ? `rgba(126, 226, 168, ${0.35 + 0.65 * Math.min(1, annotators / 3)})` : 'rgba(183, 192, 202, 0.35)';
    ctx.fillRect(k * cell, 4, Math.max(1, cell - 0.5), rect.height - 8);
  }
  ctx.strokeStyle = '#ffbf47';
  ctx.lineWidth = 2;
  ctx.strokeRect(state.slice * cell, 1, Math.max(2, cell), rect.height - 2);
  canvas.setAttribute('aria-label', `Coverage: ${prompted} of ${v.n_slices} slices have crowd boxes; current slice ${state.slice}.`);
}

// ---------------------------------------------------------------- controls

$('slice').addEventListener('input', () => showSlice(Number($('slice').value)));
$('prev').addEventListener('click', () => showSlice(state.slice - 1));
$('next').addEventListener('click', () => showSlice(state.slice + 1));
$('next-prompted').addEventListener('click', () => {
  const slices = [...state.prompts.keys()].sort((a, b) => a - b);
  const next = slices.find((k) => k > state.slice) ?? slices[0];
  if (next !== undefined) showSlice(next);
});
$('coverage').addEventListener('click', (event) => {
  const rect = event.currentTarget.getBoundingClientRect();
  showSlice(Math.floor(((event.clientX - rect.left) / rect.width) * state.volume.n_slices));
});
$('window').addEventListener('change', () => refreshSlice());
bindZoomButtons(view);
$('show-prompts').addEventListener('change', () => {
  state.showPrompts = $('show-prompts').checked;
  view.render();
});
$('opacity').addEventListener('input', () => {
  state.opacity = Number($('opacity').value) / 100;
  $('opacity-out').textContent = `${$('opacity').value}%`;
  view.render();
});
$('segmentation').addEventListener('change', () => {
  const id = Number($('segmentation').value);
  chooseSegmentation(state.segmentations.find((s) => s.id === id) || null);
  refreshSlice();
});
$('refresh').addEventListener('click', async () => {
  await Promise.all([loadSegmentations(), loadPrompts(), loadCoverage()]);
  if (state.sam.on) refreshAnnotatorMasks();
  await refreshSlice();
});
$('sam-annotators').addEventListener('change', () => {
  state.sam.on = $('sam-annotators').checked;
  refreshAnnotatorMasks();
});
$('download').addEventListener('click', async (event) => {
  event.preventDefault();
  const seg = state.segmentation;
  if (!seg) return;
  try {
    setStatus('Downloading the mask…');
    await state.api.download(`segmentations/${seg.id}/mask`, `${state.volume.case_id}_segmentation_${seg.id}.nii.gz`);
    setStatus('Mask downloaded.');
  } catch (error) {
    setStatus(`Download failed: ${describe(error)}`, true);
  }
});
$('canvas').addEventListener(
  'wheel',
  (event) => {
    event.preventDefault();
    if (event.ctrlKey) {
      wheelZoom(view, event);
    } else {
      showSlice(state.slice + (event.deltaY > 0 ? 1 : -1));
    }
  },
  { passive: false },
);

onKeys(view, (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return true;
  const steps = { ArrowUp: -1, ArrowDown: 1, k: -1, j: 1, PageUp: -10, PageDown: 10 };
  if (event.key in steps) {
    event.preventDefault();
    showSlice(state.slice + steps[event.key]);
  } else if (event.key === 'Home' || event.key === 'End') {
    event.preventDefault();
    showSlice(event.key === 'Home' ? 0 : state.volume.n_slices - 1);
  } else if (event.key === 'm' || event.key === 'M') {
    state.showMask = !state.showMask;
    setStatus(state.showMask ? 'Mask shown.' : 'Mask hidden.');
    view.render();
  } else if (event.key === 'p' || event.key === 'P') {
    $('show-prompts').click();
  } else if (event.key === 's' || event.key === 'S') {
    $('sam-annotators').click();
  } else {
    return false;
  }
  return true;
});

new ResizeObserver(() => drawCoverage()).observe($('coverage'));

startPage({ load, show });

window.crowdsamReview = { state, view };
