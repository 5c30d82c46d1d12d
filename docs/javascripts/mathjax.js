// MathJax 3 for pymdownx.arithmatex (generic mode): only the spans and divs it marks are typeset.
// The script itself is bundled into the site (docs/hooks/build.py), so no network is needed.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};
