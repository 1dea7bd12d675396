// SPDX-License-Identifier: AGPL-3.0-or-later
/*
 * Same-origin calls to our /ai/ routes and to Orthanc's REST API. The browser already holds Orthanc's
 * HTTP Basic credentials for this origin (it asked for them when the viewer was opened), so plain fetch
 * calls are authenticated too.
 */

const settings = { apiRoot: '', orthancRoot: '', pollIntervalMs: 1000 };

export function configure(appConfig) {
  Object.assign(settings, (appConfig && appConfig.orthancAi) || {});
}

export function pollInterval() {
  return Math.max(200, Number(settings.pollIntervalMs) || 1000);
}

export class ApiError extends Error {
  constructor(message, status, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

function explain(status, body) {
  if (body && typeof body.error === 'string' && body.error) {
    return body.error;
  }
  if (status === 401 || status === 403) {
    return 'The server refused the request: sign in again (reload the page).';
  }
  if (status === 0) {
    return 'The server cannot be reached.';
  }
  return `The server answered HTTP ${status}.`;
}

async function call(url, { method = 'GET', json, body, headers = {} } = {}) {
  let response;
  try {
    response = await fetch(url, {
      method,
      credentials: 'same-origin',
      headers: json !== undefined ? { 'Content-Type': 'application/json', ...headers } : headers,
      body: json !== undefined ? JSON.stringify(json) : body,
    });
  } catch (error) {
    throw new ApiError('The server cannot be reached.', 0, null);
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch (error) {
      data = { text };
    }
  }
  if (!response.ok) {
    throw new ApiError(explain(response.status, data), response.status, data);
  }
  return data;
}

export function aiUrl(path) {
  return `${settings.apiRoot}/ai/${path}`;
}

/** A call to our /ai/ routes, e.g. ai('GET', 'models'). */
export function ai(method, path, json) {
  return call(aiUrl(path), { method, json });
}

/** A call to Orthanc's own REST API, e.g. orthanc('DELETE', 'studies/<id>'). */
export function orthanc(method, path, options = {}) {
  return call(`${settings.orthancRoot}/${path}`, { method, ...options });
}

/** Orthanc's identifier of a study, or null. */
export async function lookupStudy(StudyInstanceUID) {
  const hits = await orthanc('POST', 'tools/lookup', { body: StudyInstanceUID });
  const hit = (hits || []).find(h => h.Type === 'Study');
  return hit ? hit.ID : null;
}

export function routerPath(path) {
  const base = (window.config && window.config.routerBasename) || '';
  return `${base.replace(/\/$/, '')}/${path.replace(/^\//, '')}`;
}

export const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

/** 20220407 or 2022-04-07 → 07-Apr-2022 (OHIF's own date style). */
export function formatDate(value) {
  const m = /^(\d{4})-?(\d{2})-?(\d{2})/.exec(String(value || ''));
  if (!m) {
    return value ? String(value) : 'unknown date';
  }
  const month = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'][Number(m[2]) - 1];
  return month ? `${m[3]}-${month}-${m[1]}` : String(value);
}

/** DICOM person name "Family^Given" → "Family, Given". */
export function formatName(value) {
  if (!value) {
    return 'unknown patient';
  }
  const text = typeof value === 'object' ? value.Alphabetic || '' : String(value);
  const [family = '', given = ''] = text.split('^');
  return [family, given].filter(Boolean).join(', ') || 'unknown patient';
}

export function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) {
    return null;
  }
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) {
    return `${s} s`;
  }
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${s % 60 ? `${s % 60} s` : ''}`.trim() : `${Math.floor(m / 60)} h ${m % 60} min`;
}
