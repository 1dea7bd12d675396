// SPDX-License-Identifier: AGPL-3.0-or-later
/*
 * The Segment button: start a job for the displayed study, follow it in one toast (queue position,
 * progress, ETA, error), then load the new result series into the study browser without a page reload
 * and offer the SEG overlay in one click.
 */

import { ai, ApiError, formatSeconds, pollInterval, sleep } from './api.js';
import { activeStudyUID, announce, displaySetsOfStudy, ohif } from './context.js';
import { getHostReact } from './host-react.js';

const TITLE = 'AI segmentation';
const ACTIVE = new Set(['pending', 'queued', 'running']);
const RESULT_MODALITIES = new Set(['SEG', 'RTSTRUCT', 'SR', 'DOC', 'PR', 'KO']);
const following = new Map(); // StudyInstanceUID -> promise of the running follow-up

/* ------------------------------------------------------------------ toast */

function progressBar(fraction) {
  const React = getHostReact();
  if (!React || fraction === null) {
    return null;
  }
  const h = React.createElement;
  return h(
    'div',
    {
      role: 'progressbar',
      'aria-valuemin': 0,
      'aria-valuemax': 100,
      'aria-valuenow': Math.round(fraction * 100),
      'data-cy': 'ai-segment-progress',
      style: { height: 4, background: 'rgba(255,255,255,0.15)', borderRadius: 2, marginTop: 6, width: '100%' },
    },
    h('div', {
      style: {
        height: 4,
        width: `${Math.round(fraction * 100)}%`,
        background: '#5acce6',
        borderRadius: 2,
        transition: 'width 0.4s',
      },
    })
  );
}

function toastMessage(text, fraction = null) {
  const React = getHostReact();
  const bar = progressBar(fraction);
  if (!React || !bar) {
    return text;
  }
  return React.createElement('div', { 'data-cy': 'ai-segment-toast' }, React.createElement('div', null, text), bar);
}

function toast(uid, { message, type = 'loading', duration = Infinity, fraction = null, action } = {}) {
  const notifications = ohif.services.uiNotificationService;
  if (!notifications) {
    console.warn(`[orthanc-ai] ${TITLE}: ${message}`);
    return;
  }
  notifications.show({
    id: `orthanc-ai-segment-${uid}`,
    title: TITLE,
    message: toastMessage(message, fraction),
    type,
    duration,
    action,
    allowDuplicates: true,
  });
}

/** One line for the state of the study's jobs, e.g. "Running — 40 %, about 12 s left" or
 * "Queued — position 2 in the queue, done in about 1 min 35 s". */
export function describeJobs(jobs) {
  const running = jobs.filter(j => j.state === 'running');
  const queued = jobs.filter(j => j.state === 'queued' || j.state === 'pending');
  const parts = [];
  let fraction = null;
  if (running.length) {
    fraction = running.reduce((s, j) => s + (Number(j.progress) || 0), 0) / running.length;
    const eta = Math.max(...running.map(j => (j.eta_seconds === null || j.eta_seconds === undefined ? -1 : j.eta_seconds)));
    const left = eta >= 0 ? formatSeconds(eta) : null;
    parts.push(`Running — ${Math.round(fraction * 100)} %${left ? `, about ${left} left` : ''}`);
    const note = running.map(j => j.message).find(Boolean);
    if (note) {
      parts.push(note);
    }
  } else if (queued.length) {
    // queue_position counts the jobs ahead (0 = next in line); eta_seconds is the time until the job is done
    const positions = queued.map(j => j.queue_position).filter(p => p !== null && p !== undefined);
    const eta = Math.max(...queued.map(j => (j.eta_seconds === null || j.eta_seconds === undefined ? -1 : j.eta_seconds)));
    const position = positions.length ? Math.min(...positions) + 1 : null;
    parts.push(
      `Queued${position !== null ? ` — position ${position} in the queue` : ''}` +
        (eta >= 0 ? `, done in about ${formatSeconds(eta)}` : '')
    );
    fraction = 0;
  }
  if (jobs.length > 1) {
    const done = jobs.filter(j => !ACTIVE.has(j.state)).length;
    parts.push(`${done} of ${jobs.length} series finished`);
  }
  return { text: parts.join(' · ') || 'Starting…', fraction };
}

/* ------------------------------------------------------------------ models */

function studyModalities(uid) {
  return new Set(
    displaySetsOfStudy(uid)
      .map(ds => String(ds.Modality || '').toUpperCase())
      .filter(m => m && !RESULT_MODALITIES.has(m))
  );
}

/** Installed models that fit the study's modalities (all available ones when nothing is loaded yet). */
export async function modelsFor(uid) {
  const { models = [] } = await ai('GET', 'models');
  const available = models.filter(m => (m.status || 'available') === 'available');
  const modalities = studyModalities(uid);
  if (!modalities.size) {
    return available;
  }
  return available.filter(m => {
    const inputs = (m.inputs || []).map(i => i && i.modality).filter(Boolean);
    const accepted = [m.modality, ...inputs].flat().filter(Boolean).map(x => String(x).toUpperCase());
    return accepted.some(x => modalities.has(x));
  });
}

/** A small menu under the Segment button; resolves to the chosen model id, or null when dismissed. */
export function pickModel(models, anchor) {
  return new Promise(resolve => {
    document.querySelectorAll('[data-cy="ai-model-menu"]').forEach(el => el.remove());
    const menu = document.createElement('div');
    menu.setAttribute('data-cy', 'ai-model-menu');
    menu.setAttribute('role', 'menu');
    menu.setAttribute('aria-label', 'Choose a model');
    const rect = anchor ? anchor.getBoundingClientRect() : { left: 80, bottom: 60 };
    Object.assign(menu.style, {
      position: 'fixed',
      left: `${Math.max(8, rect.left)}px`,
      top: `${rect.bottom + 6}px`,
      zIndex: 10000,
      minWidth: '260px',
      background: '#090c29',
      border: '1px solid #3a3f99',
      borderRadius: '6px',
      padding: '4px',
      boxShadow: '0 6px 18px rgba(0,0,0,0.5)',
      color: '#fff',
      font: '14px Inter, sans-serif',
    });
    const header = document.createElement('div');
    header.textContent = 'Segment this study with';
    Object.assign(header.style, { padding: '6px 10px', color: '#9ccef9', fontSize: '12px' });
    menu.appendChild(header);
    const close = value => {
      document.removeEventListener('mousedown', outside, true);
      document.removeEventListener('keydown', onKey, true);
      menu.remove();
      resolve(value);
    };
    const outside = event => {
      if (!menu.contains(event.target)) {
        close(null);
      }
    };
    const onKey = event => {
      if (event.key === 'Escape') {
        close(null);
      }
    };
    for (const model of models) {
      const item = document.createElement('button');
      item.type = 'button';
      item.setAttribute('role', 'menuitem');
      item.setAttribute('data-cy', `ai-model-${model.id}`);
      item.textContent = `${model.name || model.id} (${model.modality})${model.demonstration ? ' — demonstration' : ''}`;
      Object.assign(item.style, {
        display: 'block',
        width: '100%',
        textAlign: 'left',
        padding: '6px 10px',
        borderRadius: '4px',
        background: 'transparent',
        color: 'inherit',
        cursor: 'pointer',
      });
      item.onmouseenter = () => (item.style.background = '#1f2463');
      item.onmouseleave = () => (item.style.background = 'transparent');
      item.onclick = () => close(model.id);
      menu.appendChild(item);
    }
    document.body.appendChild(menu);
    setTimeout(() => {
      document.addEventListener('mousedown', outside, true);
      document.addEventListener('keydown', onKey, true);
      const first = menu.querySelector('button');
      if (first) {
        first.focus();
      }
    }, 0);
  });
}

/* ------------------------------------------------------------------ results */

/**
 * Make OHIF fetch the study's series again so that new ones (our results) appear in the study browser.
 * OHIF 3.13 caches the study metadata under `${name}:${uid}` but deleteStudyMetadataPromise(uid) deletes
 * the key `uid`: delete both spellings, then retrieve.
 */
export async function reloadStudySeries(StudyInstanceUID) {
  const [dataSource] = ohif.extensionManager.getActiveDataSource();
  const name = dataSource.getConfig && dataSource.getConfig() && dataSource.getConfig().name;
  if (dataSource.deleteStudyMetadataPromise) {
    dataSource.deleteStudyMetadataPromise(StudyInstanceUID);
    if (name) {
      dataSource.deleteStudyMetadataPromise(`${name}:${StudyInstanceUID}`);
    }
  }
  await dataSource.retrieve.series.metadata({ StudyInstanceUID });
}

function resultDisplaySet(StudyInstanceUID, outputs, modality = 'SEG') {
  const wanted = new Set(outputs || []);
  const candidates = displaySetsOfStudy(StudyInstanceUID).filter(ds => ds.Modality === modality);
  const own = candidates.filter(ds =>
    (ds.instances || [ds.instance]).some(i => i && wanted.has(i.SOPInstanceUID))
  );
  const pool = own.length ? own : candidates.filter(ds => /^AI /.test(ds.SeriesDescription || ''));
  return pool[pool.length - 1] || null;
}

/**
 * Show the SEG over the image it was computed from, in the active viewport (one click). This is OHIF's
 * own path (a SEG display set in a viewport loads and hydrates it, then jumps to the first segmented
 * slice) with its "open this segmentation?" question skipped for this one request: the click was the
 * answer.
 */
export async function showOverlay({ StudyInstanceUID, outputs } = {}) {
  const uid = StudyInstanceUID || activeStudyUID();
  const { viewportGridService, segmentationService } = ohif.services;
  let seg = resultDisplaySet(uid, outputs);
  if (!seg) {
    await reloadStudySeries(uid);
    seg = resultDisplaySet(uid, outputs);
  }
  if (!seg) {
    toast(uid, { message: 'No AI segmentation in this study yet.', type: 'info', duration: 6000 });
    return false;
  }
  const viewportId = viewportGridService.getActiveViewportId();
  const shown = () => segmentationService.getSegmentationRepresentations(viewportGridService.getActiveViewportId()) || [];
  const appConfig = ohif.extensionManager.appConfig || {};
  const askBefore = appConfig.disableConfirmationPrompts;
  appConfig.disableConfirmationPrompts = true;
  try {
    viewportGridService.setDisplaySetsForViewport({ viewportId, displaySetInstanceUIDs: [seg.displaySetInstanceUID] });
    const deadline = Date.now() + 30000;
    while (!shown().length && Date.now() < deadline) {
      await sleep(250);
    }
  } finally {
    appConfig.disableConfirmationPrompts = askBefore;
  }
  if (!shown().length) {
    throw new Error('the viewer did not load the segmentation within 30 s');
  }
  announce('overlay-shown', { StudyInstanceUID: uid, displaySetInstanceUID: seg.displaySetInstanceUID });
  return true;
}

/* ------------------------------------------------------------------ the command */

async function follow(uid, jobs) {
  let current = jobs;
  for (;;) {
    const active = current.filter(j => ACTIVE.has(j.state));
    if (!active.length) {
      return current;
    }
    const { text, fraction } = describeJobs(current);
    toast(uid, { message: text, fraction });
    await sleep(pollInterval());
    current = await Promise.all(
      current.map(j => (ACTIVE.has(j.state) ? ai('GET', `jobs/${j.id}`).catch(() => j) : Promise.resolve(j)))
    );
  }
}

async function finish(uid, jobs) {
  const failed = jobs.filter(j => j.state === 'failed');
  const skipped = jobs.filter(j => j.state === 'skipped');
  const done = jobs.filter(j => j.state === 'done');
  if (failed.length) {
    toast(uid, {
      message: `Failed: ${failed.map(j => j.error || 'the job failed').join(' · ')}`,
      type: 'error',
      duration: 30000,
      action: { label: 'Retry', onClick: () => segmentStudy({ StudyInstanceUID: uid, model: failed[0].model_id, force: true }) },
    });
    return;
  }
  if (!done.length) {
    const why = skipped.map(j => j.error).find(Boolean) || 'the job was cancelled';
    toast(uid, { message: `Nothing to show: ${why}`, type: skipped.length ? 'info' : 'warning', duration: 15000 });
    return;
  }
  toast(uid, { message: 'Done — loading the result series…', fraction: 1 });
  const outputs = done.flatMap(j => j.outputs || []);
  try {
    await reloadStudySeries(uid);
  } catch (error) {
    console.error('[orthanc-ai] could not reload the study series', error);
  }
  announce('results', { StudyInstanceUID: uid, jobs: done });
  toast(uid, {
    message: 'Done: SEG, RT Structure Set, SR and PDF report added to the study browser.',
    type: 'success',
    duration: 20000,
    action: { label: 'Show overlay', onClick: () => showOverlay({ StudyInstanceUID: uid, outputs }).catch(reportOverlayError(uid)) },
  });
}

const reportOverlayError = uid => error => {
  console.error('[orthanc-ai] overlay', error);
  toast(uid, { message: `Could not show the overlay: ${error.message || error}`, type: 'error', duration: 15000 });
};

function segmentButton() {
  return document.querySelector('[data-cy="AISegment-btn"]') || document.querySelector('[data-cy="AISegment"]');
}

/** Command `aiSegmentStudy`: options {StudyInstanceUID?, model?, force?}. */
export async function segmentStudy(options = {}) {
  const uid = options.StudyInstanceUID || activeStudyUID();
  if (!uid) {
    toast('none', { message: 'Open a study first.', type: 'error', duration: 6000 });
    return;
  }
  if (following.has(uid) && !options.force) {
    toast(uid, { message: 'A segmentation of this study is already running.', type: 'loading' });
    return following.get(uid);
  }
  const run = (async () => {
    let model = options.model;
    try {
      if (!model) {
        const fitting = await modelsFor(uid);
        if (fitting.length > 1) {
          model = await pickModel(fitting, segmentButton());
          if (!model) {
            return;
          }
        } else if (fitting.length === 1) {
          model = fitting[0].id;
        }
      }
      toast(uid, { message: 'Submitting…', fraction: 0 });
      let answer;
      try {
        answer = await ai('POST', `studies/${uid}/segment`, { ...(model ? { model } : {}), force: Boolean(options.force) });
      } catch (error) {
        if (error instanceof ApiError && error.status === 409) {
          toast(uid, {
            message: 'This study was already segmented with this model; its results are in the study browser.',
            type: 'info',
            duration: 20000,
            action: { label: 'Run again', onClick: () => segmentStudy({ StudyInstanceUID: uid, model, force: true }) },
          });
          return;
        }
        throw error;
      }
      const jobs = await follow(uid, answer.jobs && answer.jobs.length ? answer.jobs : [answer]);
      await finish(uid, jobs);
    } catch (error) {
      console.error('[orthanc-ai] segmentation', error);
      toast(uid, { message: `Failed: ${error.message || error}`, type: 'error', duration: 30000 });
    }
  })();
  following.set(uid, run);
  try {
    await run;
  } finally {
    if (following.get(uid) === run) {
      following.delete(uid);
    }
  }
}
