// SPDX-License-Identifier: AGPL-3.0-or-later
/*
 * The viewer's own React instance, borrowed at run time.
 *
 * The prebuilt OHIF dist has no global React, and a second React copy would break hooks ("invalid hook
 * call"). Its rspack runtime exposes the chunk array `globalThis.rspackChunk`: pushing a chunk with a
 * runtime callback hands us `__webpack_require__`, whose module table holds React. This depends on the
 * build, so the OHIF version is pinned (viewer_extension/install.py) and tests/e2e fail loudly when the
 * lookup stops working.
 */

export const EXPECTED_REACT_MAJOR = 18;
const REACT_MODULE_ID_3_13_2 = '86326'; // React's module id in @ohif/app 3.13.2; checked, then scanned for

let cached = null;
let lookups = 0;

function isReact(candidate) {
  return Boolean(
    candidate &&
      typeof candidate.createElement === 'function' &&
      typeof candidate.useState === 'function' &&
      typeof candidate.useEffect === 'function' &&
      typeof candidate.version === 'string'
  );
}

function webpackRequire() {
  const chunks = globalThis.rspackChunk;
  if (!chunks || typeof chunks.push !== 'function') {
    return null;
  }
  let req = null;
  chunks.push([[`orthanc-ai-react-lookup-${Date.now()}-${lookups++}`], {}, r => (req = r)]);
  return req && req.m ? req : null;
}

/** The host React, or null when this OHIF build does not expose it the way 3.13.2 does. */
export function getHostReact() {
  if (cached) {
    return cached;
  }
  const req = webpackRequire();
  if (req) {
    const cache = req.c || null;
    const evaluated = id => !cache || Boolean(cache[id]); // never evaluate a second copy of a module
    if (req.m[REACT_MODULE_ID_3_13_2] && evaluated(REACT_MODULE_ID_3_13_2)) {
      const mod = req(REACT_MODULE_ID_3_13_2);
      if (isReact(mod)) {
        cached = mod;
      }
    }
    if (!cached) {
      for (const id of Object.keys(req.m)) {
        const source = Function.prototype.toString.call(req.m[id]);
        if (source.includes('react.production') && source.includes('Symbol.for("react.element")') && evaluated(id)) {
          const mod = req(id);
          if (isReact(mod)) {
            cached = mod;
            break;
          }
        }
      }
    }
  }
  if (cached && Number(cached.version.split('.')[0]) !== EXPECTED_REACT_MAJOR) {
    console.error(`[orthanc-ai] host React ${cached.version} is not React ${EXPECTED_REACT_MAJOR}: not used`);
    cached = null;
  }
  return cached;
}
