// alignkit annotate: rank the responses on screen, by keys or by dragging, and send the ranking.
// Model output is untrusted: it reaches the page through textContent only, never innerHTML.
// The token comes from the link (?token=) and goes to the server in an Authorization header.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const token = new URLSearchParams(location.search).get("token") || "";
  const ORDINALS = ["1st", "2nd", "3rd", "4th"];
  let state = JSON.parse($("state").textContent);
  let places = [];    // places[p]: the place (0 = best) of the response shown at position p, or null
  let placed = [];    // positions in the order they were placed: ⌫ takes back the last
  let tieNext = false;
  let busy = false;

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // a string, or chat messages [{role, content}]
  function drawText(box, value) {
    box.replaceChildren();
    if (typeof value === "string") { box.textContent = value; return; }
    for (const m of value) {
      const turn = el("div", {class: "turn"});
      turn.append(el("span", {class: "role"}, m.role), el("div", {class: "content"}, m.content));
      box.append(turn);
    }
  }

  function say(text, error) {
    const m = $("message");
    m.textContent = text || "";
    m.classList.toggle("error", !!error);
  }

  // ---------------------------------------------------------------------------------------- drawing
  function render() {
    const p = state.progress, item = state.item;
    $("progress").textContent = `${p.done} done · ${p.left} to go`;
    $("task").hidden = !item;
    $("empty").hidden = !!item;
    $("revise").disabled = !state.can_revise || !!(item && item.revising);
    $("revise-last").disabled = !state.can_revise;
    if (!item) return;
    $("revising").hidden = !item.revising;
    $("skip").disabled = !!item.revising;
    drawText($("prompt"), item.prompt);
    const k = item.responses.length;
    const cards = $("responses");
    cards.replaceChildren();
    cards.dataset.count = k;
    item.responses.forEach((text, pos) => {
      const card = el("article", {class: "card", "data-pos": pos, "aria-label": `Response ${pos + 1}`});
      const head = el("header", {class: "card-head", title: "Drag onto a place"});
      const number = el("button", {type: "button", class: "num", "aria-label": `Place response ${pos + 1} next`},
                        String(pos + 1));
      number.addEventListener("click", () => { place(pos); $("task").focus(); });
      head.append(el("span", {class: "handle", "aria-hidden": "true"}, "⠿"), number,
                  el("span", {class: "card-title"}, `Response ${pos + 1}`), el("span", {class: "badge"}));
      head.addEventListener("pointerdown", (e) => startDrag(e, pos));
      const body = el("div", {class: "text"});
      drawText(body, text);
      card.append(head, body);
      cards.append(card);
    });
    places = new Array(k).fill(null);
    placed = [];
    tieNext = false;
    (item.ranking || []).forEach((group, place) => group.forEach((pos) => { places[pos] = place; placed.push(pos); }));
    $("comment").value = item.comment || "";
    $("unsafe").checked = !!item.unsafe;
    drawRanking();
    $("task").focus({preventScroll: true});
  }

  // dense rank (0 = best) of each used place, and how many responses share it
  function ranksOfPlaces() {
    const used = [...new Set(places.filter((x) => x !== null))].sort((a, b) => a - b);
    return new Map(used.map((place, rank) => [place, rank]));
  }

  function drawRanking() {
    const k = places.length, ranks = ranksOfPlaces();
    const list = $("places");
    list.replaceChildren();
    for (let place = 0; place < k; place++) {
      const here = places.map((x, pos) => (x === place ? pos : -1)).filter((pos) => pos >= 0);
      const name = ORDINALS[place] + (place === 0 ? " · best" : place === k - 1 ? " · worst" : "");
      const li = el("li", {class: "place" + (here.length > 1 ? " tied" : ""), "data-place": place});
      li.append(el("span", {class: "place-name"}, name));
      const chips = el("span", {class: "chips"});
      for (const pos of here) {
        const chip = el("span", {class: "chip", "data-pos": pos, title: "Drag to another place, or back to the responses"},
                        String(pos + 1));
        chip.addEventListener("pointerdown", (e) => startDrag(e, pos));
        chips.append(chip);
      }
      if (!here.length) chips.append(el("span", {class: "vacant"}, "empty"));
      else if (here.length > 1) chips.append(el("span", {class: "tie-label"}, "tie"));
      li.append(chips);
      list.append(li);
    }
    document.querySelectorAll(".card").forEach((card) => {
      const pos = +card.dataset.pos, place = places[pos];
      const tied = place !== null && places.filter((x) => x === place).length > 1;
      card.classList.toggle("placed", place !== null);
      card.querySelector(".badge").textContent =
        place === null ? "not ranked" : (tied ? "tied " : "") + ORDINALS[ranks.get(place)];
    });
    $("tie").setAttribute("aria-pressed", String(tieNext));
    $("tie").classList.toggle("on", tieNext);
    $("submit").disabled = busy;
  }

  // -------------------------------------------------------------------------------------- ranking
  // Put the response shown at `pos` on place `at` (a drop), or on the next free place (keys, clicks): after
  // "=", the place of the response placed just before.
  function place(pos, at) {
    if (!state.item || pos >= places.length || busy) return;
    takeOut(pos);
    if (at === undefined) {
      const previous = placed.length ? places[placed[placed.length - 1]] : null;
      const used = places.filter((x) => x !== null);
      at = used.length ? Math.max(...used) + 1 : 0;
      if (tieNext && previous !== null) at = previous;
      else if (at >= places.length) at = places.findIndex((_, p) => !places.includes(p));
    }
    tieNext = false;
    places[pos] = at;
    placed.push(pos);
    say("");
    drawRanking();
  }

  function takeOut(pos) {
    places[pos] = null;
    placed = placed.filter((p) => p !== pos);
  }

  function takeBackLast() {
    if (tieNext) tieNext = false;
    else if (placed.length) takeOut(placed[placed.length - 1]);
    drawRanking();
  }

  function ranking() {
    const ranks = ranksOfPlaces(), groups = [];
    places.forEach((place, pos) => { (groups[ranks.get(place)] ||= []).push(pos); });
    return groups;
  }

  // ------------------------------------------------------------------------------------ the server
  async function call(method, path, body) {
    const response = await fetch(path, {
      method, cache: "no-store",
      headers: {"Authorization": "Bearer " + token, ...(body ? {"Content-Type": "application/json"} : {})},
      body: body ? JSON.stringify(body) : undefined,
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw Object.assign(new Error(data.error || `the server answered ${response.status}`),
                                          {status: response.status});
    return data;
  }

  async function exchange(method, path, body, done) {
    if (busy) return;
    busy = true;
    drawRanking();
    try {
      state = await call(method, path, body);
      render();
      say(done);
    } catch (e) {
      if (e.status === undefined) say("Could not reach the server: your ranking is still here; try again.", true);
      else say(e.message, true);
      if (e.status === 409) setTimeout(() => exchange("GET", "api/state", null, ""), 1500);
    } finally {
      busy = false;
      drawRanking();
    }
  }

  function submit() {
    if (!state.item || busy) return;
    const left = places.map((x, pos) => (x === null ? pos : -1)).filter((pos) => pos >= 0);
    if (left.length === 1) place(left[0]);
    else if (left.length > 1) {
      say("Rank every response first: press its number, or drag it onto a place.", true);
      return;
    }
    const revising = state.item.revising;
    exchange("POST", "api/judgements", {item: state.item.id, ranking: ranking(), comment: $("comment").value,
                                        unsafe: $("unsafe").checked}, revising ? "Revised." : "Saved.");
  }

  function skip() {
    if (state.item && !state.item.revising) exchange("POST", "api/skip", {item: state.item.id}, "Skipped.");
  }

  function revise() {
    if (state.can_revise && !(state.item && state.item.revising)) {
      exchange("GET", "api/last", null, "Revising your previous judgement.");
    }
  }

  function back() {
    if (state.item && state.item.revising) exchange("GET", "api/state", null, "");
  }

  // ---------------------------------------------------------------------------------------- keys
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
    const target = e.target;
    if (target.id === "comment") {
      if (e.key === "Escape") { $("task").focus(); e.preventDefault(); }
      return;
    }
    if (e.key === "Enter" && target.closest("button, summary, a")) return;  // that control's own action
    const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
    if (!state.item) {
      if (key === "u") { revise(); e.preventDefault(); }
      return;
    }
    if (/^[1-9]$/.test(key)) {
      if (+key <= places.length) { place(+key - 1); e.preventDefault(); }
      return;
    }
    const actions = {
      "=": () => { tieNext = !tieNext; drawRanking(); }, "t": () => { tieNext = !tieNext; drawRanking(); },
      "Backspace": takeBackLast, "Delete": takeBackLast, "Enter": submit, "s": skip, "u": revise,
      "Escape": back, "c": () => $("comment").focus(), "f": () => { $("unsafe").checked = !$("unsafe").checked; },
    };
    if (actions[key]) { actions[key](); e.preventDefault(); }
  });

  // ---------------------------------------------------------------------------------------- drag
  // Pointer events (mouse, pen and touch alike); HTML drag-and-drop does not work on phones.
  let drag = null;

  function startDrag(e, pos) {
    if (e.button !== 0 || busy) return;
    drag = {pos, x: e.clientX, y: e.clientY, ghost: null};
    document.addEventListener("pointermove", moveDrag);
    document.addEventListener("pointerup", endDrag);
    document.addEventListener("pointercancel", stopDrag);
  }

  function dropTarget(e) {
    const hit = document.elementFromPoint(e.clientX, e.clientY);
    return hit && hit.closest(".place, .responses");
  }

  function moveDrag(e) {
    if (!drag) return;
    if (!drag.ghost) {
      if (Math.hypot(e.clientX - drag.x, e.clientY - drag.y) < 6) return;  // not yet a drag: maybe a click
      drag.ghost = el("div", {class: "ghost", "aria-hidden": "true"}, String(drag.pos + 1));
      document.body.append(drag.ghost);
      document.body.classList.add("dragging");
    }
    drag.ghost.style.left = e.clientX + "px";
    drag.ghost.style.top = e.clientY + "px";
    const over = dropTarget(e);
    document.querySelectorAll(".over").forEach((x) => x.classList.remove("over"));
    if (over) over.classList.add("over");
    e.preventDefault();
  }

  function endDrag(e) {
    const d = drag;
    stopDrag();
    if (!d || !d.ghost) return;
    const over = dropTarget(e);
    if (over && over.classList.contains("place")) place(d.pos, +over.dataset.place);
    else if (over) { takeOut(d.pos); drawRanking(); }
  }

  function stopDrag() {
    if (drag && drag.ghost) drag.ghost.remove();
    drag = null;
    document.body.classList.remove("dragging");
    document.querySelectorAll(".over").forEach((x) => x.classList.remove("over"));
    document.removeEventListener("pointermove", moveDrag);
    document.removeEventListener("pointerup", endDrag);
    document.removeEventListener("pointercancel", stopDrag);
  }

  // ------------------------------------------------------------------------------------- controls
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  $("revise").addEventListener("click", revise);
  $("revise-last").addEventListener("click", revise);
  $("back").addEventListener("click", back);
  $("tie").addEventListener("click", () => { tieNext = !tieNext; drawRanking(); });
  $("undo").addEventListener("click", takeBackLast);
  render();
})();
