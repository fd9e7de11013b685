// A persistent outbox for prompt submissions: nothing drawn is lost on a flaky connection.
//
// Each submission is stored in localStorage before it is sent and removed only once the server
// has answered 2xx (or a definite 4xx "no"). Network failures and 5xx are retried with exponential
// backoff; a reload resumes the queue. The boxes carry client_ids generated once per box, so a
// retry of a request whose answer was lost is recognised by the server as a duplicate, not stored
// twice. Only one flush runs at a time: no request is ever in flight twice.
import { ApiError } from './api.js';
import { uuid } from './uuid.js';

const KEY = 'crowdsam.outbox.v1';
const BASE_DELAY_MS = 1000;
const MAX_DELAY_MS = 30_000;

/** A short tag of the token (FNV-1a), so one browser's queue is sent only by the token that made it. */
export function ownerTag(token) {
  let hash = 0x811c9dc5;
  for (let i = 0; i < token.length; i += 1) {
    hash ^= token.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193) >>> 0;
  }
  return hash.toString(16).padStart(8, '0');
}

export function backoffDelay(attempt) {
  const delay = Math.min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** Math.max(0, attempt - 1));
  return Math.round(delay * (0.8 + 0.4 * Math.random()));
}

export class Outbox {
  /** onEvent({state: 'sending'|'waiting'|'sent'|'rejected'|'blocked'|'idle', ...}) reports progress. */
  constructor(api, owner, onEvent = () => {}, storage = window.localStorage) {
    this.api = api;
    this.owner = owner;
    this.onEvent = onEvent;
    this.storage = storage;
    this.running = null;
    this.wake = null;
    window.addEventListener('online', () => this.wake && this.wake());
  }

  _load() {
    try {
      return JSON.parse(this.storage.getItem(KEY) || '[]');
    } catch {
      return [];
    }
  }

  _save(entries) {
    this.storage.setItem(KEY, JSON.stringify(entries));
  }

  /** This owner's pending entries, oldest first. */
  pending() {
    return this._load().filter((entry) => entry.owner === this.owner);
  }

  /** Queue a POST of `body` to `path`; returns the entry id. Persisted before anything is sent. */
  add(path, body, meta = {}) {
    const entry = { id: uuid(), owner: this.owner, path, body, meta, attempts: 0, queued_at: Date.now() };
    this._save([...this._load(), entry]);
    return entry.id;
  }

  _remove(id) {
    this._save(this._load().filter((entry) => entry.id !== id));
  }

  _bump(id) {
    const entries = this._load();
    const entry = entries.find((e) => e.id === id);
    if (entry) entry.attempts += 1;
    this._save(entries);
    return entry ? entry.attempts : 0;
  }

  _sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.wake = done;
    }).finally(() => {
      this.wake = null;
    });
  }

  /**
   * Send every pending entry, oldest first, retrying transient failures until they succeed.
   * Resolves to {sent: {id: response}, rejected: {id: ApiError}, blocked: ApiError|null};
   * `blocked` is set when the token was refused (entries stay queued for the next sign-in).
   */
  flush() {
    if (!this.running) {
      this.running = this._run().finally(() => {
        this.running = null;
      });
    }
    return this.running;
  }

  async _run() {
    const result = { sent: {}, rejected: {}, blocked: null };
    for (;;) {
      const entry = this.pending()[0];
      if (!entry) break;
      const attempt = this._bump(entry.id);
      this.onEvent({ state: 'sending', entry, attempt });
      try {
        const response = await this.api.json(entry.path, { method: 'POST', json: entry.body });
        this._remove(entry.id);
        result.sent[entry.id] = response;
        this.onEvent({ state: 'sent', entry, response });
      } catch (error) {
        if (error instanceof ApiError && error.auth) {
          result.blocked = error;
          this.onEvent({ state: 'blocked', entry, error });
          break;
        }
        if (error instanceof ApiError && !error.transient) {
          this._remove(entry.id);
          result.rejected[entry.id] = error;
          this.onEvent({ state: 'rejected', entry, error });
          continue;
        }
        const delay = backoffDelay(attempt);
        this.onEvent({ state: 'waiting', entry, attempt, delay, error });
        await this._sleep(delay);
      }
    }
    this.onEvent({ state: 'idle' });
    return result;
  }
}
