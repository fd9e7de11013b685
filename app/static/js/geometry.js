// Box geometry in display pixels of the full-resolution slice: [x0, y0, x1, y1], origin at the
// top-left corner of the top-left pixel, x1/y1 exclusive (DESIGN.md section 3).

export function normalize([x0, y0, x1, y1]) {
  return [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
}

export function clamp(value, lo, hi) {
  return Math.min(hi, Math.max(lo, value));
}

/** Keep a box inside a w × h image. */
export function clampBox(box, w, h) {
  const [x0, y0, x1, y1] = normalize(box);
  return [clamp(x0, 0, w), clamp(y0, 0, h), clamp(x1, 0, w), clamp(y1, 0, h)];
}

/** Round to 1/100 of a display pixel (what is sent; floats are allowed by the API). */
export function roundBox(box) {
  return box.map((v) => Math.round(v * 100) / 100);
}

/**
 * Which part of `box` is under display point (x, y) within tolerance `tol` (display px):
 * a corner ('nw','ne','sw','se'), an edge ('n','s','w','e'), 'move' (inside) or null.
 */
export function hitTest(box, x, y, tol) {
  const [x0, y0, x1, y1] = box;
  const nearX0 = Math.abs(x - x0) <= tol;
  const nearX1 = Math.abs(x - x1) <= tol;
  const nearY0 = Math.abs(y - y0) <= tol;
  const nearY1 = Math.abs(y - y1) <= tol;
  const inX = x >= x0 - tol && x <= x1 + tol;
  const inY = y >= y0 - tol && y <= y1 + tol;
  if (!inX || !inY) return null;
  const vertical = nearY0 ? 'n' : nearY1 ? 's' : '';
  const horizontal = nearX0 ? 'w' : nearX1 ? 'e' : '';
  if (vertical || horizontal) return vertical + horizontal;
  return x > x0 && x < x1 && y > y0 && y < y1 ? 'move' : null;
}

/** The box after dragging `handle` by (dx, dy) display px, kept inside the w × h image. */
export function dragBox(box, handle, dx, dy, w, h) {
  let [x0, y0, x1, y1] = box;
  if (handle === 'move') {
    const mx = clamp(dx, -x0, w - x1);
    const my = clamp(dy, -y0, h - y1);
    return [x0 + mx, y0 + my, x1 + mx, y1 + my];
  }
  if (handle.includes('w')) x0 += dx;
  if (handle.includes('e')) x1 += dx;
  if (handle.includes('n')) y0 += dy;
  if (handle.includes('s')) y1 += dy;
  return clampBox([x0, y0, x1, y1], w, h);
}

export const CURSORS = {
  move: 'move', n: 'ns-resize', s: 'ns-resize', w: 'ew-resize', e: 'ew-resize',
  nw: 'nwse-resize', se: 'nwse-resize', ne: 'nesw-resize', sw: 'nesw-resize',
};
