// The web timeline's little JavaScript: everything works without it; it only saves typing.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // "turn N: open" on an agent's page goes straight to /agents/NAME/turns/N.
  for (const form of document.querySelectorAll("form[data-jump]")) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const n = form.elements.n.value.trim();
      if (/^(0|[1-9][0-9]*)$/.test(n)) {
        window.location.href = form.dataset.jump + "/" + n;
      }
    });
  }
  // The tree browser's seq slider writes its seq into the point field.
  for (const slider of document.querySelectorAll("input[type=range][data-target]")) {
    const target = document.getElementById(slider.dataset.target);
    const label = document.createElement("output");
    label.value = slider.value;
    slider.after(label);
    slider.addEventListener("input", () => {
      target.value = slider.value;
      label.value = slider.value;
    });
  }
  // A confirmation's button says what it does while the change runs (a rollback can take seconds).
  for (const form of document.querySelectorAll("form.confirm")) {
    form.addEventListener("submit", () => {
      const button = form.querySelector("button");
      button.disabled = true;
      button.textContent = button.textContent + " — working…";
    });
  }
});
