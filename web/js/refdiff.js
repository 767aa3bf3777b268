// RefDiff web extension: see what the method sees, on the nodes themselves.
// - RefDiffGenerativeMap: the attention map of every word of the referring text over the image (a strip of
//   small heatmaps, the root marked); clicking a word sets the node's token_override.
// - RefDiffFuseSelect: the proposals ranked by fused score with s_G, s_D and s on each (with RefDiffSpatial's
//   scores: the base score and the spatial terms, each term in the tooltip), the chosen one
//   highlighted; clicking one sets the node's pin_index.
// The nodes send what is shown in their ui output ("refdiff_tokens", "refdiff_proposals"); without this
// extension they run the same and show their usual preview image.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { ensureStyle, galleryHeight, renderGallery, renderTokenStrip, stripHeight } from "./refdiff_views.js";

const VIEWS = {
  RefDiffGenerativeMap: { kind: "tokens", key: "refdiff_tokens", widget: "token_override" },
  RefDiffFuseSelect: { kind: "proposals", key: "refdiff_proposals", widget: "pin_index" },
};

function thumbURL(ref) {
  const params = new URLSearchParams({
    filename: ref.filename,
    subfolder: ref.subfolder ?? "",
    type: ref.type ?? "temp",
  });
  return api.apiURL(`/view?${params.toString()}`);
}

function widgetOf(node, name) {
  return node.widgets?.find((w) => w.name === name) ?? null;
}

/** The widget `name` when the user may set it from the view; null when a link drives that input. */
function settableWidget(node, name) {
  const widget = widgetOf(node, name);
  if (!widget) return null;
  const input = node.inputs?.find((i) => i.widget?.name === name || i.name === name);
  return input && input.link != null ? null : widget;
}

function markChanged(node, edited = true) {
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
  if (!edited) return;
  try {
    app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
  } catch (error) {
    console.debug("[RefDiff] change tracking unavailable", error);
  }
}

function setWidgetValue(node, name, value) {
  const widget = settableWidget(node, name);
  if (!widget) return;
  widget.value = value;
  widget.callback?.(widget.value, app.canvas, node);
  markChanged(node);
}

/** The DOM widget's height: the view's content plus the widget's margins above and below. */
function viewHeight(view) {
  const content = view.spec.kind === "tokens"
    ? stripHeight(view.data)
    : galleryHeight(view.data, view.node.size?.[0] ?? 320);
  return content + 2 * (view.widget?.margin ?? 10);
}

function render(view) {
  const { node, spec, element } = view;
  element.dataset.nodeId = String(node.id);
  const widget = settableWidget(node, spec.widget);
  if (spec.kind === "tokens") {
    renderTokenStrip(element, view.data, {
      current: widget ? String(widget.value ?? "") : null,
      thumbURL,
      onPick: (_, value) => {
        setWidgetValue(node, spec.widget, value);
        render(view);
      },
    });
  } else {
    const pin = widget ? Number(widget.value) : null;
    renderGallery(element, view.data, {
      pin: Number.isFinite(pin) ? pin : null,
      width: node.size?.[0] ?? 320,
      thumbURL,
      onPin: (value) => {
        setWidgetValue(node, spec.widget, value);
        render(view);
      },
    });
  }
}

function attachView(node, spec) {
  if (node.refdiffView) return node.refdiffView;
  ensureStyle();
  const element = document.createElement("div");
  element.className = `refdiff-panel refdiff-${spec.kind}`;
  element.dataset.refdiffView = spec.kind;
  const view = { node, spec, element, data: null };
  const widget = node.addDOMWidget(`refdiff_${spec.kind}`, "refdiff_view", element, {
    serialize: false, // neither in the saved workflow nor in the prompt
    hideOnZoom: false,
    getMinHeight: () => viewHeight(view),
    getMaxHeight: () => viewHeight(view),
  });
  widget.serialize = false;
  view.widget = widget;
  node.refdiffView = view;
  // Keep the view's "queue to apply" marks right when the value is typed into the widget itself.
  const target = widgetOf(node, spec.widget);
  if (target) {
    const callback = target.callback;
    target.callback = function () {
      const result = callback?.apply(this, arguments);
      try {
        render(view);
      } catch (error) {
        console.error("[RefDiff] view update failed", error);
      }
      return result;
    };
  }
  const onResize = node.onResize;
  node.onResize = function () {
    const result = onResize?.apply(this, arguments);
    try {
      if (view.spec.kind === "proposals" && view.data) render(view);
      // The canvas enlarges a node while drawing it (when a preview image arrives) and redraws only the
      // background: redraw the nodes too, so that the frame is drawn around the view at its new size.
      markChanged(node, false);
    } catch (error) {
      console.error("[RefDiff] view update failed", error);
    }
    return result;
  };
  render(view);
  return view;
}

function showOutput(node, spec, data) {
  const view = attachView(node, spec);
  view.data = Array.isArray(data) && data.length ? data : null;
  render(view);
  const needed = node.computeSize();
  node.setSize([node.size[0], Math.max(node.size[1], needed[1])]);
  markChanged(node, false);
}

app.registerExtension({
  name: "RefDiff.Views",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const spec = VIEWS[nodeData?.name];
    if (!spec) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const result = onExecuted?.apply(this, arguments);
      try {
        showOutput(this, spec, output?.[spec.key]);
      } catch (error) {
        console.error("[RefDiff] could not show the node's view", error);
      }
      return result;
    };
  },
  nodeCreated(node) {
    const spec = VIEWS[node?.comfyClass];
    if (!spec) return;
    try {
      attachView(node, spec);
    } catch (error) {
      console.error("[RefDiff] could not add the node's view", error);
    }
  },
});
