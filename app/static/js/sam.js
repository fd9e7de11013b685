// SAM's prompt decoder in the page (annotate and review share this module): a slice's image embedding from
// GET /volumes/{id}/slices/{k}/embedding, the ONNX prompt decoder its header names, both handed to a
// same-origin module worker (sam-worker.js: the vendored onnxruntime-web, WebAssembly) that decodes prompts
// into display-size masks exactly as the worker service does (sam-core.js), so the page never blocks on it.
//
// Prompts are grouped as workers/sam/plan.py groups them: one per box with the points of its label and
// annotator inside it; points inside no box form one point-only prompt when one of them is positive.

const MAX_RETRY_S = 5;

// ---------------------------------------------------------------- the decoding workers ("lanes")

// One worker by default. `?sam_lanes=2` on the page's address starts two (each with its own decoder session and
// embeddings): lane 0 follows the pointer; when a box is let go while lane 0 still decodes an older state, the
// final state starts at once on lane 1 instead of waiting (LivePreview). On the 2-core machine of
// bench/web_decoder.py the two runs then share the cores and it gained nothing, at twice the memory.
const ASKED_LANES = Number(new URL(self.location.href).searchParams.get('sam_lanes'));
export const LANES = ASKED_LANES === 2 && (navigator.hardwareConcurrency || 1) >= 2 ? 2 : 1;
const workers = new Array(LANES).fill(null);
const calls = new Map(); // call id -> {resolve, reject}
let nextCall = 1;

function failAll(message) {
  for (const { reject } of calls.values()) reject(new Error(message));
  calls.clear();
}

function startWorker(lane) {
  const worker = new Worker(new URL('./sam-worker.js', import.meta.url), { type: 'module', name: `crowdsam-sam-${lane}` });
  worker.addEventListener('message', ({ data }) => {
    const pending = calls.get(data.id);
    if (!pending) return;
    calls.delete(data.id);
    if (data.ok) pending.resolve(data.reply);
    else pending.reject(new Error(data.error));
  });
  worker.addEventListener('error', (event) => {
    event.preventDefault();
    failAll(`the SAM decoder worker failed: ${event.message || 'it could not start'}`);
    workers.forEach((w) => { if (w) w.terminate(); });
    workers.fill(null); // start afresh: new workers are empty
    embeddings.clear();
    decoders.clear();
  });
  return worker;
}

function call(op, payload = {}, transfer = [], lane = 0) {
  if (!workers[lane]) workers[lane] = startWorker(lane);
  const worker = workers[lane];
  const id = nextCall;
  nextCall += 1;
  return new Promise((resolve, reject) => {
    calls.set(id, { resolve, reject });
    worker.postMessage({ id, op, ...payload }, transfer);
  });
}

/** The same call on every lane (`buffer`: an ArrayBuffer payload field, copied for all lanes but the last). */
async function callAll(op, payload = {}, buffer = null) {
  const replies = [];
  for (let lane = 0; lane < LANES; lane += 1) {
    const last = lane === LANES - 1;
    const own = buffer && !last ? { ...payload, [buffer]: payload[buffer].slice(0) } : payload;
    replies.push(call(op, own, buffer ? [own[buffer]] : [], lane));
  }
  return (await Promise.all(replies))[0];
}

/**
 * Start the workers and load onnxruntime-web now (while the page fetches other things). `threads` sets the
 * WebAssembly threads per worker (the first call counts; default: cores − 1, at most 4, when cross-origin
 * isolated, else 1).
 */
export function loadOrt(threads = undefined) {
  return callAll('warm', { threads });
}

// ---------------------------------------------------------------- embeddings

function sleep(ms) {
  return new Promise((resolve) => { setTimeout(resolve, ms); });
}

const embeddings = new Map(); // `${volume}:${k}:${model}` -> Promise<Embedding>
const EMBEDDINGS_KEPT = 4;

/**
 * The embedding of slice k, loaded into the decoding worker (the last few are kept). 202 answers are retried
 * after Retry-After; `onPending()` is called while a worker service computes it. Resolves to {key, meta,
 * wireBytes, fetchMs, pendingMs}.
 */
export function getEmbedding(api, volumeId, k, model, { onPending } = {}) {
  const key = `${volumeId}:${k}:${model}`;
  if (embeddings.has(key)) {
    const hit = embeddings.get(key);
    embeddings.delete(key);
    embeddings.set(key, hit);
    return hit;
  }
  const promise = fetchEmbedding(api, volumeId, k, model, key, { onPending });
  promise.catch(() => embeddings.delete(key));
  embeddings.set(key, promise);
  while (embeddings.size > EMBEDDINGS_KEPT) {
    const oldest = embeddings.keys().next().value;
    embeddings.delete(oldest);
    callAll('drop', { key: oldest }).catch(() => {});
  }
  return promise;
}

async function fetchEmbedding(api, volumeId, k, model, key, { onPending } = {}) {
  const started = performance.now();
  let pendingMs = 0;
  for (;;) {
    const asked = performance.now();
    const response = await api.request('GET', `volumes/${volumeId}/slices/${k}/embedding`, { query: { model } });
    if (response.status === 202) {
      if (onPending) onPending();
      await sleep(Math.min(MAX_RETRY_S, Math.max(0.2, Number(response.headers.get('Retry-After')) || 1)) * 1000);
      pendingMs += performance.now() - asked;
      continue;
    }
    const meta = JSON.parse(response.headers.get('X-Crowdsam-Embedding') || '{}');
    const halves = await response.arrayBuffer(); // fetch inflated the gzip: float16 LE, C order
    const expected = (meta.shape || []).reduce((a, b) => a * b, 1);
    if (halves.byteLength !== expected * 2) throw new Error(`the embedding has ${halves.byteLength / 2} values, its header says ${expected}`);
    await callAll('embedding', { key, halves, shape: meta.shape }, 'halves');
    return { key, meta, wireBytes: meta.bytes, fetchMs: performance.now() - started, pendingMs };
  }
}

// ---------------------------------------------------------------- the decoder

const decoders = new Map(); // decoder id -> Promise<{id, loadMs, bytes, threads}>

/** The ONNX prompt decoder an embedding header names ({id, url, bytes, sha256}), loaded once per id. */
export function getDecoder(api, decoder) {
  if (!decoder || !decoder.url) return Promise.reject(new Error('the embedding names no decoder'));
  const id = decoder.id || decoder.url;
  if (!decoders.has(id)) {
    const promise = (async () => {
      const started = performance.now();
      loadOrt().catch(() => {});
      const response = await api.request('GET', decoder.url, { cache: 'default' }); // immutable: the HTTP cache keeps it
      const bytes = await response.arrayBuffer();
      if (decoder.sha256 && self.crypto && crypto.subtle) {
        const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
        const hex = [...digest].map((b) => b.toString(16).padStart(2, '0')).join('');
        if (hex !== decoder.sha256) throw new Error('the decoder download is corrupt (its sha256 differs)');
      }
      const size = bytes.byteLength;
      const { threads } = await callAll('decoder', { decoder: id, bytes }, 'bytes');
      return { id, loadMs: performance.now() - started, bytes: size, threads };
    })();
    promise.catch(() => decoders.delete(id));
    decoders.set(id, promise);
  }
  return decoders.get(id);
}

/**
 * Decode prompts ({box: [x0, y0, x1, y1] | null, points: [[x, y], …], labels: [1 | 0, …]}, display pixels) on an
 * embedding of getEmbedding(), on worker `lane`. Resolves to [{mask: Uint8Array (H×W, 1 = inside), width,
 * height, decodeMs}].
 */
export async function decode(api, embedding, prompts, lane = 0) {
  const decoder = await getDecoder(api, embedding.meta.decoder);
  const plain = prompts.map((p) => ({ box: p.box, points: p.points, labels: p.labels }));
  return call('decode', { decoder: decoder.id, key: embedding.key, meta: embedding.meta, prompts: plain },
    [], Math.min(lane, LANES - 1));
}

// ---------------------------------------------------------------- prompts as the worker groups them

function inside([x, y], box) {
  return box[0] <= x && x <= box[2] && box[1] <= y && y <= box[3];
}

/** The worker's order of an annotator's points of one label: by (x, y), positive first (workers/sam/plan.py). */
function pointOrder(a, b) {
  return a.point[0] - b.point[0] || a.point[1] - b.point[1] || (a.positive === b.positive ? 0 : a.positive ? -1 : 1);
}

/**
 * Decoder prompts of ONE annotator and ONE label, as workers/sam/plan.py builds them: one per box, with the
 * points inside it (inclusive edges); points inside no box form one point-only prompt when one is positive.
 * `boxes`: [[x0, y0, x1, y1], …]; `points`: [{point: [x, y], positive}, …]. Returns [{box, points, labels, of}]
 * where `of` is the box's index (or -1 for the point-only prompt).
 */
export function groupPrompts(boxes, points) {
  const sorted = [...points].sort(pointOrder);
  const prompts = boxes.map((box, of) => {
    const own = sorted.filter((p) => inside(p.point, box));
    return { box, points: own.map((p) => p.point), labels: own.map((p) => (p.positive ? 1 : 0)), of };
  });
  const loose = sorted.filter((p) => !boxes.some((box) => inside(p.point, box)));
  if (loose.some((p) => p.positive)) {
    prompts.push({ box: null, points: loose.map((p) => p.point), labels: loose.map((p) => (p.positive ? 1 : 0)), of: -1 });
  }
  return prompts;
}

export function promptKey(prompt) {
  return JSON.stringify([prompt.box, prompt.points, prompt.labels]);
}

// ---------------------------------------------------------------- drawing masks

function hexRgb(color) {
  const hex = color.replace('#', '');
  return [0, 2, 4].map((i) => parseInt(hex.slice(i, i + 2), 16) || 0);
}

/** A canvas of the mask's size: mask pixels in `color` at `alpha` (0–255), the rest transparent. */
export function maskCanvas({ mask, width, height }, color, alpha = 110) {
  const canvas = document.createElement('canvas');
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  const image = ctx.createImageData(width, height);
  const [r, g, b] = hexRgb(color);
  for (let i = 0; i < mask.length; i += 1) {
    if (!mask[i]) continue;
    image.data.set([r, g, b, alpha], i * 4);
  }
  ctx.putImageData(image, 0, 0);
  return canvas;
}

/** The mask's outline as a Path2D in display pixels: pixel edges between inside and outside, runs merged. */
export function maskOutline({ mask, width, height }) {
  const path = new Path2D();
  const at = (x, y) => (x >= 0 && y >= 0 && x < width && y < height ? mask[y * width + x] : 0);
  for (let y = 0; y <= height; y += 1) { // horizontal edges between rows y-1 and y
    let start = -1;
    for (let x = 0; x <= width; x += 1) {
      const edge = x < width && at(x, y - 1) !== at(x, y);
      if (edge && start < 0) start = x;
      if (!edge && start >= 0) { path.moveTo(start, y); path.lineTo(x, y); start = -1; }
    }
  }
  for (let x = 0; x <= width; x += 1) { // vertical edges between columns x-1 and x
    let start = -1;
    for (let y = 0; y <= height; y += 1) {
      const edge = y < height && at(x - 1, y) !== at(x, y);
      if (edge && start < 0) start = y;
      if (!edge && start >= 0) { path.moveTo(x, start); path.lineTo(x, y); start = -1; }
    }
  }
  return path;
}

// ---------------------------------------------------------------- live preview: coalesced runs

/**
 * Coalesced decoding for a page: `want(id, prompt)` asks for a target's mask (a newer prompt for the same
 * id replaces a queued one: the latest pointer state wins), started on an animation frame, the `priority`
 * target first. While `dragging`, one run at a time (lane 0); otherwise a request may also start on a
 * free lane 1 while lane 0 still decodes an older state, so a let-go box does not wait for it.
 * `run(prompt, lane)` decodes; `onResult(id, prompt, result, askedAt, seq)` receives it (`seq` grows with
 * each request: a late answer to an older request must not replace a newer mask).
 */
export class LivePreview {
  constructor(run, onResult, onError = () => {}, lanes = LANES) {
    this.run = run;
    this.onResult = onResult;
    this.onError = onError;
    this.pending = new Map(); // id -> {prompt, askedAt, seq}
    this.lanes = new Array(lanes).fill(null); // per lane: {id, key} of the run in flight, or null
    this.frame = null;
    this.priority = null;
    this.dragging = false;
    this.seq = 0;
  }

  get busy() {
    return this.lanes.some((lane) => lane !== null);
  }

  want(id, prompt) {
    if (prompt.key !== undefined && this.lanes.some((f) => f && f.id === id && f.key === prompt.key)) {
      this.pending.delete(id); // that very prompt is being decoded
      return;
    }
    this.seq += 1;
    this.pending.set(id, { prompt, askedAt: performance.now(), seq: this.seq });
    this.schedule();
  }

  drop(id) {
    this.pending.delete(id);
  }

  clear() {
    this.pending.clear();
  }

  freeLane() {
    if (this.lanes[0] === null) return 0;
    if (this.dragging) return -1;
    return this.lanes.findIndex((lane) => lane === null);
  }

  schedule() {
    if (this.frame !== null || !this.pending.size || this.freeLane() < 0) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = null;
      this.pump();
    });
  }

  async pump() {
    const lane = this.freeLane();
    if (lane < 0 || !this.pending.size) return;
    const id = this.pending.has(this.priority) ? this.priority : this.pending.keys().next().value;
    const { prompt, askedAt, seq } = this.pending.get(id);
    this.pending.delete(id);
    this.lanes[lane] = { id, key: prompt.key };
    this.schedule(); // another lane may take the next request
    try {
      const result = await this.run(prompt, lane);
      this.onResult(id, prompt, result, askedAt, seq);
    } catch (error) {
      this.onError(error);
    } finally {
      this.lanes[lane] = null;
      this.schedule();
    }
  }
}
