// Token handling shared by the pages: from the link's fragment (#token=…, which browsers never send
// to a server, so it is in no access log; then removed from the address bar and history) or a form,
// kept in sessionStorage only (closing the tab forgets it). A ?token= query is refused: it reached the
// server (and its log) and sits in the browser history; it is removed from the address bar, never stored.
const KEY = 'crowdsam.token';

export const QUERY_TOKEN_REFUSED =
  'Tokens in ?token= links are not accepted (they end up in server logs and browser history); it was ' +
  'removed from the address bar. Paste your token below, or open a link of the form ' +
  '/annotate#token=… instead. If the link was shared, ask for a new token.';

/**
 * Take a token from the URL fragment (then strip it from the visible URL and history), else from the session.
 * Returns {token, notice}: with a ?token= query, token is null and notice says why.
 */
export function takeToken() {
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

export function setToken(token) {
  sessionStorage.setItem(KEY, token.trim());
}

export function clearToken() {
  sessionStorage.removeItem(KEY);
}

/** Wire a sign-in form: calls onToken(token) with the trimmed value. */
export function bindLoginForm(form, input, onToken) {
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const value = input.value.trim();
    if (!value) return;
    setToken(value);
    input.value = '';
    onToken(value);
  });
}

/** Show the sign-in form (elements #login, #workspace, #logout, #login-error, #token-input). */
export function showLogin(message = '') {
  const $ = (id) => document.getElementById(id);
  $('login').hidden = false;
  $('workspace').hidden = true;
  $('logout').hidden = true;
  $('login-error').textContent = message;
  $('token-input').focus();
}
