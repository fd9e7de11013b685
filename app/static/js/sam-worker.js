// The SAM prompt decoder off the page's main thread (a same-origin module worker started by sam.js): it owns
// onnxruntime-web (vendored WebAssembly, app/static/vendor/onnxruntime-web/), the decoder sessions and the
// slice embeddings, and answers each decode with finished display-size masks, so drawing never waits for it.
//
// Messages {id, op, ...} → {id, ok, reply | error}:
//   warm {threads?}                        load onnxruntime-web (threads: fewer WASM threads than the default)
//   decoder {decoder, bytes}               create the session for decoder id (once)
//   embedding {key, halves, shape}         keep an embedding (float16 bits, transferred)
//   drop {key}                             forget it
//   decode {decoder, key, meta, prompts}   → [{mask (Uint8Array H×W, transferred), width, height, decodeMs}]
import { LOW_RES, halfToFloat, postprocess, promptTokens } from './sam-core.js';

const VENDOR = new URL('../vendor/onnxruntime-web/', import.meta.url).href;

let ortPromise = null;

/**
 * onnxruntime-web, WASM EP. Threads need SharedArrayBuffer, i.e. a cross-origin isolated page; then one thread
 * per core but one (the page's own thread draws), at most 4: 1 on a 2-core machine, where a second thread
 * made each run slower in bench/web_decoder.py (cores shared with the page and other programs).
 */
function loadOrt() {
  if (!ortPromise) {
    ortPromise = import(`${VENDOR}ort.wasm.min.mjs`).then((ort) => {
      ort.env.wasm.wasmPaths = VENDOR;
      const cores = navigator.hardwareConcurrency || 1;
      ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.max(1, Math.min(4, cores - 1)) : 1;
      ort.env.wasm.proxy = false; // this worker is the proxy
      return ort;
    });
    ortPromise.catch(() => { ortPromise = null; });
  }
  return ortPromise;
}

const sessions = new Map(); // decoder id -> Promise<InferenceSession>
const embeddings = new Map(); // key -> ort.Tensor

async function decode({ decoder, key, meta, prompts }) {
  const ort = await loadOrt();
  const session = await sessions.get(decoder);
  const embedding = embeddings.get(key);
  if (!session) throw new Error(`decoder ${decoder} is not loaded`);
  if (!embedding) throw new Error(`embedding ${key} is not loaded`);
  // Prompts of one layout (number of points, box or not) share a call, as the worker batches them.
  const groups = new Map();
  prompts.forEach((prompt, index) => {
    const layout = `${prompt.points.length}:${Boolean(prompt.box)}`;
    if (!groups.has(layout)) groups.set(layout, []);
    groups.get(layout).push(index);
  });
  const results = new Array(prompts.length);
  for (const indices of groups.values()) {
    const started = performance.now();
    const built = indices.map((i) => promptTokens(prompts[i], meta));
    const n = built[0].tokens;
    const coords = new Float32Array(indices.length * n * 2);
    const labels = new Float32Array(indices.length * n);
    built.forEach((t, b) => { coords.set(t.coords, b * n * 2); labels.set(t.labels, b * n); });
    const output = await session.run({
      image_embeddings: embedding,
      point_coords: new ort.Tensor('float32', coords, [indices.length, n, 2]),
      point_labels: new ort.Tensor('float32', labels, [indices.length, n]),
    });
    const logits = output[session.outputNames[0]].data;
    const size = LOW_RES * LOW_RES;
    indices.forEach((index, b) => {
      results[index] = postprocess(logits.subarray(b * size, (b + 1) * size), meta);
    });
    const perPrompt = (performance.now() - started) / indices.length;
    for (const index of indices) results[index].decodeMs = perPrompt;
  }
  return results;
}

async function handle(message) {
  const ort = await loadOrt();
  switch (message.op) {
    case 'warm':
      if (message.threads) { // ?sam_threads= (the bench compares): any count up to 4 where threads are possible
        ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.max(1, Math.min(4, message.threads)) : 1;
      }
      return {};
    case 'decoder':
      if (!sessions.has(message.decoder)) {
        const created = ort.InferenceSession.create(new Uint8Array(message.bytes), {
          executionProviders: ['wasm'], graphOptimizationLevel: 'all',
        });
        created.catch(() => sessions.delete(message.decoder));
        sessions.set(message.decoder, created);
      }
      await sessions.get(message.decoder);
      return { threads: ort.env.wasm.numThreads };
    case 'embedding':
      embeddings.set(message.key, new ort.Tensor('float32', halfToFloat(new Uint16Array(message.halves)), message.shape));
      return {};
    case 'drop':
      embeddings.delete(message.key);
      return {};
    case 'decode':
      return decode(message);
    default:
      throw new Error(`unknown op ${message.op}`);
  }
}

self.addEventListener('message', async ({ data }) => {
  try {
    const reply = await handle(data);
    const transfer = Array.isArray(reply) ? reply.map((r) => r.mask.buffer) : [];
    self.postMessage({ id: data.id, ok: true, reply }, transfer);
  } catch (error) {
    self.postMessage({ id: data.id, ok: false, error: String(error && error.message ? error.message : error) });
  }
});
