// Kernex web UI: progressive enhancement only. Every page works without
// this script except the upload (which needs a progress bar and a raw body).
// - [data-refresh]: re-fetch the element's HTML every data-interval seconds
//   while the page is visible (live status, charts, progress, the buttons
//   the state allows) and merge it into the page node by node, so what the
//   operator did stays: open sections, scroll position, focus, ticked boxes
//   and typed input;
// - form[data-confirm]: ask before a destructive action;
// - form[data-upload]: send the chosen file to /ui/releases/upload with
//   XMLHttpRequest, showing upload progress.
"use strict";
(function () {
  var csrf = function () {
    var input = document.querySelector('input[name="csrf"]');
    return input ? input.value : "";
  };

  // Makes `old` look like `fresh` (a parsed copy), changing only what
  // differs. A <details> keeps the open state the operator gave it; a
  // field being typed in keeps its value.
  function morphChildren(old, fresh) {
    var olds = Array.prototype.slice.call(old.childNodes);
    var news = Array.prototype.slice.call(fresh.childNodes);
    for (var i = 0; i < news.length; i++) {
      var n = news[i];
      var o = olds[i];
      if (!o) {
        old.appendChild(n);
      } else if (o.nodeType !== n.nodeType || o.nodeName !== n.nodeName ||
                 (o.id || "") !== (n.id || "")) {
        old.replaceChild(n, o);
      } else if (o.nodeType === 1) {
        morphElement(o, n);
      } else if (o.nodeValue !== n.nodeValue) {
        o.nodeValue = n.nodeValue;
      }
    }
    for (var j = news.length; j < olds.length; j++) old.removeChild(olds[j]);
  }

  function morphElement(o, n) {
    var keep = function (name) {
      return (o.nodeName === "DETAILS" && name === "open") || name === "data-stale" ||
        (o === document.activeElement && name === "value");
    };
    var i, a;
    for (i = 0; i < n.attributes.length; i++) {
      a = n.attributes[i];
      if (!keep(a.name) && o.getAttribute(a.name) !== a.value) o.setAttribute(a.name, a.value);
    }
    for (i = o.attributes.length - 1; i >= 0; i--) {
      a = o.attributes[i];
      if (!keep(a.name) && !n.hasAttribute(a.name)) o.removeAttribute(a.name);
    }
    if (o.nodeName === "TEXTAREA" || o.nodeName === "SELECT") return;
    morphChildren(o, n);
  }

  function refresh(el) {
    var url = el.getAttribute("data-refresh");
    var secs = parseInt(el.getAttribute("data-interval") || "10", 10);
    var busy = false;
    setInterval(function () {
      if (document.hidden || busy) return;
      busy = true;
      fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then(function (r) {
          if (r.status === 200) return r.text();
          throw new Error("HTTP " + r.status);
        })
        .then(function (html) {
          var fresh = document.createElement(el.nodeName);
          fresh.innerHTML = html;
          morphChildren(el, fresh);
          el.removeAttribute("data-stale");
          el.setAttribute("data-refreshed", String(1 + parseInt(el.getAttribute("data-refreshed") || "0", 10)));
        })
        .catch(function () {
          el.setAttribute("data-stale", "true");
        })
        .finally(function () {
          busy = false;
        });
    }, Math.max(2, secs) * 1000);
  }

  // Delegated, so forms inside refreshed fragments are covered too.
  function confirmForms() {
    document.addEventListener("submit", function (e) {
      var form = e.target;
      if (form.matches && form.matches("form[data-confirm]") &&
          !window.confirm(form.getAttribute("data-confirm"))) {
        e.preventDefault();
      }
    });
  }

  function upload(form) {
    var input = form.querySelector('input[type="file"]');
    var bar = form.querySelector("progress");
    var out = form.querySelector("output");
    var button = form.querySelector('button[type="submit"]');
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      if (!input.files.length) {
        out.textContent = "Choose a bundle file first.";
        return;
      }
      var file = input.files[0];
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.getAttribute("action"));
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      xhr.setRequestHeader("X-CSRF-Token", csrf());
      bar.hidden = false;
      bar.max = file.size || 1;
      bar.value = 0;
      button.disabled = true;
      out.textContent = "Uploading " + file.name + "…";
      xhr.upload.addEventListener("progress", function (ev) {
        if (ev.lengthComputable) {
          bar.max = ev.total;
          bar.value = ev.loaded;
          if (ev.loaded === ev.total) out.textContent = "Verifying the signature and every image…";
        }
      });
      xhr.addEventListener("load", function () {
        button.disabled = false;
        var body = {};
        try { body = JSON.parse(xhr.responseText); } catch (_) { body = {}; }
        if (xhr.status === 201) {
          bar.value = bar.max;
          out.className = "ok";
          out.textContent = "Uploaded release " + body.version + " (" + body.compatible + ").";
          var link = document.createElement("a");
          link.href = "/ui/releases/" + encodeURIComponent(body.id);
          link.textContent = " Open it";
          link.id = "uploaded-release";
          out.appendChild(link);
          // Then show it (its manifest), as the list is now stale.
          setTimeout(function () { window.location.assign(link.href); }, 1200);
        } else {
          out.className = "error";
          var detail = body.detail;
          if (detail && typeof detail === "object") detail = JSON.stringify(detail);
          out.textContent = "Upload refused (" + xhr.status + "): " + (detail || body.error || xhr.statusText);
        }
      });
      xhr.addEventListener("error", function () {
        button.disabled = false;
        out.className = "error";
        out.textContent = "The upload failed: the connection was lost.";
      });
      xhr.send(file);
    });
  }

  // [data-select-all=NAME]: ticks or unticks every checkbox named NAME of
  // the same form (a form attribute counts).
  function selectAll() {
    document.addEventListener("change", function (e) {
      var box = e.target;
      if (!box.matches || !box.matches("input[data-select-all]")) return;
      var name = box.getAttribute("data-select-all");
      var form = box.form;
      document.querySelectorAll('input[type="checkbox"][name="' + name + '"]').forEach(function (c) {
        if (c.form === form) c.checked = box.checked;
      });
    });
  }

  // button[data-copy=SELECTOR]: copies that element's text (a secret
  // shown once) to the clipboard and says so on the button.
  function copyButtons() {
    document.addEventListener("click", function (e) {
      var button = e.target;
      if (!button.matches || !button.matches("button[data-copy]")) return;
      var source = document.querySelector(button.getAttribute("data-copy"));
      if (!source || !navigator.clipboard) return;
      navigator.clipboard.writeText(source.textContent.trim()).then(function () {
        button.textContent = "Copied";
      }, function () {
        button.textContent = "Select and copy it";
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    selectAll();
    copyButtons();
    document.querySelectorAll("[data-refresh]").forEach(refresh);
    document.querySelectorAll("form[data-upload]").forEach(upload);
    confirmForms();
  });
})();
