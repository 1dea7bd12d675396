// SPDX-License-Identifier: AGPL-3.0-or-later
/* What OHIF hands the extension at registration, shared by its modules. */

export const EXTENSION_ID = 'orthanc-ai';
export const FOLLOW_UP_PANEL = 'lesionFollowUp';

export const ohif = {
  servicesManager: null,
  commandsManager: null,
  extensionManager: null,
  get services() {
    return (this.servicesManager && this.servicesManager.services) || {};
  },
};

/** The StudyInstanceUID shown in the active viewport, else the first one in the URL. */
export function activeStudyUID() {
  const { viewportGridService, displaySetService } = ohif.services;
  try {
    const viewportId = viewportGridService.getActiveViewportId();
    const uids = viewportGridService.getDisplaySetsUIDsForViewport(viewportId) || [];
    const displaySet = uids.length && displaySetService.getDisplaySetByUID(uids[0]);
    if (displaySet && displaySet.StudyInstanceUID) {
      return displaySet.StudyInstanceUID;
    }
  } catch (error) {
    /* no viewer yet: the worklist */
  }
  return studyUIDsInUrl()[0] || null;
}

export function studyUIDsInUrl() {
  const query = new URLSearchParams(window.location.search);
  return (query.get('StudyInstanceUIDs') || query.get('studyInstanceUIDs') || '')
    .split(',')
    .map(s => s.trim())
    .filter(Boolean);
}

/** Display sets of one study (all of them when no study is given). */
export function displaySetsOfStudy(StudyInstanceUID) {
  const { displaySetService } = ohif.services;
  const all = (displaySetService && displaySetService.getActiveDisplaySets()) || [];
  return StudyInstanceUID ? all.filter(ds => ds.StudyInstanceUID === StudyInstanceUID) : all;
}

/** PatientID of the study in the active viewport (or of any loaded display set). */
export function activePatientID() {
  const uid = activeStudyUID();
  for (const ds of [...displaySetsOfStudy(uid), ...displaySetsOfStudy()]) {
    const instance = ds.instance || (ds.instances && ds.instances[0]);
    if (instance && instance.PatientID) {
      return instance.PatientID;
    }
  }
  return null;
}

/** Tell our own components that a study changed (results added, study deleted). */
export function announce(what, detail) {
  window.dispatchEvent(new CustomEvent(`orthanc-ai:${what}`, { detail }));
}
