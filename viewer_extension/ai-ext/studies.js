// SPDX-License-Identifier: AGPL-3.0-or-later
/*
 * Delete a study (study browser "…" menu and a worklist column), after a confirmation that names the
 * patient and the study date. Deletion goes through Orthanc's own REST API (same origin, same login):
 * OHIF's "reject" is specific to dcm4chee.
 */

import { ai, formatDate, formatName, lookupStudy, orthanc, routerPath } from './api.js';
import { announce, ohif, studyUIDsInUrl } from './context.js';
import { getHostReact } from './host-react.js';

function notify(message, type) {
  const notifications = ohif.services.uiNotificationService;
  if (notifications) {
    notifications.show({ title: 'Delete study', message, type, duration: type === 'error' ? 15000 : 4000 });
  }
}

/** The sentence the user confirms: who, when, what, and that it cannot be undone. */
export function confirmationText(study) {
  const patient = study.PatientMainDicomTags || {};
  const tags = study.MainDicomTags || {};
  const who = `${formatName(patient.PatientName)}${patient.PatientID ? ` (ID ${patient.PatientID})` : ''}`;
  const what = tags.StudyDescription ? ` — ${tags.StudyDescription}` : '';
  const series = (study.Series || []).length;
  return (
    `Delete the study of ${who} from ${formatDate(tags.StudyDate)}${what}?\n\n` +
    `Its ${series} series, AI results included, will be removed from the PACS. This cannot be undone.`
  );
}

/** Command `aiDeleteStudy`: options {StudyInstanceUID} (the study browser) or {studyInstanceUid} (worklist). */
export async function deleteStudy(options = {}) {
  const uid = options.StudyInstanceUID || options.studyInstanceUid;
  if (!uid) {
    return false;
  }
  let id;
  let study;
  try {
    id = await lookupStudy(uid);
    if (!id) {
      notify('This study is no longer in the PACS.', 'warning');
      return false;
    }
    study = await orthanc('GET', `studies/${id}`);
  } catch (error) {
    notify(`Could not read the study: ${error.message}`, 'error');
    return false;
  }
  if (!window.confirm(confirmationText(study))) {
    return false;
  }
  try {
    // through our route: it cancels the study's running jobs and records who deleted it in the audit trail
    await ai('DELETE', `studies/${uid}`);
  } catch (error) {
    notify(`The study was not deleted: ${error.message}`, 'error');
    return false;
  }
  const patient = study.PatientMainDicomTags || {};
  notify(`Deleted the study of ${formatName(patient.PatientName)} from ${formatDate((study.MainDicomTags || {}).StudyDate)}.`, 'success');
  announce('study-deleted', { StudyInstanceUID: uid });
  // OHIF keeps no handle to refresh its lists from outside: show a fresh worklist, or reload the viewer
  // when another study of the patient was deleted from its study browser.
  setTimeout(() => {
    if (!window.location.pathname.startsWith(routerPath('/viewer')) && !studyUIDsInUrl().length) {
      window.location.reload();
    } else if (studyUIDsInUrl().includes(uid)) {
      window.location.assign(routerPath('/'));
    } else {
      window.location.reload();
    }
  }, 1200);
  return true;
}

/**
 * The column's header. OHIF's worklist gives every column but its own a free-text filter box, which
 * means nothing for a button column: hide that box (the filter row sits in the same table).
 */
function DeleteHeader() {
  const React = getHostReact();
  const ref = React.useRef(null);
  React.useLayoutEffect(() => {
    const th = ref.current && ref.current.closest('th');
    const table = th && th.closest('table');
    const filters = table && table.querySelector('tr[data-filter-row]');
    const cell = filters && filters.children[th.cellIndex];
    if (cell) {
      cell.querySelectorAll('input').forEach(input => {
        input.style.visibility = 'hidden';
        input.tabIndex = -1;
        input.setAttribute('aria-hidden', 'true');
      });
    }
  });
  return React.createElement('span', { ref, style: { fontSize: 0 } }, 'Delete');
}

/** A worklist column with a Delete button per study row (TanStack column definition). */
export function deleteColumn() {
  return {
    id: 'orthancAiDelete',
    header: () => getHostReact().createElement(DeleteHeader),
    enableSorting: false,
    enableHiding: false,
    enableColumnFilter: false,
    cell: ({ row }) => {
      const React = getHostReact();
      const study = row.original || {};
      return React.createElement(
        'button',
        {
          type: 'button',
          title: 'Delete this study from the PACS',
          'aria-label': `Delete the study of ${formatName(study.patientName)}`,
          'data-cy': 'ai-delete-study',
          style: {
            color: '#ff8c8c',
            fontSize: 12,
            padding: '2px 8px',
            border: '1px solid rgba(255,140,140,0.4)',
            borderRadius: 4,
            background: 'transparent',
            cursor: 'pointer',
          },
          onClick: event => {
            event.stopPropagation();
            deleteStudy({ studyInstanceUid: study.studyInstanceUid || study.StudyInstanceUID });
          },
          onDoubleClick: event => event.stopPropagation(),
        },
        'Delete'
      );
    },
    meta: { label: 'Delete', minWidth: 70, headerClassName: 'w-[80px]', cellClassName: 'w-[80px]' },
  };
}
