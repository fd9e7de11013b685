// Start-up shared by the pages (annotate, review): the token, signing in and out, status messages, and the
// keys and zoom controls both pages have. A page calls startPage() once and onKeys() for its own keys.
//
// The token comes from the link's fragment (#token=…, which browsers never send to a server, so it is in
// no access log; then removed from the address bar and history) or the sign-in form, and is kept in
// sessionStorage only (closing the tab forgets it). A ?token= query is refused: it reached the server (and
// its log) and sits in the browser history; it is removed from the address bar, never stored.
import { Api, ApiError, describe } from './api.js';

export const $ = (id) => document.getElementById(id);

const KEY = 'crowdsam.token';

const QUERY_TOKEN_REFUSED =
  'Tokens in ?token= links are not accepted (they end up in server logs and browser history); it was ' +
  'removed from the address bar. Paste your token below, or open a link of the form ' +
  '/annotate#token=… instead. If the link was shared, ask for a new token.';

// ---------------------------------------------------------------- token

/**
 * Take a token from the URL fragment (then strip it from the visible URL and history), else from the session.
 * Returns {token, notice}: with a ?token= query, token is null and notice says why.
 */
function takeToken() {
  const url = new URL(window.location.href);
  let notice = '';
  if (url.searchParams.has('token')) {
    url.searchParams.delete('token');
    notice = QUERY_TOKEN_REFUSED;
  }
  const fragment = new URLSearchParams(url.hash.slice(1));
  const fromFragment = fragment.get('token');
  if (fromFragment !== null) {
    fragment.delete('token');
    const rest = fragment.toString();
    url.hash = rest ? `#${rest}` : '';
    if (fromFragment.trim() && !notice) sessionStorage.setItem(KEY, fromFragment.trim());
  }
  if (notice || fromFragment !== null) {
    window.history.replaceState(window.history.state, '', url.pathname + url.search + url.hash);
  }
  return { token: notice ? null : sessionStorage.getItem(KEY), notice };
}

// A #token= link opened in a tab that already shows the page changes only the fragment (no page load):
// load the page afresh so that takeToken() sees it.
window.addEventListener('hashchange', () => {
  if (new URLSearchParams(window.location.hash.slice(1)).has('token')) window.location.reload();
});

function clearToken() {
  sessionStorage.removeItem(KEY);
}

/** Show the sign-in form (elements #login, #workspace, #logout, #login-error, #token-input). */
export function showLogin(message = '') {
  $('login').hidden = false;
  $('workspace').hidden = true;
  $('logout').hidden = true;
  $('login-error').textContent = message;
  $('token-input').focus();
}

function showWorkspace() {
  $('login').hidden = true;
  $('workspace').hidden = false;
  $('logout').hidden = false;
}

/** The answer to a refused token: forget it (401 only; a 403 token is valid, just not allowed here), sign in. */
export function signInAgain(error, message = describe(error)) {
  if (error instanceof ApiError && error.status === 401) clearToken();
  showLogin(message);
}

// ---------------------------------------------------------------- start-up

/**
 * Start the page: wire the sign-in form and *Sign out*, take the token, then for every token (the link's,
 * the session's or one typed in) `load(api)` — the page's first requests; when it throws, the sign-in
 * form shows why. After it succeeded the workspace is shown and `show()` runs. `onSignOut()` runs after
 * *Sign out* forgot the token.
 */
export function startPage({ load, show, onSignOut = () => {} }) {
  async function start(token) {
    const api = new Api(token);
    try {
      await load(api);
    } catch (error) {
      signInAgain(error);
      return;
    }
    showWorkspace();
    await show();
  }
  $('login-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const input = $('token-input');
    const value = input.value.trim();
    if (!value) return;
    sessionStorage.setItem(KEY, value);
    input.value = '';
    start(value);
  });
  $('logout').addEventListener('click', () => {
    clearToken();
    onSignOut();
    showLogin('Signed out.');
  });
  const { token, notice } = takeToken();
  if (token) start(token);
  else showLogin(notice);
}

/** A message in the page's aria-live status line. */
export function setStatus(text, isError = false) {
  const el = $('status');
  el.textContent = text;
  el.classList.toggle('error', isError);
}

// ---------------------------------------------------------------- keys and zoom

/**
 * Page keys: `handle(event)` sees every keydown while the workspace shows and no field that takes keys has
 * the focus (text inputs, selects, and inputs whose type is not in `inputsWithoutKeys`); it returns true
 * when it used the key. Otherwise, without Ctrl/Alt/Meta, `+`/`=`, `-` and `0` zoom `view` in, out, to fit.
 */
export function onKeys(view, handle, { inputsWithoutKeys = ['checkbox'] } = {}) {
  document.addEventListener('keydown', (event) => {
    if ($('workspace').hidden || takesKeys(event.target, inputsWithoutKeys)) return;
    if (handle(event) || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key === '+' || event.key === '=') view.zoomBy(1.25);
    else if (event.key === '-') view.zoomBy(1 / 1.25);
    else if (event.key === '0') view.reset();
  });
}

function takesKeys(target, inputsWithoutKeys) {
  return (target instanceof HTMLInputElement && !inputsWithoutKeys.includes(target.type))
    || target instanceof HTMLTextAreaElement || target instanceof HTMLSelectElement;
}

/** The zoom buttons (#zoom-in, #zoom-out, #zoom-fit). */
export function bindZoomButtons(view) {
  $('zoom-in').addEventListener('click', () => view.zoomBy(1.25));
  $('zoom-out').addEventListener('click', () => view.zoomBy(1 / 1.25));
  $('zoom-fit').addEventListener('click', () => view.reset());
}

/** Zoom one wheel step about the pointer. */
export function wheelZoom(view, event) {
  const rect = view.canvas.getBoundingClientRect();
  view.zoomBy(event.deltaY < 0 ? 1.15 : 1 / 1.15, event.clientX - rect.left, event.clientY - rect.top);
}
