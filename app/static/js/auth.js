// Token handling shared by the pages: from ?token= (then removed from the address bar) or a form,
// kept in sessionStorage only (closing the tab forgets it).
const KEY = 'crowdsam.token';

/** Take a token from the URL (and strip it from the visible URL and history), else from the session. */
export function takeToken() {
  const url = new URL(window.location.href);
  const fromUrl = url.searchParams.get('token');
  if (fromUrl && fromUrl.trim()) {
    sessionStorage.setItem(KEY, fromUrl.trim());
    url.searchParams.delete('token');
    window.history.replaceState(window.history.state, '', url.pathname + url.search + url.hash);
  }
  return sessionStorage.getItem(KEY);
}

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
