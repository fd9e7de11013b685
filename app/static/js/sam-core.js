// SAM decoding, the pure parts (no DOM, no network): float16 → float32, the decoder's prompt tokens and the
// worker's post-processing. Imported by sam-worker.js (the decoder runs off the page's main thread).
//
// Same mask as the server: tokens as workers/sam/decode.py builds them (points, then the two box corners,
// or one padding point (0, 0) labelled -1 when there is no box; model frame = display × scale), and the
// post-processing of workers/sam/preprocess.py — bilinear (align_corners=False) upsampling of the low-res
// logits to input_size, crop to resized_size, bilinear resize to original_size, > mask_threshold; for the
// "stretch" family (MedSAM) sigmoid, bilinear straight to original_size, > 0.5.

export const LOW_RES = 256;

let HALF = null;

/** float16 bit pattern → float32 value, for all 65,536 patterns (built once). */
function halfTable() {
  if (!HALF) {
    HALF = new Float32Array(65536);
    for (let h = 0; h < 65536; h += 1) {
      const sign = h & 0x8000 ? -1 : 1;
      const exponent = (h >> 10) & 0x1f;
      const mantissa = h & 0x3ff;
      HALF[h] = exponent === 0 ? sign * mantissa * 2 ** -24
        : exponent === 31 ? (mantissa ? NaN : sign * Infinity)
          : sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
    }
  }
  return HALF;
}

/** Little-endian float16 values (every browser is little-endian) → Float32Array. */
export function halfToFloat(halves) {
  const table = halfTable();
  const out = new Float32Array(halves.length);
  for (let i = 0; i < halves.length; i += 1) out[i] = table[halves[i]];
  return out;
}

/**
 * One decoder prompt as the worker would build it: {box: [x0, y0, x1, y1] | null, points: [[x, y], …],
 * labels: [1 | 0, …]} in display pixels. Returns model-frame coords (N×2) and labels (N).
 */
export function promptTokens(prompt, meta) {
  const [sx, sy] = meta.scale;
  const n = prompt.points.length;
  const total = n + (prompt.box ? 2 : 1);
  const coords = new Float32Array(total * 2);
  const labels = new Float32Array(total).fill(-1);
  prompt.points.forEach(([x, y], i) => {
    coords[2 * i] = x * sx;
    coords[2 * i + 1] = y * sy;
    labels[i] = prompt.labels[i];
  });
  if (prompt.box) {
    const [x0, y0, x1, y1] = prompt.box;
    coords.set([x0 * sx, y0 * sy, x1 * sx, y1 * sy], 2 * n);
    labels[n] = 2;
    labels[n + 1] = 3;
  }
  return { coords, labels, tokens: total };
}

// ---- post-processing (torch's bilinear)

/** Source taps of torch's bilinear resize (align_corners=False) from length `inSize` to `outSize`. */
function bilinearTaps(inSize, outSize) {
  const scale = inSize / outSize;
  const i0 = new Int32Array(outSize);
  const i1 = new Int32Array(outSize);
  const w1 = new Float64Array(outSize);
  for (let o = 0; o < outSize; o += 1) {
    const src = Math.max(0, (o + 0.5) * scale - 0.5);
    const lo = Math.min(Math.floor(src), inSize - 1);
    i0[o] = lo;
    i1[o] = Math.min(lo + 1, inSize - 1);
    w1[o] = src - lo;
  }
  return { i0, i1, w1 };
}

/**
 * One axis of the whole post-processing as 4 taps into the low-res axis: the low-res → input_size upsample
 * (cropped to `crop`) followed by crop → `out`; for "stretch" one resize low-res → out.
 */
function axisTaps(out, crop, input, stretch) {
  const idx = new Int32Array(out * 4);
  const weight = new Float64Array(out * 4);
  if (stretch) {
    const t = bilinearTaps(LOW_RES, out);
    for (let o = 0; o < out; o += 1) {
      idx.set([t.i0[o], t.i1[o], 0, 0], o * 4);
      weight.set([1 - t.w1[o], t.w1[o], 0, 0], o * 4);
    }
    return { idx, weight };
  }
  const up = bilinearTaps(LOW_RES, input); // only the first `crop` of its outputs are used
  const down = bilinearTaps(crop, out);
  for (let o = 0; o < out; o += 1) {
    const a = down.i0[o];
    const b = down.i1[o];
    const wb = down.w1[o];
    idx.set([up.i0[a], up.i1[a], up.i0[b], up.i1[b]], o * 4);
    weight.set([(1 - wb) * (1 - up.w1[a]), (1 - wb) * up.w1[a], wb * (1 - up.w1[b]), wb * up.w1[b]], o * 4);
  }
  return { idx, weight };
}

const tapCache = new Map();

function tapsFor(meta) {
  const stretch = meta.resize === 'stretch';
  const [height, width] = meta.original_size;
  const [rh, rw] = meta.resized_size;
  const key = `${stretch}:${height}:${width}:${rh}:${rw}:${meta.input_size}`;
  if (!tapCache.has(key)) {
    tapCache.set(key, {
      y: axisTaps(height, rh, meta.input_size, stretch),
      x: axisTaps(width, rw, meta.input_size, stretch),
    });
  }
  return tapCache.get(key);
}

/** Low-res logits (256×256) → {mask: Uint8Array (H×W, 1 = inside), width, height} on the display grid. */
export function postprocess(lowRes, meta) {
  const stretch = meta.resize === 'stretch';
  const [height, width] = meta.original_size;
  const { x, y } = tapsFor(meta);
  let source = lowRes;
  if (stretch) source = lowRes.map((v) => 1 / (1 + Math.exp(-v)));
  const threshold = stretch ? 0.5 : Number(meta.mask_threshold ?? 0);
  const rows = new Float64Array(LOW_RES * width); // the x pass: every low-res row resampled to `width`
  for (let r = 0; r < LOW_RES; r += 1) {
    const base = r * LOW_RES;
    for (let c = 0; c < width; c += 1) {
      const t = c * 4;
      rows[r * width + c] = x.weight[t] * source[base + x.idx[t]] + x.weight[t + 1] * source[base + x.idx[t + 1]]
        + x.weight[t + 2] * source[base + x.idx[t + 2]] + x.weight[t + 3] * source[base + x.idx[t + 3]];
    }
  }
  const mask = new Uint8Array(height * width);
  for (let r = 0; r < height; r += 1) {
    const t = r * 4;
    const a = y.idx[t] * width;
    const b = y.idx[t + 1] * width;
    const c = y.idx[t + 2] * width;
    const d = y.idx[t + 3] * width;
    const [wa, wb, wc, wd] = [y.weight[t], y.weight[t + 1], y.weight[t + 2], y.weight[t + 3]];
    for (let col = 0; col < width; col += 1) {
      const value = wa * rows[a + col] + wb * rows[b + col] + wc * rows[c + col] + wd * rows[d + col];
      mask[r * width + col] = value > threshold ? 1 : 0;
    }
  }
  return { mask, width, height };
}

