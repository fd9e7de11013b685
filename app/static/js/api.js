// A small client for the crowdsam REST API (/api/v1). Every request carries the bearer token.
export const API = '/api/v1';

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === 'string' ? detail : JSON.stringify(detail));
    this.name = 'ApiError';
    this.status = status;
    this.detail = detail;
  }

  /** Worth retrying later (server trouble, rate limit) rather than a definite "no". */
  get transient() {
    return this.status >= 500 || this.status === 408 || this.status === 429;
  }

  get auth() {
    return this.status === 401 || this.status === 403;
  }
}

function withQuery(path, query) {
  const url = new URL(path.startsWith('/') ? path : `${API}/${path}`, window.location.origin);
  for (const [key, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== '') url.searchParams.set(key, String(value));
  }
  return url.pathname + url.search;
}

export class Api {
  constructor(token) {
    this.token = token;
  }

  /**
   * fetch() with the token; throws ApiError for non-2xx, TypeError when the network is down. `cache` is
   * fetch's cache mode ('no-store' by default; 'default' for immutable downloads such as the SAM decoder).
   */
  async request(method, path, { json, query, signal, cache = 'no-store' } = {}) {
    const headers = { Authorization: `Bearer ${this.token}` };
    const init = { method, headers, signal, cache };
    if (json !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(json);
    }
    const response = await fetch(withQuery(path, query), init);
    if (!response.ok) {
      let detail = response.statusText;
      try {
        detail = (await response.json()).detail ?? detail;
      } catch {
        /* not JSON */
      }
      throw new ApiError(response.status, detail);
    }
    return response;
  }

  /** JSON body, or null for 204 No Content. */
  async json(path, options = {}) {
    const response = await this.request(options.method || 'GET', path, options);
    if (response.status === 204) return null;
    return response.json();
  }

  /** Every item of a paginated list endpoint ({items, total, limit, offset}). */
  async all(path, query = {}, pageSize = 500) {
    const items = [];
    for (let offset = 0; ; offset += pageSize) {
      const page = await this.json(path, { query: { ...query, limit: pageSize, offset } });
      items.push(...page.items);
      if (page.items.length === 0 || items.length >= page.total) return items;
    }
  }

  /** An image endpoint decoded to an ImageBitmap (images need the header, so no <img src>). */
  async bitmap(path, query = {}, signal = undefined) {
    const response = await this.request('GET', path, { query, signal });
    return createImageBitmap(await response.blob());
  }

  /** Download a file through the token-bearing fetch and hand it to the browser as a download. */
  async download(path, filename) {
    const response = await this.request('GET', path);
    const url = URL.createObjectURL(await response.blob());
    const anchor = document.createElement('a');
    anchor.href = url;
    anchor.download = filename;
    document.body.append(anchor);
    anchor.click();
    anchor.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  }
}

/** A message for people, whatever was thrown. */
export function describe(error) {
  if (error instanceof ApiError) {
    if (error.status === 401) return 'The token was not accepted. Check it and sign in again.';
    if (error.status === 403) return `Not allowed with this token: ${error.message}`;
    return `${error.status}: ${error.message}`;
  }
  if (error instanceof TypeError) return 'The server cannot be reached (offline?).';
  return String(error && error.message ? error.message : error);
}
