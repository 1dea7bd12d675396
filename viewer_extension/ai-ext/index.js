// SPDX-License-Identifier: AGPL-3.0-or-later
/*
 * Orthanc AI extension for the prebuilt OHIF 3.13.2 viewer, loaded at run time (no OHIF rebuild):
 * app-config.js imports this ES module and OHIF registers its default export.
 *
 *  - toolbar button "Segment" (command aiSegmentStudy): job, one progress toast, results appear live
 *  - "Delete study" in the study browser's "…" menu and a Delete column in the worklist (aiDeleteStudy)
 *  - right panel "Lesion follow-up" in every mode, and the page /ohif/followup?PatientID=…
 *
 * Everything that renders React needs the host React (host-react.js). Without it, the commands still
 * work and the React parts are left out, with an error in the console and in window.orthancAi.
 */

import { configure } from './api.js';
import { EXTENSION_ID, FOLLOW_UP_PANEL, ohif } from './context.js';
import { FollowUpPage, FollowUpPanel } from './followup.js';
import { getHostReact } from './host-react.js';
import { segmentStudy, showOverlay } from './segment.js';
import { deleteColumn, deleteStudy } from './studies.js';

export const VERSION = '1.0.0';
const SEGMENT_BUTTON = 'AISegment';

function status(React) {
  return {
    loaded: true,
    version: VERSION,
    reactVersion: React ? React.version : null,
    panels: Boolean(React),
    error: React ? null : 'the viewer’s React was not found: this OHIF build is not the pinned 3.13.2',
  };
}

const extension = {
  id: EXTENSION_ID,
  version: VERSION,

  preRegistration({ servicesManager, commandsManager, extensionManager, appConfig }) {
    ohif.servicesManager = servicesManager;
    ohif.commandsManager = commandsManager;
    ohif.extensionManager = extensionManager;
    configure(appConfig);
    const React = getHostReact();
    window.orthancAi = status(React);
    if (!React) {
      console.error(`[orthanc-ai] ${window.orthancAi.error}; the follow-up panel, page and worklist column are disabled`);
    }
  },

  getCommandsModule() {
    return {
      defaultContext: 'DEFAULT',
      definitions: {
        aiSegmentStudy: { commandFn: options => segmentStudy(options) },
        aiShowSegmentation: { commandFn: options => showOverlay(options) },
        aiDeleteStudy: { commandFn: options => deleteStudy(options) },
      },
    };
  },

  getPanelModule() {
    if (!getHostReact()) {
      return [];
    }
    return [
      {
        name: FOLLOW_UP_PANEL,
        iconName: 'tab-4d',
        iconLabel: 'Follow-up',
        label: 'Lesion follow-up',
        component: FollowUpPanel,
      },
    ];
  },

  getCustomizationModule() {
    const withReact = Boolean(getHostReact());
    const value = {
      'cornerstone.toolbarButtons': {
        $push: [
          {
            id: SEGMENT_BUTTON,
            uiType: 'ohif.toolButton',
            props: {
              icon: 'tab-segmentation',
              label: 'Segment',
              tooltip: 'AI segmentation of this study',
              commands: 'aiSegmentStudy',
              evaluate: 'evaluate.action',
            },
          },
        ],
      },
      'cornerstone.toolbarSections': { primary: { $push: [SEGMENT_BUTTON] } },
      'studyBrowser.studyMenuItems': {
        $push: [{ id: 'aiDeleteStudy', label: 'Delete study', iconName: 'Delete', commands: 'aiDeleteStudy' }],
      },
    };
    if (withReact) {
      value['routes.customRoutes'] = { routes: { $push: [{ path: '/followup', children: FollowUpPage }] } };
      // before the last column (the worklist's own actions)
      value['workList.columns'] = { $apply: cols => [...cols.slice(0, -1), deleteColumn(), ...cols.slice(-1)] };
    }
    return [{ name: 'global', value }];
  },
};

export default extension;
