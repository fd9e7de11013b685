// A canvas that shows one slice image fitted to its container, with zoom and pan, and maps
// between screen (CSS) pixels and display pixels of the full-resolution slice.
//
// scale = fit × zoom, where fit = min(canvas width / image width, canvas height / image height);
// at zoom 1 without pan the image is centred. Display point (x, y) is drawn at
// (originX + x·scale, originY + y·scale) in canvas CSS pixels.
const MIN_ZOOM = 0.5;
const MAX_ZOOM = 16;

export class View {
  constructor(canvas, onDraw) {
    this.canvas = canvas;
    this.ctx = canvas.getContext('2d');
    this.onDraw = onDraw;
    this.image = null;
    this.w = 0;
    this.h = 0;
    this.zoom = 1;
    this.panX = 0;
    this.panY = 0;
    this.cssW = 0;
    this.cssH = 0;
    this.listeners = [];
    new ResizeObserver(() => this.resize()).observe(canvas);
    this.resize();
  }

  /** Show a new image (an ImageBitmap, owned by the caller); its natural size defines display pixels. */
  setImage(image, { keepView = false } = {}) {
    const sameSize = this.image && image && image.width === this.w && image.height === this.h;
    this.image = image;
    this.w = image ? image.width : 0;
    this.h = image ? image.height : 0;
    if (!(keepView && sameSize)) this.reset();
    this.render();
  }

  resize() {
    const rect = this.canvas.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    this.cssW = rect.width;
    this.cssH = rect.height;
    const width = Math.max(1, Math.round(rect.width * dpr));
    const height = Math.max(1, Math.round(rect.height * dpr));
    if (this.canvas.width !== width || this.canvas.height !== height) {
      this.canvas.width = width;
      this.canvas.height = height;
    }
    this.render();
  }

  get fit() {
    if (!this.w || !this.h || !this.cssW || !this.cssH) return 1;
    return Math.min(this.cssW / this.w, this.cssH / this.h);
  }

  get scale() {
    return this.fit * this.zoom;
  }

  get origin() {
    const s = this.scale;
    return [(this.cssW - this.w * s) / 2 + this.panX, (this.cssH - this.h * s) / 2 + this.panY];
  }

  /** Display pixel coordinates of a pointer event / client point. */
  toDisplay(clientX, clientY) {
    const rect = this.canvas.getBoundingClientRect();
    const [ox, oy] = this.origin;
    const s = this.scale;
    return [(clientX - rect.left - ox) / s, (clientY - rect.top - oy) / s];
  }

  /** Canvas CSS pixel coordinates of a display point. */
  toScreen(x, y) {
    const [ox, oy] = this.origin;
    const s = this.scale;
    return [ox + x * s, oy + y * s];
  }

  reset() {
    this.zoom = 1;
    this.panX = 0;
    this.panY = 0;
    this._changed();
  }

  /** Zoom by `factor`, keeping the display point under canvas CSS point (cx, cy) in place. */
  zoomBy(factor, cx = this.cssW / 2, cy = this.cssH / 2) {
    const zoom = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, this.zoom * factor));
    const [x, y] = (() => {
      const [ox, oy] = this.origin;
      return [(cx - ox) / this.scale, (cy - oy) / this.scale];
    })();
    this.zoom = zoom;
    const s = this.scale;
    this.panX = cx - x * s - (this.cssW - this.w * s) / 2;
    this.panY = cy - y * s - (this.cssH - this.h * s) / 2;
    this._changed();
  }

  panBy(dx, dy) {
    this.panX += dx;
    this.panY += dy;
    this._changed();
  }

  onChange(listener) {
    this.listeners.push(listener);
  }

  _changed() {
    for (const listener of this.listeners) listener(this);
    this.render();
  }

  render() {
    if (this._frame) return;
    this._frame = requestAnimationFrame(() => {
      this._frame = null;
      this.draw();
    });
  }

  draw() {
    const ctx = this.ctx;
    const dpr = this.canvas.width / Math.max(1, this.cssW);
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = '#000';
    ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    if (!this.image) return;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const [ox, oy] = this.origin;
    const s = this.scale;
    ctx.imageSmoothingEnabled = s < 2;
    ctx.drawImage(this.image, ox, oy, this.w * s, this.h * s);
    if (this.onDraw) this.onDraw(ctx, this);
  }
}
