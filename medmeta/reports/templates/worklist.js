(function () {
  "use strict";
  var table = document.getElementById("cases");
  var controls = document.getElementById("worklist-controls");
  if (!table || !controls) {
    return;
  }
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var patient = document.getElementById("filter-patient");
  var condition = document.getElementById("filter-condition");
  var review = document.getElementById("filter-review");
  var label = document.getElementById("filter-label");
  var order = document.getElementById("sort-by");
  var shown = document.getElementById("shown-count");
  var number = function (row, key) { return parseFloat(row.getAttribute("data-" + key)); };
  var keys = {
    worklist: function (row) { return [number(row, "rank")]; },
    "confidence-low": function (row) { return [number(row, "confidence"), number(row, "rank")]; },
    "confidence-high": function (row) { return [-number(row, "confidence"), number(row, "rank")]; },
    folder: function (row) { return [number(row, "row")]; }
  };
  var keep = function (select, row, key) {
    return !select || select.value === "" || row.getAttribute("data-" + key) === select.value;
  };
  function update() {
    var key = keys[order.value] || keys.worklist;
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      for (var i = 0; i < x.length; i++) {
        if (x[i] !== y[i]) {
          return x[i] - y[i];
        }
      }
      return 0;
    });
    var count = 0;
    rows.forEach(function (row) {
      var visible = keep(patient, row, "patient") && keep(condition, row, "predicted") && keep(review, row, "refer") &&
        keep(label, row, "label");
      row.hidden = !visible;
      count += visible ? 1 : 0;
      body.appendChild(row);
    });
    shown.textContent = count + " of " + rows.length + " case(s) shown";
  }
  // a view can be linked to: report.html?patient=NAME&condition=NAME&review=refer&label=wrong&order=folder
  var params = new URLSearchParams(window.location.search);
  [["patient", patient], ["condition", condition], ["review", review], ["label", label], ["order", order]].forEach(function (pair) {
    var value = params.get(pair[0]), select = pair[1];
    if (select && value !== null && Array.prototype.some.call(select.options, function (o) { return o.value === value; })) {
      select.value = value;
    }
  });
  [patient, condition, review, label, order].forEach(function (select) {
    if (select) {
      select.addEventListener("change", update);
    }
  });
  controls.hidden = false;
  update();
})();
