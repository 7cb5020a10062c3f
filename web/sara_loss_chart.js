// Live loss chart inside the SaRA Train node.
//
// The server sends a "sara.loss" event after every optimizer step ({node, step, total, loss}); when
// the node finishes, its UI output carries the whole curve (sara_loss) and a status line
// (sara_status). The points are kept in node.properties, so the chart survives a page reload and is
// saved with the workflow (thinned to MAX_STORED points).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "SaRATrain";
const MAX_STORED = 1000;
const HEIGHT = 170;
const SMOOTHING = 0.9; // exponential moving average of the drawn trend line

function thin(points, limit) {
  if (points.length <= limit) return points;
  const stride = points.length / limit;
  return Array.from({ length: limit }, (_, i) => points[Math.floor(i * stride)]);
}

function drawChart(chart) {
  const { canvas, points, status } = chart;
  const width = canvas.clientWidth || 300;
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(HEIGHT * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.fillStyle = "#1e1e1e";
  ctx.fillRect(0, 0, width, HEIGHT);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#bbb";
  chart.container.dataset.points = String(points.length);
  if (points.length === 0) {
    ctx.fillText("SaRA loss: waiting for the first step", 8, 18);
    return;
  }
  const left = 44, right = width - 8, top = 22, bottom = HEIGHT - 18;
  const losses = points.map(([, loss]) => loss);
  let low = Math.min(...losses), high = Math.max(...losses);
  if (high - low < 1e-12) { high += 1e-6; low -= 1e-6; }
  const lastStep = points[points.length - 1][0];
  const firstStep = points[0][0];
  const x = (step) => left + ((step - firstStep) / Math.max(1, lastStep - firstStep)) * (right - left);
  const y = (loss) => bottom - ((loss - low) / (high - low)) * (bottom - top);

  ctx.strokeStyle = "#444";
  ctx.beginPath();
  ctx.moveTo(left, top); ctx.lineTo(left, bottom); ctx.lineTo(right, bottom);
  ctx.stroke();
  ctx.fillText(high.toPrecision(3), 4, top + 4);
  ctx.fillText(low.toPrecision(3), 4, bottom);
  ctx.fillText(`step ${lastStep}`, right - 60, HEIGHT - 4);

  ctx.strokeStyle = "rgba(110, 160, 255, 0.35)";
  ctx.beginPath();
  points.forEach(([step, loss], i) => (i ? ctx.lineTo(x(step), y(loss)) : ctx.moveTo(x(step), y(loss))));
  ctx.stroke();

  ctx.strokeStyle = "#6ea0ff";
  ctx.lineWidth = 2;
  ctx.beginPath();
  let trend = losses[0];
  points.forEach(([step, loss], i) => {
    trend = i ? SMOOTHING * trend + (1 - SMOOTHING) * loss : loss;
    i ? ctx.lineTo(x(step), y(trend)) : ctx.moveTo(x(step), y(trend));
  });
  ctx.stroke();
  ctx.lineWidth = 1;

  ctx.fillStyle = "#ddd";
  const last = losses[losses.length - 1];
  ctx.fillText(status || `step ${lastStep}: loss ${last.toFixed(4)}`, 8, 14);
}

function attachChart(node) {
  const container = document.createElement("div");
  container.className = "sara-loss-chart";
  container.style.width = "100%";
  const canvas = document.createElement("canvas");
  canvas.style.width = "100%";
  canvas.style.height = `${HEIGHT}px`;
  container.appendChild(canvas);
  node.properties = node.properties || {};
  node.saraChart = { container, canvas, points: node.properties.sara_loss || [], status: node.properties.sara_status || "" };
  const widget = node.addDOMWidget("sara_loss_chart", "sara_loss_chart", container, {
    serialize: false,
    getMinHeight: () => HEIGHT + 4,
  });
  widget.serialize = false;
  new ResizeObserver(() => drawChart(node.saraChart)).observe(container);
  drawChart(node.saraChart);
}

function store(node) {
  node.properties.sara_loss = thin(node.saraChart.points, MAX_STORED);
  node.properties.sara_status = node.saraChart.status;
}

app.registerExtension({
  name: "comfyui-sara.lossChart",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      attachChart(this);
      return result;
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      if (this.saraChart) {
        this.saraChart.points = this.properties?.sara_loss || [];
        this.saraChart.status = this.properties?.sara_status || "";
        drawChart(this.saraChart);
      }
      return result;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      if (this.saraChart && Array.isArray(message?.sara_loss)) {
        this.saraChart.points = message.sara_loss.map((loss, i) => [i + 1, loss]);
        this.saraChart.status = message.sara_status?.[0] || "";
        store(this);
        drawChart(this.saraChart);
      }
      return result;
    };
  },

  setup() {
    api.addEventListener("sara.loss", ({ detail }) => {
      const node = app.graph?.getNodeById(Number(detail.node)) ?? app.graph?.getNodeById(detail.node);
      if (!node?.saraChart) return;
      const chart = node.saraChart;
      if (detail.step === 1) chart.points = [];
      chart.points.push([detail.step, detail.loss]);
      chart.status = `training: step ${detail.step}/${detail.total}, loss ${detail.loss.toFixed(4)}`;
      store(node);
      drawChart(chart);
    });
  },
});
