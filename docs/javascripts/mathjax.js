// MathJax settings for pymdownx.arithmatex (generic mode): $$...$$ blocks and \( ... \) inline maths.
window.MathJax = {
  tex: { inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true },
  options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex" },
};
document$.subscribe(() => {
  MathJax.typesetPromise && MathJax.typesetPromise();
});
