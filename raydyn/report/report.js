// The script of the page written by raydyn.report.html (inlined there; see that module's docstring).
// Reads the JSON in <script id="data">; draws with the inlined Plotly bundle.
(function () {
  'use strict';
  var D = JSON.parse(document.getElementById('data').textContent);
  var body = document.body;
  var $ = function (id) { return document.getElementById(id); };
  var R = D.rows.length;
  var CONFIG = {displaylogo: false, responsive: true, showLink: false, showSendToCloud: false,
                showEditInChartStudio: false, typesetMath: false, topojsonURL: '',
                toImageButtonOptions: {format: 'png', filename: 'raydyn-' + D.sweep}};
  var BANDS = {iqr: ['q25', 'q75'], std: ['mean − std', 'mean + std'], minmax: ['min', 'max'], none: null};
  var BAND_TEXT = {iqr: 'band: interquartile range (25–75 %)', std: 'band: ± 1 standard deviation',
                   minmax: 'band: min–max', none: ''};

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c];
    });
  }
  function fmt(v) {
    if (v === null || v === undefined) return '–';
    if (typeof v === 'number') return Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : String(Math.round(v * 1e4) / 1e4);
    return String(v);
  }
  function decode(s, dtype) {
    var bin = atob(s), n = bin.length, u8 = new Uint8Array(n);
    for (var i = 0; i < n; i++) u8[i] = bin.charCodeAt(i);
    switch (dtype) {
      case 'f4': return new Float32Array(u8.buffer);
      case 'f8': return new Float64Array(u8.buffer);
      case 'i4': return new Int32Array(u8.buffer);
      case 'u2': return new Uint16Array(u8.buffer);
    }
    throw new Error('report data: unknown dtype ' + dtype);
  }
  function hexRgba(hex, a) {
    var n = parseInt(hex.slice(1), 16);
    return 'rgba(' + ((n >> 16) & 255) + ',' + ((n >> 8) & 255) + ',' + (n & 255) + ',' + a + ')';
  }

  // ------------------------------------------------------------------ embedded curves
  var C = D.curves, offsets = null, sidx = null, steps = [], cache = {};
  if (C) {
    offsets = decode(C.offsets, 'i4');
    sidx = decode(C.step_index, C.step_index_dtype);
    steps = C.steps;
    if (offsets.length !== R + 1 || offsets[R] !== sidx.length) throw new Error('report data: curve offsets do not match the run table');
  }
  function metricInfo(name) {
    for (var i = 0; i < C.metrics.length; i++) if (C.metrics[i].name === name) return C.metrics[i];
    throw new Error('report data: no metric ' + name);
  }
  function values(name) {
    if (!cache[name]) {
      var m = metricInfo(name);
      cache[name] = decode(m.data, m.dtype);
      if (cache[name].length !== sidx.length) throw new Error('report data: metric ' + name + ' has the wrong length');
    }
    return cache[name];
  }
  var AX = {}, CODES = {};
  D.groups.forEach(function (g) { AX[g.column] = g; CODES[g.column] = decode(g.codes, 'i4'); });

  // Linear interpolation between order statistics: numpy's default quantile, DuckDB's quantile_cont.
  function quantile(a, q) {
    var pos = q * (a.length - 1), lo = Math.floor(pos), hi = Math.min(lo + 1, a.length - 1), t = pos - lo;
    return a[lo] + (a[hi] - a[lo]) * t;
  }
  // Per (facet, group, step): median, the band's two numbers and n, over the finite values of the
  // group's runs at that step (raydyn.aggregate.curves.curve_table). Returns series sorted by facet, group.
  function aggregate(metric, gcol, fcol, band) {
    var V = values(metric), S = steps.length;
    var gc = gcol ? CODES[gcol] : null, fc = fcol ? CODES[fcol] : null;
    var NG = gcol ? AX[gcol].values.length : 1;
    var buckets = new Map(), sizes = new Map();
    for (var r = 0; r < R; r++) {
      var key = (fc ? fc[r] : 0) * NG + (gc ? gc[r] : 0);
      sizes.set(key, (sizes.get(key) || 0) + 1);
      for (var k = offsets[r], e = offsets[r + 1]; k < e; k++) {
        var v = V[k];
        if (!Number.isFinite(v)) continue;
        var b = key * S + sidx[k], arr = buckets.get(b);
        if (!arr) { arr = []; buckets.set(b, arr); }
        arr.push(v);
      }
    }
    var keys = Array.from(buckets.keys()).sort(function (a, b) { return a - b; });
    var out = [], cur = null;
    keys.forEach(function (b) {
      var key = Math.floor(b / S), s = b - key * S;
      if (!cur || cur.key !== key) {
        cur = {key: key, f: Math.floor(key / NG), g: key % NG, runs: sizes.get(key), x: [], centre: [], lo: [], hi: [], n: []};
        out.push(cur);
      }
      var a = Float64Array.from(buckets.get(b)).sort(), n = a.length, c, lo = NaN, hi = NaN;
      if (band === 'std') {
        var sum = 0, i;
        for (i = 0; i < n; i++) sum += a[i];
        var mean = sum / n, ss = 0;
        for (i = 0; i < n; i++) ss += (a[i] - mean) * (a[i] - mean);
        var sd = n > 1 ? Math.sqrt(ss / (n - 1)) : NaN;  // sample std; one run: no band (as raydyn curves)
        c = mean; lo = mean - (Number.isNaN(sd) ? 0 : sd); hi = mean + (Number.isNaN(sd) ? 0 : sd);
      } else {
        c = quantile(a, 0.5);
        if (band === 'iqr') { lo = quantile(a, 0.25); hi = quantile(a, 0.75); }
        else if (band === 'minmax') { lo = a[0]; hi = a[n - 1]; }
      }
      cur.x.push(steps[s]); cur.centre.push(c); cur.lo.push(lo); cur.hi.push(hi); cur.n.push(n);
    });
    return out;
  }

  // ------------------------------------------------------------------ controls
  function option(sel, value, text) {
    var o = document.createElement('option'); o.value = value; o.textContent = text; sel.appendChild(o);
  }
  var mSel = $('c-metric'), gSel = $('c-group'), fSel = $('c-facet'), bSel = $('c-band'), logBox = $('c-logy');
  if (C) C.metrics.forEach(function (m) { option(mSel, m.name, m.name); });
  option(gSel, '', 'none (all runs)');
  option(fSel, '', 'none');
  D.groups.forEach(function (g) { option(gSel, g.column, g.column); option(fSel, g.column, g.column); });
  if (D.groups.length) gSel.value = D.groups[0].column;
  if (C) {
    var names = C.metrics.map(function (m) { return m.name; });
    mSel.value = names.indexOf('test_loss') >= 0 ? 'test_loss' : names[0];
    logBox.checked = /loss$/.test(mSel.value);
  }
  var facetNote = '';
  function selected(sel) { return sel.value || null; }

  // ------------------------------------------------------------------ the curves view
  var curvesDiv = $('curves-plot'), overlayDiv = $('overlay-plot');
  window.__drawn = Promise.resolve();
  function drawCurves() {
    var caption = $('curves-caption');
    if (!C) { curvesDiv.innerHTML = '<p>No curves: the sweep has no metrics rows.</p>'; caption.textContent = ''; return; }
    var metric = mSel.value, gcol = selected(gSel), fcol = selected(fSel), band = bSel.value, logy = logBox.checked;
    facetNote = '';
    if (fcol && fcol === gcol) { fSel.value = ''; fcol = null; facetNote = 'facet reset to none: it must differ from group by. '; }
    var series = aggregate(metric, gcol, fcol, band);
    var gAx = gcol ? AX[gcol] : null, fAx = fcol ? AX[fcol] : null;
    var facets = [], groups = [];
    series.forEach(function (s) { if (facets.indexOf(s.f) < 0) facets.push(s.f); if (groups.indexOf(s.g) < 0) groups.push(s.g); });
    facets.sort(function (a, b) { return a - b; }); groups.sort(function (a, b) { return a - b; });
    var notes = facetNote;
    if (groups.length > D.max_groups) { notes += 'drawing the first ' + D.max_groups + ' of ' + groups.length + ' groups. '; groups = groups.slice(0, D.max_groups); }
    if (facets.length > D.max_facets) { notes += 'drawing the first ' + D.max_facets + ' of ' + facets.length + ' facet panels. '; facets = facets.slice(0, D.max_facets); }
    var stat = band === 'std' ? 'mean' : 'median', bnames = BANDS[band];
    var traces = [], legend = {};
    var nF = Math.max(facets.length, 1), ncols = Math.min(nF, 3), nrows = Math.ceil(nF / ncols);
    series.forEach(function (s) {
      var fi = facets.indexOf(s.f);
      if (fi < 0 || groups.indexOf(s.g) < 0) return;
      var ax = fi === 0 ? '' : String(fi + 1);
      var name = gAx ? gAx.values[s.g] : 'all runs', color = gAx ? gAx.colors[s.g] : '#1f77b4';
      var where = {xaxis: 'x' + ax, yaxis: 'y' + ax, legendgroup: name};
      var meta = {group: name, facet: fAx ? fAx.values[s.f] : null, runs: s.runs};
      if (bnames) {
        var bx = [], blo = [], bhi = [];
        for (var i = 0; i < s.x.length; i++) {
          if (!Number.isFinite(s.lo[i]) || !Number.isFinite(s.hi[i]) || (logy && !(s.lo[i] > 0 && s.hi[i] > 0))) continue;
          bx.push(s.x[i]); blo.push(s.lo[i]); bhi.push(s.hi[i]);
        }
        traces.push(Object.assign({type: 'scatter', mode: 'lines', x: bx, y: blo, name: name, showlegend: false, hoverinfo: 'skip',
                                   line: {width: 0, color: color}, meta: Object.assign({role: 'lo'}, meta)}, where));
        traces.push(Object.assign({type: 'scatter', mode: 'lines', x: bx, y: bhi, name: name, showlegend: false, hoverinfo: 'skip',
                                   fill: 'tonexty', fillcolor: hexRgba(color, 0.2), line: {width: 0, color: color},
                                   meta: Object.assign({role: 'hi'}, meta)}, where));
      }
      var x = [], y = [], cd = [];
      for (var j = 0; j < s.x.length; j++) {
        if (!Number.isFinite(s.centre[j]) || (logy && !(s.centre[j] > 0))) continue;
        x.push(s.x[j]); y.push(s.centre[j]); cd.push([s.n[j], s.lo[j], s.hi[j]]);
      }
      var hover = '<b>' + esc(gAx ? gAx.column + '=' + name : name) + '</b>' + (fAx ? '<br>' + esc(fAx.column + '=' + fAx.values[s.f]) : '') +
                  '<br>step %{x}<br>' + stat + ' %{y:.4g}' +
                  (bnames ? '<br>' + bnames[0] + ' %{customdata[1]:.4g}, ' + bnames[1] + ' %{customdata[2]:.4g}' : '') +
                  '<br>over %{customdata[0]} of ' + s.runs + ' runs<extra></extra>';
      traces.push(Object.assign({type: 'scatter', mode: 'lines', x: x, y: y, customdata: cd, name: name, hovertemplate: hover,
                                 showlegend: !legend[name], line: {width: 2, color: color},
                                 meta: Object.assign({role: 'centre'}, meta)}, where));
      legend[name] = true;
    });
    var layout = {height: 110 + 300 * nrows, margin: {l: 70, r: 20, t: 60, b: 60}, hovermode: 'closest',
                  title: {text: esc(metric) + ' by ' + esc(gAx ? gAx.label : 'all runs'), font: {size: 15}},
                  legend: {title: {text: esc(gAx ? gAx.label : '')}}, annotations: []};
    if (nF > 1) layout.grid = {rows: nrows, columns: ncols, pattern: 'independent', xgap: 0.08, ygap: 0.18};
    for (var fi = 0; fi < nF; fi++) {
      var sfx = fi === 0 ? '' : String(fi + 1);
      layout['xaxis' + sfx] = {title: {text: fi + ncols >= nF ? 'step' : ''}, zeroline: false};
      layout['yaxis' + sfx] = {type: logy ? 'log' : 'linear', title: {text: fi % ncols === 0 ? esc(metric) : ''}};
      if (fi > 0) layout['yaxis' + sfx].matches = 'y';
      if (fAx && facets.length) layout.annotations.push({text: esc(fAx.column + '=' + fAx.values[facets[fi]]), showarrow: false,
        xref: 'x' + sfx + ' domain', yref: 'y' + sfx + ' domain', x: 0.5, y: 1.0, yanchor: 'bottom', font: {size: 12}});
    }
    if (!traces.length) layout.annotations.push({text: 'no finite value of ' + esc(metric) + (logy ? ' above 0' : ''), showarrow: false,
      xref: 'paper', yref: 'paper', x: 0.5, y: 0.5});
    caption.textContent = notes + 'line: ' + stat + ' over the runs of each ' + (gcol || 'sweep') + (fcol ? ' and ' + fcol : '') +
      (BAND_TEXT[band] ? '; ' + BAND_TEXT[band] : '') + '; steps without a finite value are skipped. ' +
      'Drag to zoom, double-click to reset.';
    window.__drawn = Plotly.react(curvesDiv, traces, layout, CONFIG);
    return window.__drawn;
  }

  // ------------------------------------------------------------------ overlay of selected runs
  var chosen = [];  // run indices (rows of D.rows), in click order
  window.__overlayDrawn = Promise.resolve();
  function runLabel(r) {
    var parts = D.label_columns.map(function (c) { return c + '=' + fmt(D.rows[r][D.columns.indexOf(c)]); });
    return D.rows[r][0] + (parts.length ? ' (' + parts.join(', ') + ')' : '');
  }
  function drawOverlay() {
    if (!C) { overlayDiv.innerHTML = '<p>No curves: the sweep has no metrics rows.</p>'; return; }
    var metric = mSel.value, logy = logBox.checked, V = values(metric);
    var traces = chosen.map(function (r) {
      var x = [], y = [];
      for (var k = offsets[r]; k < offsets[r + 1]; k++) {
        var v = V[k];
        if (!Number.isFinite(v) || (logy && !(v > 0))) continue;
        x.push(steps[sidx[k]]); y.push(v);
      }
      return {type: 'scatter', mode: 'lines+markers', marker: {size: 4}, x: x, y: y, name: esc(runLabel(r)),
              meta: {run_id: D.rows[r][0]}, hovertemplate: esc(D.rows[r][0]) + '<br>step %{x}<br>' + esc(metric) + ' %{y:.4g}<extra></extra>'};
    });
    var layout = {height: 380, margin: {l: 60, r: 10, t: 40, b: 50}, title: {text: esc(metric) + ' of ' + chosen.length + ' selected run' + (chosen.length === 1 ? '' : 's'), font: {size: 13}},
                  xaxis: {title: {text: 'step'}}, yaxis: {type: logy ? 'log' : 'linear', title: {text: esc(metric)}},
                  legend: {orientation: 'h', y: -0.2}, showlegend: true, annotations: []};
    if (!chosen.length) {
      layout.xaxis.visible = layout.yaxis.visible = false;
      layout.annotations.push({text: 'click rows of the run table to overlay their curves', showarrow: false, xref: 'paper', yref: 'paper', x: 0.5, y: 0.5});
    }
    window.__overlayDrawn = Plotly.react(overlayDiv, traces, layout, CONFIG);
    return window.__overlayDrawn;
  }

  // ------------------------------------------------------------------ run table
  var thead = document.querySelector('#runs thead'), tbody = document.querySelector('#runs tbody');
  var cells = D.rows.map(function (r) { return r.map(function (v) { return esc(fmt(v)); }); });
  var text = D.rows.map(function (r) { return r.map(fmt).join('\u0001').toLowerCase(); });
  var sortCol = -1, sortDir = 1;
  function header() {
    var tr = document.createElement('tr');
    D.columns.forEach(function (c, i) {
      var th = document.createElement('th');
      th.textContent = c + (i === sortCol ? (sortDir > 0 ? ' ▲' : ' ▼') : '');
      th.onclick = function () { sortDir = (sortCol === i) ? -sortDir : 1; sortCol = i; render(); };
      tr.appendChild(th);
    });
    thead.innerHTML = ''; thead.appendChild(tr);
  }
  function render() {
    header();
    var q = $('filter').value.toLowerCase(), idx = [];
    for (var r = 0; r < R; r++) if (!q || text[r].indexOf(q) >= 0) idx.push(r);
    if (sortCol >= 0) idx.sort(function (a, b) {
      var x = D.rows[a][sortCol], y = D.rows[b][sortCol];
      if (x === y) return 0; if (x === null) return 1; if (y === null) return -1;
      return (x < y ? -1 : 1) * sortDir;
    });
    tbody.innerHTML = idx.map(function (r) {
      return '<tr data-r="' + r + '"' + (chosen.indexOf(r) >= 0 ? ' class="sel"' : '') + '><td>' + cells[r].join('</td><td>') + '</td></tr>';
    }).join('');
    body.dataset.rows = idx.length;
    $('rows-note').textContent = idx.length + ' of ' + R + ' runs';
  }
  function toggle(r) {
    var i = chosen.indexOf(r);
    if (i >= 0) chosen.splice(i, 1); else chosen.push(r);
    var tr = tbody.querySelector('tr[data-r="' + r + '"]');
    if (tr) tr.classList.toggle('sel', i < 0);
    return drawOverlay();
  }
  tbody.addEventListener('click', function (e) {
    var tr = e.target.closest('tr');
    if (tr && tr.dataset.r !== undefined) toggle(Number(tr.dataset.r));
  });
  $('overlay-clear').addEventListener('click', function () {
    chosen = []; Array.prototype.forEach.call(tbody.querySelectorAll('tr.sel'), function (tr) { tr.classList.remove('sel'); });
    drawOverlay();
  });
  $('filter').addEventListener('input', render);
  [mSel, gSel, fSel, bSel, logBox].forEach(function (el) { el.addEventListener('change', drawCurves); });
  [mSel, logBox].forEach(function (el) { el.addEventListener('change', drawOverlay); });

  // ------------------------------------------------------------------ start
  render();
  var imgs = document.querySelectorAll('img.plot'), loaded = 0;
  imgs.forEach(function (im) { if (im.complete && im.naturalWidth > 0) loaded++; });
  body.dataset.images = loaded + '/' + imgs.length;
  body.dataset.runsWithCurves = C ? (function () { var n = 0; for (var r = 0; r < R; r++) if (offsets[r + 1] > offsets[r]) n++; return n; })() : 0;
  drawCurves(); drawOverlay();
  if (window.__errors.length) body.dataset.errors = window.__errors.length;
  Promise.all([window.__drawn, window.__overlayDrawn]).then(function () {
    body.dataset.ready = '1';
    if (location.hash === '#selftest') return selftest();
  }).catch(function (e) { window.__errors.push('drawing failed: ' + e); body.dataset.errors = window.__errors.length; });

  // ------------------------------------------------------------------ #selftest
  // Drives the controls through their real handlers (set a value, dispatch 'change' or a click) and
  // records what Plotly drew, read back from the plot divs, into <body data-selftest> (JSON).
  function fire(el, value) {
    if (el.type === 'checkbox') el.checked = value; else el.value = value;
    el.dispatchEvent(new Event('change', {bubbles: true}));
  }
  function traces(div, full) {
    return (div.data || []).map(function (t) {
      var o = {name: t.name, role: t.meta && t.meta.role, facet: t.meta ? t.meta.facet : null, run_id: t.meta && t.meta.run_id,
               n: t.x.length, xaxis: t.xaxis || 'x'};
      if (full) { o.x = Array.from(t.x); o.y = Array.from(t.y); }
      return o;
    });
  }
  async function selftest() {
    var out = {metric: mSel.value, groupby: [], facet: null, bands: [], overlay: [], resources: []};
    if (!C) { body.dataset.selftest = JSON.stringify(out); body.dataset.selftestDone = '1'; return; }
    for (const o of Array.from(gSel.options)) {
      fire(gSel, o.value); await window.__drawn;
      out.groupby.push({value: o.value, traces: traces(curvesDiv, false)});
    }
    if (D.groups.length) {
      fire(gSel, D.groups[0].column); fire(logBox, false);
      for (const b of ['iqr', 'std', 'minmax', 'none']) {
        fire(bSel, b); await window.__drawn;
        out.bands.push({band: b, traces: traces(curvesDiv, true)});
      }
      if (D.groups.length > 1) {
        fire(fSel, D.groups[1].column); await window.__drawn;
        out.facet = {group: D.groups[0].column, facet: D.groups[1].column, traces: traces(curvesDiv, false)};
        fire(fSel, '');
      }
      fire(bSel, 'iqr'); await window.__drawn;
    }
    var rows = tbody.querySelectorAll('tr');
    for (const i of [0, 1, 0]) {  // select two rows, then deselect the first
      rows[i].dispatchEvent(new MouseEvent('click', {bubbles: true})); await window.__overlayDrawn;
      out.overlay.push({clicked: rows[i].dataset.r, selected_rows: tbody.querySelectorAll('tr.sel').length, traces: traces(overlayDiv, true)});
    }
    out.resources = performance.getEntriesByType('resource').map(function (e) { return e.name; });
    out.errors = window.__errors.slice();
    body.dataset.selftest = JSON.stringify(out);
    body.dataset.selftestDone = '1';
  }
})();
