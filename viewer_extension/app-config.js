/*
 * OHIF 3.13.2 configuration for the viewer that Orthanc serves at /ohif/ (Orthanc AI).
 * SPDX-License-Identifier: AGPL-3.0-or-later
 *
 * Same origin as Orthanc's DICOMweb (/dicom-web, /wado) and our REST API (/ai): one login (Orthanc's
 * HTTP Basic authentication) covers everything, and no CORS is needed (Orthanc 1.10 has none).
 * This file is executable code: it is installed by viewer_extension/install.py and served read-only.
 */
(function () {
  const EXTENSION_URL = '/ohif/ai-ext/index.js';
  const FOLLOW_UP_PANEL = 'orthanc-ai.panelModule.lesionFollowUp';

  // Guarded import: OHIF starts its extensions with Promise.all, so an extension URL that fails to load
  // (404, syntax error, an exception while it is evaluated) would blank the whole viewer. A caught
  // promise degrades to an empty extension instead: the viewer works, without the AI features.
  const aiExtension = import(EXTENSION_URL)
    .then(module => module.default)
    .catch(error => {
      console.error('[orthanc-ai] the AI extension failed to load; the viewer runs without it', error);
      window.orthancAi = { loaded: false, error: String(error && error.message ? error.message : error) };
      return { id: 'orthanc-ai-unavailable' };
    });

  window.config = {
    name: 'orthanc-ai',
    routerBasename: '/ohif',
    extensions: [aiExtension],
    modes: [],
    customizationService: {
      global: {
        'ohif.tours': { $set: [] }, // the onboarding tour covers the toolbar and swallows the first clicks
      },
      mode: {
        // The follow-up panel on the right, in every mode; only if the extension registered it.
        '*': {
          rightPanels: {
            $apply: panels =>
              window.orthancAi && window.orthancAi.panels && !panels.includes(FOLLOW_UP_PANEL)
                ? [...panels, FOLLOW_UP_PANEL]
                : panels,
          },
        },
      },
    },
    showStudyList: true,
    investigationalUseDialog: { option: 'never' },
    maxNumberOfWebWorkers: 3,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    defaultDataSourceName: 'orthanc',
    dataSources: [
      {
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'orthanc',
        configuration: {
          friendlyName: 'Orthanc',
          name: 'orthanc',
          wadoUriRoot: '/wado',
          qidoRoot: '/dicom-web',
          wadoRoot: '/dicom-web',
          qidoSupportsIncludeField: false,
          supportsReject: false, // OHIF's reject is dcm4chee-specific; our extension deletes through Orthanc
          supportsStow: true,
          dicomUploadEnabled: true, // worklist "Upload": drag and drop files or a folder, STOW-RS to Orthanc
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          omitQuotationForMultipartRequest: true,
          bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        },
      },
    ],
    // Read by our extension (not an OHIF key): where the /ai/ routes and Orthanc's REST API live.
    orthancAi: { apiRoot: '', orthancRoot: '', pollIntervalMs: 1000 },
  };
})();
