"""The vocabulary of ``rasfx.explain`` and ``rasfx inspect``: the compiler stages a graph can be
shown at, the graph variants, and the output formats. Imports nothing heavy: the command line
builds its parser (and answers ``--help``) from it without importing torch."""

STAGES = ("captured", "analyzed", "transformed", "fused", "lowered")
VARIANTS = ("shared", "rowwise", "dense")
FORMATS = ("summary", "text", "json", "dot", "svg", "html")
