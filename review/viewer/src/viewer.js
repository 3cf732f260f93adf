// radbridge reading-room viewer: one Cornerstone3D stack viewport over a DICOMweb series.
//
//   import { mountViewer } from "/static/viewer/viewer.js";
//   const v = await mountViewer(div, { wadoRsRoot: "/read/dicomweb", studyInstanceUID,
//                                      seriesInstanceUID, markers, segSopInstanceUID });
//
// Only the same origin is contacted: QIDO-RS instances, WADO-RS series metadata, WADO-RS frames
// (uncompressed explicit VR little endian) and, for the optional SEG overlay, one WADO-RS
// instance. Requests are same-origin, so the browser sends the page's cookies. Workers and wasm
// codecs are loaded from the folder this module was served from.
import {
  init as initCore,
  RenderingEngine,
  Enums as CoreEnums,
  metaData,
  utilities as coreUtils,

} from "@cornerstonejs/core";
import {
  init as initTools,
  addTool,
  ToolGroupManager,
  WindowLevelTool,
  ZoomTool,
  PanTool,
  StackScrollTool,
  AnnotationDisplayTool,
  Enums as ToolEnums,
  drawing,
  segmentation,
} from "@cornerstonejs/tools";
import { init as initLoader, wadors } from "@cornerstonejs/dicom-image-loader";
import { adaptersSEG } from "@cornerstonejs/adapters";

export const VERSION = "0.1.0";

/** Window presets: [width, center]. "default" restores the image's own VOI. */
export const PRESETS = Object.freeze({
  lung: [1500, -600],
  mediastinum: [350, 50],
  bone: [2000, 500],
  brain: [80, 40],
});

const FRAME_ACCEPT =
  'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1';
const DICOM_JSON = "application/dicom+json";
const INSTANCE_ACCEPT = 'multipart/related; type="application/dicom"';
const BUNDLE_BASE = new URL("./", import.meta.url).href;

const MARKER_TOOL = "RadbridgeNoduleMarkers";
let initialized = null;
let counter = 0;
/** viewportId -> { markersBySop: Map<sop, marker[]>, sopByImageId: Map } read by the marker tool. */
const markerState = new Map();

// ---------------------------------------------------------------------------------------------
// Nodule markers: a display-only Cornerstone tool drawing SVG circles + labels on their image.

class NoduleMarkerTool extends AnnotationDisplayTool {
  static toolName = MARKER_TOOL;

  constructor(toolProps = {}, defaultToolProps = { configuration: { color: "rgb(255, 196, 0)" } }) {
    super(toolProps, defaultToolProps);
  }

  renderAnnotation = (enabledElement, svgDrawingHelper) => {
    const { viewport } = enabledElement;
    const state = markerState.get(viewport.id);
    if (!state || typeof viewport.getCurrentImageId !== "function") return false;
    const imageId = viewport.getCurrentImageId();
    const markers = state.markersBySop.get(state.sopByImageId.get(imageId)) || [];
    const color = this.configuration.color;
    markers.forEach((m, i) => {
      // (x, y) = (column, row) pixel indices, pixel centres at integers; Cornerstone's image
      // coordinates put the top-left pixel's corner at (0, 0), hence + 0.5.
      const c = viewport.worldToCanvas(coreUtils.imageToWorldCoords(imageId, [m.x + 0.5, m.y + 0.5]));
      const e = viewport.worldToCanvas(
        coreUtils.imageToWorldCoords(imageId, [m.x + 0.5 + (m.radiusPx || 5), m.y + 0.5]),
      );
      const r = Math.max(3, Math.hypot(e[0] - c[0], e[1] - c[1]));
      const uid = `${MARKER_TOOL}-${viewport.id}-${i}`;
      drawing.drawCircle(svgDrawingHelper, uid, "circle", c, r, { color, lineWidth: 2 }, `nodule-marker-${i}`);
      if (m.label) {
        drawing.drawTextBox(svgDrawingHelper, uid, "label", [String(m.label)], [c[0] + r + 4, c[1] - r], {
          color,
          background: "rgba(0, 0, 0, 0.5)",
          fontSize: "13px",
        });
      }
    });
    return markers.length > 0;
  };
}

// ---------------------------------------------------------------------------------------------
// One-time library setup.

function initOnce() {
  initialized ??= (async () => {
    initCore();
    initLoader({
      maxWebWorkers: Math.max(1, Math.min(4, Math.floor((navigator.hardwareConcurrency || 2) / 2))),
      // build.mjs rewrites the codecs' wasm URLs to this folder already; this keeps the
      // decode worker's own lookup pointing at the same place.
      wasmBasePath: BUNDLE_BASE,
      // One exact media type for the backend: uncompressed explicit VR little endian frames.
      beforeSend: () => ({ Accept: FRAME_ACCEPT }),
    });
    initTools();
    for (const tool of [WindowLevelTool, ZoomTool, PanTool, StackScrollTool, NoduleMarkerTool]) {
      addTool(tool);
    }
  })();
  return initialized;
}

// ---------------------------------------------------------------------------------------------
// DICOMweb helpers (same origin only).

function sameOriginRoot(wadoRsRoot) {
  const url = new URL(String(wadoRsRoot), window.location.href);
  if (url.origin !== window.location.origin) {
    throw new Error(`wadoRsRoot must be on this page's origin (${window.location.origin}), got ${url.origin}`);
  }
  return url.href.replace(/\/+$/, "");
}

async function getJson(url) {
  const res = await fetch(url, { credentials: "same-origin", headers: { Accept: DICOM_JSON } });
  if (!res.ok) throw new Error(`GET ${url}: HTTP ${res.status}`);
  if (res.status === 204) return [];
  return res.json();
}

const value = (ds, tag) => ds?.[tag]?.Value?.[0];
const values = (ds, tag) => (ds?.[tag]?.Value || []).map(Number);

/** First part of a multipart/related body (RFC 2046), as an ArrayBuffer. */
function firstMultipartPart(buffer, contentType) {
  const bytes = new Uint8Array(buffer);
  if (!/multipart\//i.test(contentType || "")) return buffer;
  const m = /boundary=("?)([^";]+)\1/i.exec(contentType);
  const find = (needle, from) => {
    const n = new TextEncoder().encode(needle);
    outer: for (let i = from; i <= bytes.length - n.length; i++) {
      for (let j = 0; j < n.length; j++) if (bytes[i + j] !== n[j]) continue outer;
      return i;
    }
    return -1;
  };
  const boundary = m ? `--${m[2]}` : null;
  const start = boundary ? find(boundary, 0) : 0;
  const headersEnd = find("\r\n\r\n", Math.max(0, start));
  if (start < 0 || headersEnd < 0) throw new Error("malformed multipart response");
  const bodyStart = headersEnd + 4;
  const end = boundary ? find(`\r\n${boundary}`, bodyStart) : -1;
  return buffer.slice(bodyStart, end < 0 ? bytes.length : end);
}

// ---------------------------------------------------------------------------------------------
// Stack building: image ids, metadata prefetched into the wadors metaDataManager, sorting.

async function loadSeries(root, study, series) {
  const base = `${root}/studies/${study}/series/${series}`;
  const [instances, metadata] = await Promise.all([getJson(`${base}/instances`), getJson(`${base}/metadata`)]);
  const listed = new Set(instances.map((ds) => value(ds, "00080018")).filter(Boolean));
  const entries = [];
  for (const ds of metadata) {
    const sop = value(ds, "00080018");
    if (!sop || (listed.size && !listed.has(sop))) continue;
    if (!ds["00280010"] || !ds["00280011"]) continue; // no pixels (SR, SEG of another series...)
    const frames = Math.max(1, Number(value(ds, "00280008")) || 1);
    const first = `wadors:${base}/instances/${sop}/frames/1`;
    wadors.metaDataManager.add(first, ds);
    for (let f = 1; f <= frames; f++) {
      const imageId = f === 1 ? first : `wadors:${base}/instances/${sop}/frames/${f}`;
      entries.push({ imageId, sop, frame: f, ds });
    }
  }
  if (!entries.length) throw new Error(`series ${series}: no image instances`);
  // Sort along the slice normal (ImagePositionPatient . (row x column cosines)), most positive
  // first (superior first for axial slices); fall back to InstanceNumber, then frame number.
  const iop = values(entries[0].ds, "00200037");
  const normal =
    iop.length === 6
      ? [iop[1] * iop[5] - iop[2] * iop[4], iop[2] * iop[3] - iop[0] * iop[5], iop[0] * iop[4] - iop[1] * iop[3]]
      : null;
  const position = (e) => {
    if (!normal || e.frame > 1) return null;
    const ipp = values(e.ds, "00200032");
    return ipp.length === 3 ? ipp[0] * normal[0] + ipp[1] * normal[1] + ipp[2] * normal[2] : null;
  };
  const allPositioned = entries.every((e) => position(e) !== null);
  entries.sort((a, b) => {
    if (allPositioned) {
      const d = position(b) - position(a);
      if (Math.abs(d) > 1e-6) return d;
    }
    const n = (Number(value(a.ds, "00200013")) || 0) - (Number(value(b.ds, "00200013")) || 0);
    return n || a.frame - b.frame;
  });
  return { base, entries };
}

async function fetchSegBuffer(root, study, series, sop) {
  const url = `${root}/studies/${study}/series/${series}/instances/${sop}`;
  const res = await fetch(url, { credentials: "same-origin", headers: { Accept: INSTANCE_ACCEPT } });
  if (!res.ok) throw new Error(`GET ${url}: HTTP ${res.status}`);
  return firstMultipartPart(await res.arrayBuffer(), res.headers.get("Content-Type"));
}

// ---------------------------------------------------------------------------------------------

/**
 * Mount a stack viewer on `element` (a sized block element; its contents are replaced).
 * @returns {Promise<{setPreset(name: string): void, scroll(delta: number): void, getState(): object,
 *   setSegVisible(visible: boolean): void, resetView(): void, destroy(): void, ready: Promise<void>}>}
 */
export async function mountViewer(
  element,
  {
    wadoRsRoot,
    studyInstanceUID,
    seriesInstanceUID,
    markers = [],
    segSopInstanceUID = null,
    segSeriesInstanceUID = null,
  } = {},
) {
  if (!(element instanceof HTMLElement)) throw new TypeError("mountViewer: element must be an HTMLElement");
  if (!studyInstanceUID || !seriesInstanceUID) throw new TypeError("mountViewer: study and series UIDs are required");
  const root = sameOriginRoot(wadoRsRoot);
  await initOnce();

  const n = ++counter;
  const renderingEngineId = `radbridge-re-${n}`;
  const viewportId = `radbridge-vp-${n}`;
  const toolGroupId = `radbridge-tg-${n}`;
  const segmentationId = `radbridge-seg-${n}`;

  const { entries } = await loadSeries(root, studyInstanceUID, seriesInstanceUID);
  const imageIds = entries.map((e) => e.imageId);

  const markersBySop = new Map();
  for (const m of markers || []) {
    if (!m || !m.sopInstanceUID || !Number.isFinite(+m.x) || !Number.isFinite(+m.y)) continue;
    const list = markersBySop.get(m.sopInstanceUID) || [];
    list.push({ x: +m.x, y: +m.y, radiusPx: +m.radiusPx || 5, label: m.label ?? "" });
    markersBySop.set(m.sopInstanceUID, list);
  }
  markerState.set(viewportId, { markersBySop, sopByImageId: new Map(entries.map((e) => [e.imageId, e.sop])) });

  element.replaceChildren();
  element.style.position ||= "relative";
  const preventMenu = (e) => e.preventDefault();
  element.addEventListener("contextmenu", preventMenu);

  const renderingEngine = new RenderingEngine(renderingEngineId);
  renderingEngine.enableElement({
    viewportId,
    type: CoreEnums.ViewportType.STACK,
    element,
    defaultOptions: { background: [0, 0, 0] },
  });
  const viewport = renderingEngine.getViewport(viewportId);

  const toolGroup = ToolGroupManager.createToolGroup(toolGroupId);
  for (const tool of [WindowLevelTool, ZoomTool, PanTool, StackScrollTool, NoduleMarkerTool]) {
    toolGroup.addTool(tool.toolName);
  }
  const { MouseBindings } = ToolEnums;
  toolGroup.setToolActive(WindowLevelTool.toolName, { bindings: [{ mouseButton: MouseBindings.Primary }] });
  toolGroup.setToolActive(ZoomTool.toolName, { bindings: [{ mouseButton: MouseBindings.Secondary }] });
  toolGroup.setToolActive(PanTool.toolName, { bindings: [{ mouseButton: MouseBindings.Auxiliary }] });
  toolGroup.setToolActive(StackScrollTool.toolName, { bindings: [{ mouseButton: MouseBindings.Wheel }] });
  toolGroup.setToolEnabled(NoduleMarkerTool.toolName);
  toolGroup.addViewport(viewportId, renderingEngineId);

  await viewport.setStack(imageIds, 0);
  viewport.render();
  // Cornerstone draws into a canvas sized once: when the element's box changes (a prior
  // opened beside it, the window resized) the canvas must follow, or the image is stretched
  // and the SVG overlays (nodule markers) drift off it. keepCamera: zoom and pan stay.
  const resizeObserver = new ResizeObserver(() => {
    if (!destroyed) renderingEngine.resize(true, true);
  });
  resizeObserver.observe(element);

  let segVisible = false;
  let segLoaded = false;
  let segError = null;
  let destroyed = false;
  const segReady = segSopInstanceUID
    ? (async () => {
        try {
          // A SEG lives in its own series: WADO-RS needs that series' UID in the path.
          if (!segSeriesInstanceUID) throw new Error("segSeriesInstanceUID is required with segSopInstanceUID");
          const buffer = await fetchSegBuffer(root, studyInstanceUID, segSeriesInstanceUID, segSopInstanceUID);
          if (destroyed) return;
          const { labelMapImages } = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
            imageIds,
            buffer,
            { metadataProvider: metaData },
          );
          if (destroyed) return;
          const segImageIds = labelMapImages.flat().map((image) => image.imageId);
          segmentation.addSegmentations([
            {
              segmentationId,
              representation: {
                type: ToolEnums.SegmentationRepresentations.Labelmap,
                data: { imageIds: segImageIds },
              },
            },
          ]);
          await segmentation.addLabelmapRepresentationToViewport(viewportId, [{ segmentationId }]);
          segLoaded = true;
          segVisible = true;
          viewport.render();
        } catch (err) {
          segError = String(err?.message || err);
          console.warn("radbridge viewer: SEG overlay failed", err);
        }
      })()
    : Promise.resolve();

  const voi = () => {
    const range = viewport.getProperties()?.voiRange;
    if (!range) return { windowWidth: null, windowCenter: null };
    const { windowWidth, windowCenter } = coreUtils.windowLevel.toWindowLevel(range.lower, range.upper);
    return { windowWidth, windowCenter };
  };

  const api = {
    /** "lung" | "mediastinum" | "bone" | "brain" | "default" (the image's own window). */
    setPreset(name) {
      if (name === "default") {
        viewport.resetProperties();
      } else {
        const preset = PRESETS[name];
        if (!preset) throw new Error(`unknown preset ${name}; one of default, ${Object.keys(PRESETS).join(", ")}`);
        const [width, center] = preset;
        viewport.setProperties({ voiRange: coreUtils.windowLevel.toLowHighRange(width, center) });
      }
      viewport.render();
    },
    /** Move `delta` slices (positive: further down the sorted stack). */
    scroll(delta) {
      coreUtils.scroll(viewport, { delta: Math.trunc(delta) || 0 });
    },
    getState() {
      const index = viewport.getCurrentImageIdIndex();
      const { windowWidth, windowCenter } = voi();
      return {
        index,
        count: imageIds.length,
        windowWidth,
        windowCenter,
        zoom: viewport.getZoom(),
        sopInstanceUID: entries[index]?.sop ?? null,
        segVisible,
        segLoaded,
        segError,
      };
    },
    /** Show or hide the SEG overlay (no-op without one). */
    setSegVisible(visible) {
      if (!segLoaded) return;
      segmentation.config.visibility.setSegmentationRepresentationVisibility(
        viewportId,
        { segmentationId, type: ToolEnums.SegmentationRepresentations.Labelmap },
        !!visible,
      );
      segVisible = !!visible;
      viewport.render();
    },
    /** Zoom/pan back to fit and the image's own window; stays on the current slice. */
    resetView() {
      viewport.resetCamera();
      viewport.resetProperties();
      viewport.render();
    },
    destroy() {
      if (destroyed) return;
      destroyed = true;
      resizeObserver.disconnect();
      try {
        if (segLoaded) segmentation.removeSegmentation(segmentationId);
      } catch (err) {
        console.warn("radbridge viewer: removing the SEG failed", err);
      }
      ToolGroupManager.destroyToolGroup(toolGroupId);
      renderingEngine.destroy();
      markerState.delete(viewportId);
      element.removeEventListener("contextmenu", preventMenu);
      element.replaceChildren();
    },
    /** Resolves once the optional SEG overlay has loaded (or failed: see getState().segError). */
    ready: segReady,
  };
  return api;
}

