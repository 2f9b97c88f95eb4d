// The live page: captures the microphone (or plays a dropped file) at 16 kHz, streams it to the server, and
// shows the transcript, the exit each chunk took, and the compute spent against the budget.
// No build step: plain browser JavaScript. URL parameters (for demos and the browser test):
//   ?mode=exit:12 | ?mode=strategy:confidence   &budget=0.5   &autostart=1 (start the microphone at once)
//   &endpoint=0 (no pause ends an utterance: one until Stop)
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let info = null;
let ws = null;
let audio = null; // {ctx, node, media, timer}
let chunks = 0;
// an audio worklet that hands the page every block of microphone samples
const TAP = `class Tap extends AudioWorkletProcessor {
  process(inputs) { if (inputs[0] && inputs[0][0]) this.port.postMessage(inputs[0][0].slice(0)); return true; }
}
registerProcessor("tap", Tap);`;

function colour(exit) {
  const i = info.exits.indexOf(exit);
  const n = Math.max(info.exits.length - 1, 1);
  return `hsl(${Math.round((i / n) * 230)}, 70%, 48%)`; // red: the first exit ... blue: the last
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function loadInfo() {
  info = await (await fetch("/info")).json();
  $("model").textContent = `${info.model || "model"} · exits ${info.exits.join(", ")} · ${info.chunk_ms} ms chunks` +
    ` · last exit ${(info.full_macs_per_second / 1e6).toFixed(1)} M MACs per second of audio`;
  const mode = $("mode");
  for (const s of info.strategies) mode.add(new Option(`per chunk: ${s}, within the budget`, `strategy:${s}`));
  for (const e of info.exits.slice().reverse()) mode.add(new Option(`fixed exit ${e}`, `exit:${e}`));
  if (params.get("mode")) mode.value = params.get("mode");
  if (params.get("budget")) $("budget").value = params.get("budget");
  $("legend").innerHTML = info.exits.map((e) => `<span><i style="background:${colour(e)}"></i>exit ${e}</span>`).join("");
  showBudget();
}

function settings() {
  const v = $("mode").value;
  if (v.startsWith("exit:")) return { exit: Number(v.slice(5)) };
  return { strategy: v.slice(9), budget: Number($("budget").value) };
}

function streamSettings() { // ?endpoint=0: one utterance until Stop (no pause ends it)
  return { ...settings(), endpoint: params.get("endpoint") !== "0" };
}

function showBudget() {
  const dynamic = $("mode").value.startsWith("strategy:");
  $("budget").disabled = !dynamic;
  $("budget-value").textContent = Number($("budget").value).toFixed(2);
  $("meter-budget").style.left = dynamic ? `${Number($("budget").value) * 100}%` : "100%";
}

function addChunk(m) {
  const cell = document.createElement("span");
  cell.className = "chunk";
  cell.dataset.exit = m.exit;
  cell.style.background = colour(m.exit);
  cell.title = `chunk ${m.chunk}: exit ${m.exit}`;
  $("strip").appendChild(cell);
  chunks += 1;
}

function showCompute(m) {
  const used = m.macs_per_second / info.full_macs_per_second;
  let text = `${(m.macs_per_second / 1e6).toFixed(1)} M MACs per second of audio (${(used * 100).toFixed(0)}% of the last exit)`;
  if (m.budget_macs_per_second) text += ` · budget ${(m.budget_macs_per_second / 1e6).toFixed(1)} M`;
  $("compute").textContent = text + ` · ${chunks} chunks`;
  $("meter-fill").style.width = `${Math.min(used, 1) * 100}%`;
}

function handle(m) {
  if (m.type === "ready") {
    status(`streaming · ${m.settings.strategy ? `${m.settings.strategy}, threshold ${Number(m.threshold).toPrecision(3)}` : `exit ${m.settings.exit_layer}`}`);
  } else if (m.type === "partial") {
    addChunk(m);
    $("partial").textContent = m.text;
    showCompute(m);
  } else if (m.type === "final") {
    const line = document.createElement("span");
    line.className = "final";
    line.dataset.exits = m.chunk_exits.join(",");
    line.textContent = m.text || "(nothing heard)";
    $("transcript").insertBefore(line, $("partial"));
    $("partial").textContent = "";
    const end = document.createElement("span");
    end.className = "end";
    $("strip").appendChild(end);
    if (m.last) finished("done");
  } else if (m.type === "error") {
    status(`server: ${m.message}`, true);
  }
}

function connect() {
  return new Promise((resolve, reject) => {
    ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/`);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      ws.send(JSON.stringify({ type: "start", sample_rate: 16000, format: "f32le", ...streamSettings() }));
      for (const b of backlog) ws.send(b);
      backlog = [];
      resolve();
    };
    ws.onmessage = (e) => handle(JSON.parse(e.data));
    ws.onerror = () => reject(new Error("cannot reach the server"));
    ws.onclose = (e) => {
      if (e.code !== 1000 && $("status").className !== "error") status(`connection closed (${e.code}) ${e.reason}`, true);
      stopAudio();
    };
  });
}

let backlog = []; // audio captured while the connection opens: sent once it is open, so no word is cut

function send(samples) {
  const data = new Float32Array(samples).buffer;
  if (ws && ws.readyState === WebSocket.OPEN) {
    for (const b of backlog) ws.send(b);
    backlog = [];
    ws.send(data);
  } else if (!ws || ws.readyState === WebSocket.CONNECTING) {
    backlog.push(data);
  }
}

async function startMic() {
  ws = null; // what the microphone says before the new connection opens waits in the backlog
  backlog = [];
  try {
    const media = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false } });
    const ctx = new AudioContext({ sampleRate: 16000 }); // the browser resamples the microphone to 16 kHz
    await ctx.resume();
    await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([TAP], { type: "text/javascript" })));
    const node = new AudioWorkletNode(ctx, "tap");
    let pending = [];
    let count = 0;
    node.port.onmessage = (e) => { // 128-sample blocks, sent 100 ms at a time
      pending.push(e.data);
      count += e.data.length;
      if (count >= 1600) {
        const x = new Float32Array(count);
        let i = 0;
        for (const b of pending) { x.set(b, i); i += b.length; }
        send(x);
        pending = [];
        count = 0;
      }
    };
    ctx.createMediaStreamSource(media).connect(node);
    audio = { ctx, node, media };
    await connect();
    running(true);
  } catch (e) {
    status(`microphone: ${e.message}`, true);
  }
}

async function playFile(file) {
  try {
    const ctx = new AudioContext({ sampleRate: 16000 });
    const buf = await ctx.decodeAudioData(await file.arrayBuffer());
    const x = buf.getChannelData(0);
    await connect();
    running(true);
    let i = 0;
    const piece = 1600; // 100 ms, sent in real time so that the strip fills as it would from a microphone
    audio = { ctx };
    audio.timer = setInterval(() => {
      if (i >= x.length) { end(); return; }
      send(x.subarray(i, i + piece));
      i += piece;
    }, 100);
  } catch (e) {
    status(`${file.name}: ${e.message}`, true);
  }
}

function stopAudio() {
  if (!audio) return;
  if (audio.timer) clearInterval(audio.timer);
  if (audio.media) audio.media.getTracks().forEach((t) => t.stop());
  if (audio.node) audio.node.disconnect();
  audio.ctx.close();
  audio = null;
}

function end() {
  stopAudio();
  if (ws && ws.readyState === WebSocket.OPEN) for (const b of backlog) ws.send(b);
  backlog = [];
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "end" }));
  status("finishing…");
}

function running(on) {
  $("mic").disabled = on;
  $("stop").disabled = !on;
  $("mode").disabled = on;
}

function finished(text) {
  running(false);
  document.body.dataset.done = "1";
  status(text);
}

$("mic").onclick = startMic;
$("stop").onclick = end;
$("mode").onchange = showBudget;
$("budget").oninput = () => {
  showBudget();
  if (ws && ws.readyState === WebSocket.OPEN && $("mode").value.startsWith("strategy:"))
    ws.send(JSON.stringify({ type: "set", budget: Number($("budget").value) })); // from the next chunk on
};
$("file").onchange = (e) => e.target.files[0] && playFile(e.target.files[0]);
$("drop").ondragover = (e) => { e.preventDefault(); $("drop").classList.add("over"); };
$("drop").ondragleave = () => $("drop").classList.remove("over");
$("drop").ondrop = (e) => { e.preventDefault(); $("drop").classList.remove("over"); if (e.dataTransfer.files[0]) playFile(e.dataTransfer.files[0]); };

loadInfo().then(() => { if (params.get("autostart")) startMic(); }).catch((e) => status(`cannot load /info: ${e.message}`, true));
