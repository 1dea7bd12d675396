// SPDX-License-Identifier: AGPL-3.0-or-later
/*
 * Lesion follow-up: for one patient, each tracked lesion's volume and diameters over time, as a chart
 * with a table under it and a CSV download. Two places: a right-hand panel in every mode, and the full
 * page /ohif/followup?PatientID=…. Data: GET /ai/patients/{PatientID}/lesions.
 */

import { ai, aiUrl, ApiError, formatDate, routerPath } from './api.js';
import { activePatientID, ohif } from './context.js';
import { getHostReact } from './host-react.js';

export const METRICS = [
  { key: 'volume_ml', label: 'Volume', unit: 'ml' },
  { key: 'longest_diameter_mm', label: 'Longest diameter', unit: 'mm' },
  { key: 'short_axis_mm', label: 'Short axis', unit: 'mm' },
];
const COLOURS = ['#5acce6', '#f5a623', '#7ed321', '#e85d75', '#b38cff', '#50e3c2', '#f8e71c', '#ff7f50'];
const TEXT = '#d8e4f5';
const MUTED = '#8fa3bf';

/* ------------------------------------------------------------------ data */

/** {state: 'ready'|'empty'|'unavailable'|'error', data?, message} for a patient. */
export async function loadFollowUp(PatientID) {
  if (!PatientID) {
    return { state: 'empty', message: 'Open a study to see its patient’s lesions over time.' };
  }
  try {
    const data = await ai('GET', `patients/${encodeURIComponent(PatientID)}/lesions`);
    const timepoints = (data && data.timepoints) || [];
    const lesions = timepoints.reduce((n, tp) => n + ((tp.lesions || []).length), 0);
    if (!lesions) {
      return {
        state: 'empty',
        data,
        message: timepoints.length
          ? `No tracked lesions yet in ${timepoints.length} stud${timepoints.length === 1 ? 'y' : 'ies'}: run Segment on this patient’s studies.`
          : 'No AI results for this patient yet: run Segment on a study.',
      };
    }
    return { state: 'ready', data, message: '' };
  } catch (error) {
    if (error instanceof ApiError && error.status === 404 && /no route/.test(error.message)) {
      return { state: 'unavailable', message: 'Lesion follow-up is not available on this server yet.' };
    }
    if (error instanceof ApiError && error.status === 404) {
      return { state: 'empty', message: 'No AI results for this patient yet: run Segment on a study.' };
    }
    return { state: 'error', message: `Could not load the follow-up: ${error.message}` };
  }
}

function sortedTimepoints(data) {
  return [...((data && data.timepoints) || [])].sort((a, b) => String(a.date).localeCompare(String(b.date)));
}

/** One series per tracked lesion: [{id, label, points: [{date, value, status, study}]}]. */
export function lesionSeries(data, metric) {
  const byLesion = new Map();
  for (const tp of sortedTimepoints(data)) {
    for (const lesion of tp.lesions || []) {
      const id = lesion.tracking_uid || lesion.label;
      if (!byLesion.has(id)) {
        byLesion.set(id, { id, label: lesion.label || id, points: [] });
      }
      const value = lesion[metric];
      byLesion.get(id).points.push({
        date: tp.date,
        value: value === null || value === undefined ? null : Number(value),
        status: lesion.status,
        study: tp.study_instance_uid,
      });
    }
  }
  return [...byLesion.values()];
}

const CSV_COLUMNS = [
  'patient_id', 'study_instance_uid', 'date', 'tracking_uid', 'label', 'status',
  'volume_ml', 'longest_diameter_mm', 'short_axis_mm',
];

function csvCell(value) {
  if (value === null || value === undefined) {
    return '';
  }
  let text = String(value);
  if (/^[=+\-@\t\r]/.test(text) && isNaN(Number(text))) {
    text = `'${text}`; // no formulas when the file is opened in a spreadsheet
  }
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

/** The table as CSV (one row per lesion and time point). */
export function toCsv(data) {
  const rows = [CSV_COLUMNS.join(',')];
  for (const tp of sortedTimepoints(data)) {
    for (const lesion of tp.lesions || []) {
      rows.push(
        [data.patient_id, tp.study_instance_uid, tp.date, lesion.tracking_uid, lesion.label, lesion.status,
          lesion.volume_ml, lesion.longest_diameter_mm, lesion.short_axis_mm].map(csvCell).join(',')
      );
    }
  }
  return rows.join('\r\n') + '\r\n';
}

/** Download the table as CSV: the server's export when it has one (more columns), else built here. */
export async function downloadCsv(data) {
  let blob = null;
  try {
    const response = await fetch(aiUrl(`patients/${encodeURIComponent(data.patient_id)}/lesions.csv`), { credentials: 'same-origin' });
    if (response.ok) {
      blob = await response.blob();
    }
  } catch (error) {
    /* no server export: build it */
  }
  blob = blob || new Blob([toCsv(data)], { type: 'text/csv;charset=utf-8' });
  const url = URL.createObjectURL(blob);
  const link = document.createElement('a');
  link.href = url;
  link.download = `lesion-follow-up-${String(data.patient_id || 'patient').replace(/[^\w.-]+/g, '_')}.csv`;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function fmt(value, digits = 1) {
  return value === null || value === undefined || value === '' || isNaN(Number(value)) ? '—' : Number(value).toFixed(digits);
}

/* ------------------------------------------------------------------ components */

function Chart({ data, metric, width, height, fluid }) {
  const React = getHostReact();
  const h = React.createElement;
  const info = METRICS.find(m => m.key === metric);
  const series = lesionSeries(data, metric);
  const dates = sortedTimepoints(data).map(tp => tp.date);
  const values = series.flatMap(s => s.points.map(p => p.value)).filter(v => v !== null && isFinite(v));
  const pad = { left: 44, right: 40, top: 14, bottom: 30 };
  const max = values.length ? Math.max(...values) * 1.15 || 1 : 1;
  const x = date => {
    const i = dates.indexOf(date);
    return dates.length === 1 ? (pad.left + width - pad.right) / 2 : pad.left + (i * (width - pad.left - pad.right)) / (dates.length - 1);
  };
  const y = v => height - pad.bottom - (v / max) * (height - pad.top - pad.bottom);
  const ticks = [0, 0.5, 1].map(f => f * max);
  return h(
    'svg',
    {
      viewBox: `0 0 ${width} ${height}`,
      width: fluid ? '100%' : width,
      height: fluid ? undefined : height,
      preserveAspectRatio: 'xMidYMid meet',
      role: 'img',
      'aria-label': `${info.label} of each tracked lesion over time`,
      'data-cy': 'ai-followup-chart',
      style: { background: '#0b1a33', borderRadius: 4, display: 'block' },
    },
    ...ticks.map((t, i) =>
      h('g', { key: `t${i}` },
        h('line', { x1: pad.left, x2: width - pad.right, y1: y(t), y2: y(t), stroke: '#1e3356' }),
        h('text', { x: pad.left - 6, y: y(t) + 3, fill: MUTED, fontSize: 10, textAnchor: 'end' }, fmt(t, t < 10 ? 1 : 0))
      )
    ),
    h('text', { x: 4, y: 10, fill: MUTED, fontSize: 10 }, info.unit),
    ...dates.map((d, i) =>
      h('text', { key: `d${i}`, x: x(d), y: height - pad.bottom + 16, fill: MUTED, fontSize: 10, textAnchor: 'middle' }, formatDate(d))
    ),
    ...series.map((s, i) => {
      const colour = COLOURS[i % COLOURS.length];
      const pts = s.points.filter(p => p.value !== null && isFinite(p.value));
      const path = pts.map((p, k) => `${k ? 'L' : 'M'}${x(p.date).toFixed(1)},${y(p.value).toFixed(1)}`).join(' ');
      // a lesion no longer found has no measurement: a cross on the axis, not an invented value
      const gone = s.points.filter(p => (p.value === null || !isFinite(p.value)) && p.status === 'disappeared');
      return h('g', { key: s.id, 'data-cy': 'ai-followup-line' },
        pts.length > 1 && h('path', { d: path, stroke: colour, strokeWidth: 2, fill: 'none' }),
        ...pts.map((p, k) =>
          h('circle', { key: k, cx: x(p.date), cy: y(p.value), r: 3.5, fill: colour },
            h('title', null, `${s.label}, ${formatDate(p.date)}: ${fmt(p.value)} ${info.unit}`))
        ),
        ...gone.map((p, k) =>
          h('path', {
            key: `gone${k}`,
            d: `M${x(p.date) - 4},${y(0) - 4} l8,8 m0,-8 l-8,8`,
            stroke: colour,
            strokeWidth: 2,
            'data-cy': 'ai-followup-disappeared',
          }, h('title', null, `${s.label}, ${formatDate(p.date)}: disappeared`))
        )
      );
    })
  );
}

function Legend({ data }) {
  const React = getHostReact();
  const h = React.createElement;
  const series = lesionSeries(data, 'volume_ml');
  return h('div', { style: { display: 'flex', flexWrap: 'wrap', gap: 10, fontSize: 12, margin: '6px 0' } },
    ...series.map((s, i) => h('span', { key: s.id, style: { display: 'inline-flex', alignItems: 'center', gap: 4 } },
      h('span', { style: { width: 10, height: 10, borderRadius: 5, background: COLOURS[i % COLOURS.length], display: 'inline-block' } }),
      s.label)));
}

function Table({ data, compact, onOpenStudy }) {
  const React = getHostReact();
  const h = React.createElement;
  const cell = { padding: compact ? '3px 4px' : '5px 10px', borderBottom: '1px solid #1e3356', textAlign: 'left' };
  const num = { ...cell, textAlign: 'right', fontVariantNumeric: 'tabular-nums' };
  const head = compact
    ? ['Date', 'Lesion', 'Volume (ml)', 'LD (mm)']
    : ['Date', 'Lesion', 'Status', 'Volume (ml)', 'Longest diameter (mm)', 'Short axis (mm)'];
  const rows = [];
  for (const tp of sortedTimepoints(data)) {
    const lesions = tp.lesions || [];
    if (!lesions.length) {
      rows.push(h('tr', { key: `${tp.study_instance_uid}-none` },
        h('td', { style: cell }, formatDate(tp.date)),
        h('td', { style: { ...cell, color: MUTED }, colSpan: head.length - 1 }, 'no tracked lesion')));
    }
    lesions.forEach((l, i) => {
      rows.push(h('tr', { key: `${tp.study_instance_uid}-${l.tracking_uid || i}`, 'data-cy': 'ai-followup-row' },
        h('td', { style: { ...cell, whiteSpace: 'nowrap' } },
          i ? '' : onOpenStudy
            ? h(React.Fragment, null,
              h('a', { href: routerPath(`/viewer?StudyInstanceUIDs=${tp.study_instance_uid}`), style: { color: '#5acce6' } }, formatDate(tp.date)),
              tp.response && (tp.response.name || tp.response.category) && h('div', { style: { color: MUTED, fontSize: 11 } }, tp.response.name || tp.response.category))
            : formatDate(tp.date)),
        compact
          ? h('td', { style: cell }, l.label || l.tracking_uid, l.status && h('div', { style: { color: MUTED, fontSize: 10 } }, l.status))
          : h('td', { style: cell }, l.label || l.tracking_uid),
        !compact && h('td', { style: cell }, l.status || ''),
        h('td', { style: num }, fmt(l.volume_ml, 2)),
        h('td', { style: num }, fmt(l.longest_diameter_mm)),
        !compact && h('td', { style: num }, fmt(l.short_axis_mm))));
    });
  }
  return h('table', { 'data-cy': 'ai-followup-table', style: { borderCollapse: 'collapse', width: '100%', fontSize: compact ? 11 : 13 } },
    h('thead', null, h('tr', null, ...head.map(t => h('th', { key: t, style: { ...cell, color: MUTED, fontWeight: 500 } }, t)))),
    h('tbody', null, ...rows));
}

function useFollowUp(PatientID) {
  const React = getHostReact();
  const [state, setState] = React.useState({ state: 'loading', message: 'Loading…' });
  const [tick, setTick] = React.useState(0);
  React.useEffect(() => {
    const refresh = () => setTick(t => t + 1);
    window.addEventListener('orthanc-ai:results', refresh);
    return () => window.removeEventListener('orthanc-ai:results', refresh);
  }, []);
  React.useEffect(() => {
    let alive = true;
    loadFollowUp(PatientID).then(result => alive && setState(result));
    return () => {
      alive = false;
    };
  }, [PatientID, tick]);
  return [state, () => setTick(t => t + 1)];
}

function button(h, props, label) {
  return h('button', {
    type: 'button',
    ...props,
    style: { padding: '3px 10px', background: '#1f3d6b', color: '#fff', borderRadius: 4, fontSize: 12, cursor: 'pointer', border: 0 },
  }, label);
}

function MetricSwitch({ metric, setMetric }) {
  const React = getHostReact();
  const h = React.createElement;
  return h('div', { role: 'tablist', style: { display: 'flex', gap: 4, margin: '6px 0' } },
    ...METRICS.map(m => h('button', {
      key: m.key,
      type: 'button',
      role: 'tab',
      'aria-selected': metric === m.key,
      onClick: () => setMetric(m.key),
      style: {
        fontSize: 11, padding: '2px 8px', borderRadius: 10, cursor: 'pointer', border: '1px solid #2f5487',
        background: metric === m.key ? '#2f5487' : 'transparent', color: TEXT,
      },
    }, m.label)));
}

function FollowUpView({ PatientID, compact }) {
  const React = getHostReact();
  const h = React.createElement;
  const [result, refresh] = useFollowUp(PatientID);
  const [metric, setMetric] = React.useState('volume_ml');
  const data = result.data;
  const timepoints = sortedTimepoints(data);
  const width = compact ? 260 : 760;
  return h('div', { style: { color: TEXT } },
    PatientID && data && h('div', { style: { fontSize: 12, color: MUTED, marginBottom: 4 }, 'data-cy': 'ai-followup-summary' },
      `Patient ${data.patient_id || PatientID} — ${timepoints.length} time point${timepoints.length === 1 ? '' : 's'}`),
    result.state !== 'ready' && h('div', { 'data-cy': 'ai-followup-empty', style: { color: result.state === 'error' ? '#f88' : MUTED, fontSize: 13, margin: '8px 0' } }, result.message),
    result.state === 'ready' && h(React.Fragment, null,
      h(MetricSwitch, { metric, setMetric }),
      h(Chart, { data, metric, width, height: compact ? 170 : 320, fluid: compact }),
      h(Legend, { data }),
      h('div', { style: { overflowX: 'auto', marginTop: 6 } }, h(Table, { data, compact, onOpenStudy: !compact }))),
    h('div', { style: { display: 'flex', gap: 8, marginTop: 10, flexWrap: 'wrap' } },
      result.state === 'ready' && button(h, { 'data-cy': 'ai-followup-csv', onClick: () => downloadCsv(data) }, 'Download CSV'),
      button(h, { 'data-cy': 'ai-followup-refresh', onClick: refresh }, 'Refresh'),
      compact && PatientID && h('a', {
        href: routerPath(`/followup?PatientID=${encodeURIComponent(PatientID)}`),
        target: '_blank',
        rel: 'noopener',
        'data-cy': 'ai-followup-open-page',
        style: { fontSize: 12, color: '#5acce6', alignSelf: 'center' },
      }, 'Open full page')));
}

/** Right-hand panel in the viewer. */
export function FollowUpPanel() {
  const React = getHostReact();
  const h = React.createElement;
  const [PatientID, setPatientID] = React.useState(() => activePatientID());
  React.useEffect(() => {
    const { displaySetService, viewportGridService } = ohif.services;
    const update = () => setPatientID(activePatientID());
    const subs = [];
    if (displaySetService) {
      subs.push(displaySetService.subscribe(displaySetService.EVENTS.DISPLAY_SETS_ADDED, update));
      subs.push(displaySetService.subscribe(displaySetService.EVENTS.DISPLAY_SETS_CHANGED, update));
    }
    if (viewportGridService && viewportGridService.EVENTS) {
      subs.push(viewportGridService.subscribe(viewportGridService.EVENTS.ACTIVE_VIEWPORT_ID_CHANGED, update));
    }
    update();
    return () => subs.forEach(s => s && s.unsubscribe && s.unsubscribe());
  }, []);
  return h('div', { 'data-cy': 'ai-followup-panel', style: { padding: 10, overflowY: 'auto', height: '100%' } },
    h('div', { style: { fontWeight: 600, marginBottom: 6, color: TEXT } }, 'Lesion follow-up'),
    h(FollowUpView, { PatientID, compact: true }));
}

/** Full page: /ohif/followup?PatientID=… */
export function FollowUpPage() {
  const React = getHostReact();
  const h = React.createElement;
  const PatientID = new URLSearchParams(window.location.search).get('PatientID') || '';
  return h('div', {
    'data-cy': 'ai-followup-page',
    style: { height: '100vh', overflowY: 'auto', background: '#000', color: TEXT, padding: '24px 32px', fontFamily: 'Inter, sans-serif' },
  },
  h('div', { style: { maxWidth: 820 } },
    h('div', { style: { display: 'flex', alignItems: 'baseline', gap: 16, marginBottom: 12 } },
      h('h1', { style: { fontSize: 22, fontWeight: 600, margin: 0 } }, 'Lesion follow-up'),
      h('a', { href: routerPath('/'), style: { color: '#5acce6', fontSize: 13 } }, '← Study list')),
    PatientID
      ? h(FollowUpView, { PatientID, compact: false })
      : h('div', { 'data-cy': 'ai-followup-empty', style: { color: MUTED } }, 'No patient given: open this page from the viewer’s follow-up panel, or add ?PatientID=… to the address.'),
    h('p', { style: { color: MUTED, fontSize: 11, marginTop: 24, maxWidth: 760 } },
      'Measurements come from the AI results stored in the PACS. They support, and do not replace, the reading of the images.')));
}
