// Render the equations pymdownx.arithmatex marks (\( .. \) inline, \[ .. \] display) with
// KaTeX, on every page load (instant navigation included).
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
});
